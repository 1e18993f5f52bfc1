"""The publishing gates on real artifacts: a published smoke run passes `job verify`; each broken copy of one of its
artifacts, with the manifest's checksums refreshed so that only the gates can tell, is refused with exit 4 naming
that artifact; a tokenizer llama.cpp would mangle stops a run with exit 2 before its first training step."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from job.storage import sha256_file
from tests.conftest import REPO

pytestmark = [pytest.mark.slow]
RUN_ID = "smoke"


def job(*args, cwd: Path, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {}), "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "job.cli", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=1800)


@pytest.fixture(scope="module")
def published(smoke_run) -> Path:
    """The smoke job, published to a local folder: LOCATION (the run is LOCATION/smoke)."""
    proc, location = smoke_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    return location


def copy_of(published: Path, tmp_path: Path) -> Path:
    location = tmp_path / "runs"
    shutil.copytree(published, location)
    return location


def refresh_checksums(run_dir: Path) -> None:
    """What a store that lost the bytes but kept a consistent manifest would hold: only the gates can tell now."""
    manifest = json.loads((run_dir / "manifest.json").read_text())
    for entry in manifest["files"]:
        entry["sha256"] = sha256_file(run_dir / entry["path"])
        entry["bytes"] = (run_dir / entry["path"]).stat().st_size
    (run_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))


def verify(location: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    return job("verify", f"{location}/{RUN_ID}", "--json", cwd=tmp_path, env_extra={"JOB_WORK_DIR": str(tmp_path / "work")})


def verdicts(proc: subprocess.CompletedProcess) -> dict[str, dict]:
    return {v["artifact"]: v for v in json.loads(proc.stdout)["artifacts"]}


def new_metadata(gguf: Path, *args: str) -> None:
    """gguf-py's own metadata rewriter, into a copy that then replaces the file."""
    rewritten = gguf.with_suffix(".new.gguf")
    subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_new_metadata", str(gguf), str(rewritten), *args, "--force"],
                   check=True, capture_output=True)
    rewritten.replace(gguf)


def test_a_published_run_passes_job_verify_with_its_figures(published, tmp_path):
    proc = verify(published, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = verdicts(proc)
    assert set(found) == {"merged", "gguf/q4_k_m", "gguf/q8_0"}
    for v in found.values():
        assert v["verdict"] == "pass" and v["mean_kld"] <= v["threshold"]["max_mean_kld"], v
    # the same figures the run published
    manifest = json.loads((published / RUN_ID / "manifest.json").read_text())
    published_figures = {v["artifact"]: v["mean_kld"] for v in manifest["verification"]["artifacts"]}
    for name, v in found.items():
        assert v["mean_kld"] == pytest.approx(published_figures[name], rel=0.05, abs=1e-4)
    table = job("verify", f"{published}/{RUN_ID}", cwd=tmp_path, env_extra={"JOB_WORK_DIR": str(tmp_path / "work")})
    assert table.returncode == 0 and "gguf/q8_0" in table.stdout and "pass" in table.stdout


def test_a_file_that_no_longer_matches_the_manifest_is_refused(published, tmp_path):
    location = copy_of(published, tmp_path)
    with open(location / RUN_ID / "adapter" / "adapter_config.json", "a") as fh:
        fh.write(" ")
    proc = verify(location, tmp_path)
    assert proc.returncode == 4
    assert verdicts(proc)["adapter/adapter_config.json"]["verdict"] == "fail"


def test_a_gguf_whose_eos_is_an_ordinary_token_is_refused(published, tmp_path, smoke_tokenizer):
    location = copy_of(published, tmp_path)
    gguf = location / RUN_ID / "gguf" / f"{RUN_ID}-q8_0.gguf"
    ordinary = smoke_tokenizer.convert_tokens_to_ids("Ġthe")
    new_metadata(gguf, "--special-token-by-id", "eos", str(ordinary))
    refresh_checksums(location / RUN_ID)
    proc = verify(location, tmp_path)
    assert proc.returncode == 4, proc.stderr[-2000:]
    found = verdicts(proc)
    assert found["gguf/q8_0"]["verdict"] == "fail" and "eos id" in " ".join(found["gguf/q8_0"]["problems"])
    assert found["gguf/q4_k_m"]["verdict"] == "pass"
    assert "gguf/q8_0" in proc.stderr


def test_a_gguf_with_overwritten_tensor_bytes_is_refused(published, tmp_path):
    from gguf import GGUFReader

    location = copy_of(published, tmp_path)
    gguf = location / RUN_ID / "gguf" / f"{RUN_ID}-q8_0.gguf"
    tensor = next(t for t in GGUFReader(gguf).tensors if t.name == "blk.10.ffn_down.weight")
    block = bytes(range(256)) * 256  # 64 KiB of a repeating pattern over the tensor's q8_0 blocks
    with open(gguf, "r+b") as fh:
        fh.seek(tensor.data_offset + 4096)
        fh.write(block)
    refresh_checksums(location / RUN_ID)
    proc = verify(location, tmp_path)
    assert proc.returncode == 4, proc.stderr[-2000:]
    found = verdicts(proc)
    assert found["gguf/q8_0"]["verdict"] == "fail" and "KL divergence" in " ".join(found["gguf/q8_0"]["problems"])
    assert found["gguf/q4_k_m"]["verdict"] == "pass"


def test_merged_weights_with_one_tensor_zeroed_are_refused(published, tmp_path):
    from safetensors.torch import load_file, save_file

    location = copy_of(published, tmp_path)
    weights = location / RUN_ID / "merged" / "model.safetensors"
    tensors = load_file(weights)
    tensors["model.layers.10.self_attn.o_proj.weight"].zero_()
    save_file(tensors, weights, metadata={"format": "pt"})
    refresh_checksums(location / RUN_ID)
    proc = verify(location, tmp_path)
    assert proc.returncode == 4, proc.stderr[-2000:]
    assert verdicts(proc)["merged"]["verdict"] == "fail"


def test_a_merge_with_the_lora_scale_doubled_is_refused(published, tmp_path, smoke_model_dir):
    import torch
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    location = copy_of(published, tmp_path)
    run_dir = location / RUN_ID
    base = AutoModelForCausalLM.from_pretrained(smoke_model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, run_dir / "adapter")
    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.scaling = {name: 2 * value for name, value in module.scaling.items()}
    model.merge_and_unload().to(torch.bfloat16).save_pretrained(run_dir / "merged", safe_serialization=True)
    refresh_checksums(run_dir)
    proc = verify(location, tmp_path)
    assert proc.returncode == 4, proc.stderr[-2000:]
    assert verdicts(proc)["merged"]["verdict"] == "fail"


def test_a_gguf_written_with_the_wrong_pre_tokenizer_is_refused(published, tmp_path):
    location = copy_of(published, tmp_path)
    gguf = location / RUN_ID / "gguf" / f"{RUN_ID}-q4_k_m.gguf"
    # SmolLM2's is 'smollm' (gpt-2's and starcoder's splits give it the same tokens); llama3's keeps a newline apart
    # from the indentation after it
    new_metadata(gguf, "--pre-tokenizer", "llama3")
    refresh_checksums(location / RUN_ID)
    proc = verify(location, tmp_path)
    assert proc.returncode == 4, proc.stderr[-2000:]
    found = verdicts(proc)
    assert found["gguf/q4_k_m"]["verdict"] == "fail"
    assert "llama.cpp tokenizes" in " ".join(found["gguf/q4_k_m"]["problems"])
    assert found["gguf/q8_0"]["verdict"] == "pass"


def test_a_tokenizer_the_gguf_would_mangle_stops_the_run_before_training(smoke_model_dir, tmp_path):
    """A normalizer that llama.cpp does not apply (curly apostrophes to straight ones): the converter accepts the
    tokenizer (its fingerprint text has no curly quote), and every GGUF made from it would tokenize "It’s" apart from
    the model that was trained."""
    model_dir = tmp_path / "model"
    shutil.copytree(smoke_model_dir, model_dir)
    tokenizer_file = model_dir / "tokenizer.json"
    body = json.loads(tokenizer_file.read_text())
    body["normalizer"] = {"type": "Replace", "pattern": {"String": "’"}, "content": "'"}
    tokenizer_file.write_text(json.dumps(body))
    proc = job("run", "--spec", str(REPO / "examples" / "smoke.yaml"), "--set", f"model.name={model_dir}",
               "--set", f"run.output={tmp_path / 'runs'}", cwd=tmp_path, env_extra={"JOB_WORK_DIR": str(tmp_path / "work")})
    assert proc.returncode == 2, proc.stderr[-3000:]
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert not any(e["event"] == "train.step" for e in events)
    assert "llama.cpp tokenizes" in proc.stderr and "Hugging Face tokenizer gives" in proc.stderr
    assert not (tmp_path / "runs" / RUN_ID / "manifest.json").exists()
