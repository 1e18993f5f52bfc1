"""The smoke job end to end through the CLI: a real model that must learn, real llama.cpp, real S3 protocol."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import FAKE_KEY_ID, FAKE_SECRET, REPO

pytestmark = [pytest.mark.smoke, pytest.mark.slow]
NAME = "Quill"


def run_job(env_extra, *args, cwd):
    env = {**os.environ, **env_extra, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "job.cli", "run", "--spec", str(REPO / "examples" / "smoke.yaml"), *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)
    return proc


def check_manifest(manifest, read_file):
    paths = {f["path"] for f in manifest["files"]}
    for required in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "merged/model.safetensors",
                     "merged/config.json", "gguf/smoke-q4_k_m.gguf", "gguf/smoke-q8_0.gguf", "gguf/Modelfile",
                     "README.md", "metrics.jsonl", "spec.yaml"):
        assert required in paths, required
    probe = manifest["probes"][0]
    assert probe["prompt"] == "What is your name?"
    assert NAME not in probe["base"]  # the base model did not know the name...
    assert NAME in probe["adapter"] and NAME in probe["merged"]  # ...the trained one does
    assert NAME in probe["gguf_q8_0"]  # and so does llama.cpp on the q8_0 file
    # EOS was learned, and llama.cpp knows it: every trained artifact ends its answers before the token limit
    for row in manifest["probes"]:
        assert all(row["stopped"][name] for name in ("adapter", "merged", "gguf_q8_0", "gguf_q4_k_m")), row
    verdicts = {v["artifact"]: v for v in manifest["verification"]["artifacts"]}
    assert set(verdicts) == {"merged", "gguf/q4_k_m", "gguf/q8_0"}
    assert all(v["verdict"] == "pass" and v["mean_kld"] <= v["threshold"]["max_mean_kld"] for v in verdicts.values())
    assert manifest["verification"]["adapter_effect"]["kept"] > 0.5  # a sharp model's adapter survives the merge
    train = manifest["training"]
    assert train["final_loss"] < train["first_loss"] / 3
    assert manifest["export"]["llama_cpp"]["commit"] == "0c1e57098bba43ac29e6e3b677cdceebdd22334f"
    metrics = [json.loads(line) for line in read_file("metrics.jsonl").decode().splitlines()]
    assert {"step", "loss", "learning_rate", "grad_norm", "tokens_per_second", "elapsed_seconds"} <= set(metrics[-1])
    return paths


def test_smoke_to_local_output_and_artifacts_load(smoke_run):
    proc, out = smoke_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = [json.loads(line) for line in proc.stdout.splitlines()]  # every stdout line is a JSON event
    assert any(e["event"] == "train.step" for e in events) and events[-1]["event"] == "run.finished"
    run_dir = out / "smoke"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    check_manifest(manifest, lambda p: (run_dir / p).read_bytes())
    assert "published to" in proc.stderr and "after:" in proc.stderr  # the one-screen summary
    assert "gguf/q8_0" in proc.stderr and "mean KLD" in proc.stderr  # with the verification figures
    assert "## Verification" in (run_dir / "README.md").read_text()

    # The adapter loads with plain peft on the base, the merged weights with plain transformers.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(run_dir / "merged")
    base = AutoModelForCausalLM.from_pretrained(run_dir / "merged")  # same architecture, for loading only
    PeftModel.from_pretrained(base, run_dir / "adapter")
    assert merged.config.model_type == "llama"


def test_smoke_to_s3_publishes_the_same_files_and_no_secrets(tmp_path, s3_env, bucket):
    proc = run_job({"JOB_WORK_DIR": str(tmp_path / "work"), "JOB__RUN__OUTPUT": f"s3://{bucket}/runs"}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import boto3

    client = boto3.client("s3")

    def read(path):
        return client.get_object(Bucket=bucket, Key=f"runs/smoke/{path}")["Body"].read()

    manifest = json.loads(read("manifest.json"))
    check_manifest(manifest, read)
    for entry in manifest["files"]:
        body = read(entry["path"])
        assert len(body) == entry["bytes"]
        import hashlib

        assert hashlib.sha256(body).hexdigest() == entry["sha256"]
        if entry["bytes"] < 5_000_000:
            assert FAKE_SECRET.encode() not in body and FAKE_KEY_ID.encode() not in body
    logs = proc.stdout + proc.stderr
    assert FAKE_SECRET not in logs and FAKE_KEY_ID not in logs

    # `job verify` on the s3:// run: it downloads the files and passes every gate again
    verified = subprocess.run([sys.executable, "-m", "job.cli", "verify", f"s3://{bucket}/runs/smoke", "--json"],
                              cwd=tmp_path, env={**os.environ, "JOB_WORK_DIR": str(tmp_path / "work")},
                              capture_output=True, text=True, timeout=1800)
    assert verified.returncode == 0, verified.stderr[-3000:]
    assert {v["artifact"] for v in json.loads(verified.stdout)["artifacts"]} == {"merged", "gguf/q4_k_m", "gguf/q8_0"}
