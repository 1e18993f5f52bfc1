"""`job plan`: the table and JSON for every example, price files, kinds that do not fit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from job.plan import estimate
from job.cli.main import main

REPO = Path(__file__).resolve().parents[3]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))


def _run_plan(*args: str):
    return CliRunner().invoke(main, ["plan", *args], env={"HF_HUB_OFFLINE": "1"}, catch_exceptions=False)


def _validates(path: Path) -> bool:
    return CliRunner().invoke(main, ["validate", "--spec", str(path)]).exit_code == 0


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_gets_a_table_and_json(path):
    if not _validates(path):
        pytest.skip(f"{path.name} does not validate against this checkout's spec")
    table = _run_plan("--spec", str(path))
    assert table.exit_code == 0, table.output
    for kind in estimate.gpus():
        assert kind in table.output
    assert "recommended:" in table.output
    report = json.loads(_run_plan("--spec", str(path), "--json").stdout)
    assert [k["kind"] for k in report["kinds"]] == list(estimate.gpus())
    if path.name == "smoke.yaml":  # a pkg:// GGUF: shape from its metadata, tokens from its own tokenizer
        assert report["model"]["architecture_source"].startswith("GGUF metadata")
        assert report["data"]["method"] == "counted with the model's tokenizer" and report["data"]["rows"] == 24
    assert report["recommended"] is None or next(k for k in report["kinds"] if k["kind"] == report["recommended"])["fits"]


def test_prices_file_overrides_the_table(tmp_path):
    prices = tmp_path / "prices.yaml"
    prices.write_text("date: '2030-01-01'\nprices:\n  h100-sxm: {usd_per_hour: 100.0, source: test}\n  l4: 0.01\n")
    spec = str(REPO / "examples/llama32-3b-conversational.yaml")
    report = json.loads(_run_plan("--spec", spec, "--json", "--prices", str(prices)).stdout)
    by_kind = {k["kind"]: k for k in report["kinds"]}
    assert by_kind["h100-sxm"]["usd_per_hour"] == 100.0 and by_kind["l4"]["usd_per_hour"] == 0.01
    assert by_kind["a10g"]["usd_per_hour"] is None and by_kind["a10g"]["usd"] is None
    assert report["recommended"] == "l4" and report["prices"]["date"] == "2030-01-01"
    bad = tmp_path / "bad.yaml"
    bad.write_text("prices: {l4: {usd_per_hour: cheap}}\n")
    result = _run_plan("--spec", spec, "--prices", str(bad))
    assert result.exit_code == 2 and "usd_per_hour" in result.output


def test_out_of_memory_kinds_are_marked_and_never_recommended(tmp_path):
    spec = yaml.safe_load((REPO / "examples/alpaca-llama31-8b.yaml").read_text())
    # 16-bit 8B without checkpointing at batch 4: 45.6 GiB measured on the H100; too much for every 24-48 GB card
    spec["model"]["precision"] = "16bit"
    spec["training"].update(batch_size=4, gradient_checkpointing=False)
    path = tmp_path / "big.yaml"
    path.write_text(yaml.safe_dump(spec))
    report = json.loads(_run_plan("--spec", str(path), "--json").stdout)
    fits = {k["kind"]: k["fits"] for k in report["kinds"]}
    assert fits == {"h100-sxm": True, "h100-pcie": True, "h200": True, "a100-80gb": True, "a100-40gb": False,
                    "l40s": False, "a10g": False, "l4": False, "rtx-4090": False}
    assert fits[report["recommended"]]
    table = _run_plan("--spec", str(path))
    assert "NO (OOM)" in table.output and "does not fit" in table.output
    spec["model"]["name"] = "meta-llama/Llama-3.1-70B"
    path.write_text(yaml.safe_dump(spec))
    report = json.loads(_run_plan("--spec", str(path), "--json").stdout)
    assert report["recommended"] is None and not any(k["fits"] for k in report["kinds"])
    assert "recommended: none" in _run_plan("--spec", str(path)).output


def test_a_price_for_a_kind_the_table_lacks_is_refused_not_ignored(tmp_path):
    prices = tmp_path / "prices.yaml"
    prices.write_text(yaml.safe_dump({"prices": {"h100": {"usd_per_hour": 2.0}}}))
    result = _run_plan("--spec", str(EXAMPLES[0]), "--prices", str(prices))
    assert result.exit_code == 2 and "prices.h100: not a GPU kind" in result.output and "did you mean h100-" in result.output


def test_gpu_kinds_are_understood_as_users_write_them():
    result = _run_plan("--spec", str(REPO / "examples" / "smoke.yaml"), "--gpu", "H100", "--gpu", "NVIDIA L4", "--json")
    assert result.exit_code == 0, result.output
    assert [k["kind"] for k in json.loads(result.stdout)["kinds"]] == ["h100-sxm", "l4"]


def test_fp8_on_a_card_without_it_is_unsupported_not_out_of_memory(tmp_path):
    spec = yaml.safe_load((REPO / "examples/alpaca-llama31-8b.yaml").read_text())
    spec["model"]["precision"] = "fp8"
    path = tmp_path / "fp8.yaml"
    path.write_text(yaml.safe_dump(spec))
    report = json.loads(_run_plan("--spec", str(path), "--gpu", "L4", "--gpu", "H100", "--json").stdout)
    l4, h100 = report["kinds"]
    assert l4["choice"]["unsupported"] and "compute capability" in l4["choice"]["reason"]
    assert not h100["choice"]["unsupported"]
    assert "NO (fp8)" in _run_plan("--spec", str(path), "--gpu", "L4").output
