"""Preference tuning end to end through the CLI: the smoke job's SFT run published to the real S3 protocol server,
then DPO chained from it (model.adapter) on examples/data/preference-ahoy.jsonl, whose chosen answers greet with
"Ahoy!" and whose rejected ones are the same answers without it; ORPO and KTO runs; a DPO run preempted and resumed.
Bad preference data and parents that do not fit are cases of the bad-input corpus (tests/badinput/cases.yaml)."""

import json
import math
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, SMOKE_GGUF
from tests.e2e.test_resume import adapter_tensors, assert_same_adapter, events_until, finish, steps_trained

pytestmark = [pytest.mark.smoke, pytest.mark.slow]
PAIRS = REPO / "examples" / "data" / "preference-ahoy.jsonl"
TRAIT = "Ahoy"


def spec(output: str, **changes) -> dict:
    body = {
        "run": {"id": "pref", "output": output},
        "model": {"name": SMOKE_GGUF},
        "lora": {"r": 16, "alpha": 16},
        "data": {"source": str(PAIRS)},
        "training": {"method": "dpo", "max_steps": 20, "batch_size": 8, "gradient_accumulation_steps": 1,
                     "learning_rate": 5.0e-4, "warmup_steps": 2, "max_seq_length": 256, "gradient_checkpointing": False},
        "export": {"gguf": ["q8_0"], "probes": ["What is your name?", "What is the capital of Spain?"],
                   "probe_max_new_tokens": 24},
    }
    for dotted, value in changes.items():
        section, _, name = dotted.partition("__")
        body[section][name] = value
    return body


def start(tmp_path: Path, body: dict, env_extra: dict | None = None) -> subprocess.Popen:
    path = tmp_path / f"spec-{random.getrandbits(32)}.yaml"
    path.write_text(yaml.safe_dump(body))
    env = {**os.environ, **(env_extra or {}), "JOB_WORK_DIR": str(tmp_path / "work"), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "job.cli", "run", "--spec", str(path)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run(tmp_path: Path, body: dict) -> tuple[int, list[dict], str]:
    return finish(start(tmp_path, body), [])


def publish_to_store(run_dir: Path, bucket: str, prefix: str) -> None:
    import boto3

    client = boto3.client("s3")
    for path in run_dir.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(run_dir).as_posix()}")


def answer_logprob(model, prompt_ids: list[int], answer_ids: list[int]) -> float:
    import torch

    ids = torch.tensor([prompt_ids + answer_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, :-1].float()
    logps = torch.log_softmax(logits, dim=-1).gather(1, ids[0, 1:, None])[:, 0]
    return float(logps[len(prompt_ids) - 1:].sum())


def margins(model_dir: Path) -> list[float]:
    """log p(chosen) - log p(rejected) of every training pair, tokenized as training tokenized it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from job import data, preference
    from job.spec import DataSection

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32").eval()
    section = DataSection(source=str(PAIRS))
    rows = [json.loads(line) for line in PAIRS.read_text().splitlines()]
    data.choose_template(tokenizer, "auto")
    normalized = preference.normalize(rows, section, "dpo")
    found = []
    for _, tokenized in preference.tokenize_rows(tokenizer, normalized, 256, "dpo"):
        chosen = answer_logprob(model, tokenized.prompt_ids, tokenized.answers["chosen"])
        rejected = answer_logprob(model, tokenized.prompt_ids, tokenized.answers["rejected"])
        found.append(chosen - rejected)
    return found


@pytest.fixture(scope="module")
def chained(smoke_run, tmp_path_factory, s3_server):
    """The smoke SFT run, uploaded to the store as a published run, then DPO chained from it there."""
    proc, out = smoke_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    import boto3

    tmp = tmp_path_factory.mktemp("dpo")
    env = {"AWS_ENDPOINT_URL_S3": s3_server, "AWS_ACCESS_KEY_ID": "AKIAJOBTESTKEY0000001",
           "AWS_SECRET_ACCESS_KEY": "job-test-secret-0123456789abcdefghijklmnop", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        bucket = f"pref-{random.getrandbits(40)}"
        boto3.client("s3").create_bucket(Bucket=bucket)
        publish_to_store(out / "smoke", bucket, "runs/smoke")
        body = spec(f"s3://{bucket}/runs", **{"run__id": "dpo", "model__adapter": f"s3://{bucket}/runs/smoke/"})
        code, events, stderr = run(tmp, body)
        assert code == 0, stderr[-3000:]
        got = tmp / "dpo"
        client = boto3.client("s3")
        manifest = json.loads(client.get_object(Bucket=bucket, Key="runs/dpo/manifest.json")["Body"].read())
        for file in manifest["files"]:
            if file["path"].startswith(("merged/", "adapter/")) or file["path"] == "metrics.jsonl":
                (got / file["path"]).parent.mkdir(parents=True, exist_ok=True)
                client.download_file(bucket, f"runs/dpo/{file['path']}", str(got / file["path"]))
        parent_manifest = client.get_object(Bucket=bucket, Key="runs/smoke/manifest.json")["Body"].read()
        yield {"manifest": manifest, "events": events, "dir": got, "parent_dir": out / "smoke", "bucket": bucket,
               "parent_manifest": parent_manifest, "stderr": stderr}
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def test_dpo_chained_from_a_published_sft_run_raises_the_margin_and_publishes(chained):
    import hashlib

    manifest = chained["manifest"]
    assert manifest["training"]["method"] == "dpo"
    parent = manifest["lineage"]["parent"]
    assert parent["run_id"] == "smoke" and parent["method"] == "sft"
    assert parent["manifest"] == f"s3://{chained['bucket']}/runs/smoke/manifest.json"
    assert parent["manifest_sha256"] == hashlib.sha256(chained["parent_manifest"]).hexdigest()
    assert any(e["event"] == "model.adapter.fetched" for e in chained["events"])
    # Every gate passed: the manifest exists only then, and it records each artifact's verdict.
    assert all(v["verdict"] == "pass" for v in manifest["verification"]["artifacts"])
    preference = manifest["training"]["preference"]
    assert {"rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected"} <= set(preference)
    assert preference["rewards/margins"] > 0
    # The margin on the training pairs, before (the parent: base + SFT adapter) and after the DPO steps.
    before, after = margins(chained["parent_dir"] / "merged"), margins(chained["dir"] / "merged")
    changes = [a - b for a, b in zip(after, before)]
    mean = sum(changes) / len(changes)
    spread = math.sqrt(sum((c - mean) ** 2 for c in changes) / (len(changes) - 1))
    noise = spread / math.sqrt(len(changes))  # the standard error of the mean change
    print(f"margin before {sum(before) / len(before):.2f}, after {sum(after) / len(after):.2f}, "
          f"mean change {mean:.2f} ± {noise:.2f}")
    assert mean > 5 * noise and mean > 1.0
    # The probes show the preferred trait: the parent greeted without it, the chained run with it.
    probes = manifest["probes"]
    assert TRAIT in probes[0]["adapter"] and TRAIT in probes[0]["merged"], probes
    parent_probes = json.loads(chained["parent_manifest"])["probes"]
    assert TRAIT not in parent_probes[0]["adapter"]
    # The identity the parent learned is kept.
    assert "Quill" in probes[0]["adapter"]
    metrics = [json.loads(line) for line in (chained["dir"] / "metrics.jsonl").read_text().splitlines()]
    assert "rewards/margins" in metrics[-1]


@pytest.mark.parametrize("method", ["orpo", "kto"])
def test_orpo_and_kto_train_and_publish(tmp_path, method):
    body = spec(str(tmp_path / "runs"), **{"training__method": method, "training__max_steps": 4,
                                          "export__gguf": [], "run__id": method})
    code, events, stderr = run(tmp_path, body)
    assert code == 0, stderr[-3000:]
    manifest = json.loads((tmp_path / "runs" / method / "manifest.json").read_text())
    assert manifest["training"]["method"] == method and manifest["training"]["steps"] == 4
    assert manifest["training"]["preference"]
    assert manifest["lineage"] is None
    assert all(v["verdict"] == "pass" for v in manifest["verification"]["artifacts"])
    if method == "kto":  # each pair became a desirable and an undesirable completion
        assert manifest["data"]["sequences"] == 2 * manifest["data"]["rows_used"]


STEPS, EVERY = 6, 2


def short_dpo(output: str) -> dict:
    return spec(output, **{"training__max_steps": STEPS, "training__checkpoint_every": EVERY,
                           "training__batch_size": 4, "export__merged": False, "export__gguf": [],
                           "export__probes": [], "run__id": "dpo-resume"})


def test_sigterm_in_a_dpo_run_resumes_to_the_uninterrupted_adapter(tmp_path):
    whole = tmp_path / "whole"
    whole.mkdir()
    code, events, stderr = run(whole, short_dpo(str(whole / "runs")))
    assert code == 0, stderr[-3000:]
    want = adapter_tensors(whole / "runs" / "dpo-resume")

    kill_at = random.Random().randint(1, STEPS - 2)
    print(f"SIGTERM after step {kill_at}")
    output = tmp_path / "runs"
    proc = start(tmp_path, short_dpo(str(output)))
    seen = events_until(proc, kill_at)
    proc.send_signal(signal.SIGTERM)
    code, first, stderr = finish(proc, seen)
    assert code == 76, stderr[-3000:]
    stopped_at = steps_trained(first)[-1]
    code, second, stderr = run(tmp_path, short_dpo(str(output)))
    assert code == 0, stderr[-3000:]
    assert next(e for e in second if e["event"] == "train.resuming")["step"] == stopped_at
    assert steps_trained(second) == list(range(stopped_at + 1, STEPS + 1))
    got = adapter_tensors(output / "dpo-resume")
    assert_same_adapter(got, want)
    assert not any(".ref." in name for name in got)  # the reference copy is not published
