"""Secrets (HF token from env and spec, AWS keys and session token) never reach logs, published files, the work
dir, failure records or rendered Kubernetes manifests: each test hands a run the secret values and greps all it wrote.

tests/e2e/test_smoke.py greps the full smoke run's logs and published files for the AWS keys; this file adds the HF
token (env and model.token), the session token, the work dir, a failed run's failure.json, `job validate` and
`job k8s render`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import FAKE_KEY_ID, FAKE_SECRET, REPO

HF_SECRET = "hf_jobSecretsTestEnvToken0123456789abcd"
SPEC_SECRET = "hf_jobSecretsTestSpecToken9876543210zyx"
SESSION_SECRET = "job-test-session-token-0123456789abcdefghij"
SECRETS = (FAKE_KEY_ID, FAKE_SECRET, HF_SECRET, SPEC_SECRET, SESSION_SECRET)
SHORT_RUN = ["--set", "training.max_steps=2", "--set", "export.merged=false", "--set", "export.gguf=[]"]


def spec_with_token(tmp_path: Path) -> Path:
    spec = yaml.safe_load((REPO / "examples" / "smoke.yaml").read_text())
    spec["model"]["token"] = SPEC_SECRET
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def job(args: list[str], tmp_path: Path, s3_env: dict | None = None, timeout: int = 900):
    env = {**os.environ, **(s3_env or {}), "HF_TOKEN": HF_SECRET, "AWS_SESSION_TOKEN": SESSION_SECRET,
           "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "JOB_WORK_DIR": str(tmp_path / "work")}
    return subprocess.run([sys.executable, "-m", "job.cli", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=timeout)


def leaks(blobs: dict[str, bytes]) -> list[tuple[str, str]]:
    return [(name, secret) for name, body in blobs.items() for secret in SECRETS if secret.encode() in body]


def files_under(folder: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in folder.rglob("*") if p.is_file() and not p.is_symlink()}


def bucket_objects(bucket: str) -> dict[str, bytes]:
    import boto3

    client = boto3.client("s3")
    keys = [obj["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for obj in page.get("Contents", [])]
    return {key: client.get_object(Bucket=bucket, Key=key)["Body"].read() for key in keys}


@pytest.mark.smoke
@pytest.mark.slow
def test_a_run_leaks_no_secret_to_logs_published_files_or_work_dir(tmp_path, s3_env, bucket):
    spec = spec_with_token(tmp_path)
    assert leaks({"the spec itself": spec.read_bytes()}) == [("the spec itself", SPEC_SECRET)]  # the grep finds one
    proc = job(["run", "--spec", str(spec), "--set", f"run.output=s3://{bucket}/runs", *SHORT_RUN],
               tmp_path, s3_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    published = bucket_objects(bucket)
    assert {f"runs/smoke/{name}" for name in ("manifest.json", "README.md", "spec.yaml", "metrics.jsonl")} <= set(published)
    assert leaks({"stdout": proc.stdout.encode(), "stderr": proc.stderr.encode()}) == []
    assert leaks(published) == []
    assert leaks(files_under(tmp_path / "work")) == []

    manifest = json.loads(published["runs/smoke/manifest.json"])
    assert manifest["spec"]["model"]["token"] == "**********"  # the spec had one, and says so without showing it
    assert manifest["model"]["trust_remote_code"] is False


def test_a_failed_run_leaks_no_secret_to_its_error_or_failure_record(tmp_path, s3_env, bucket):
    proc = job(["run", "--spec", str(spec_with_token(tmp_path)), "--set", f"run.output=s3://{bucket}/runs",
                "--set", f"data.source=s3://{bucket}/data/missing.jsonl", *SHORT_RUN], tmp_path, s3_env)
    assert proc.returncode == 3, proc.stderr[-3000:]
    published = bucket_objects(bucket)
    assert not [key for key in published if key.endswith("manifest.json")]
    assert "data.source" in json.loads(published["runs/smoke/failure.json"])["message"]  # the record the grep reads
    assert leaks({"stdout": proc.stdout.encode(), "stderr": proc.stderr.encode()}) == []
    assert leaks(published) == []
    assert leaks(files_under(tmp_path / "work")) == []


def test_validate_masks_the_spec_token(tmp_path):
    proc = job(["validate", "--spec", str(spec_with_token(tmp_path))], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(proc.stdout)["model"]["token"] == "**********"
    assert leaks({"stdout": proc.stdout.encode(), "stderr": proc.stderr.encode()}) == []


def rendered(proc) -> list[dict]:
    assert proc.returncode == 0, proc.stderr
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


@pytest.mark.parametrize("overlay", ["gke", "eks"])
def test_rendered_kubernetes_manifests_carry_no_secret_from_the_environment(tmp_path, overlay, monkeypatch):
    for name, value in {"AWS_ACCESS_KEY_ID": FAKE_KEY_ID, "AWS_SECRET_ACCESS_KEY": FAKE_SECRET}.items():
        monkeypatch.setenv(name, value)
    proc = job(["k8s", "render", str(REPO / "examples" / "smoke.yaml"), "--overlay", overlay,
                "--set", "run.output=s3://bucket/runs", "--sweep", "lora.r=8,16"], tmp_path)
    docs = rendered(proc)
    assert leaks({"manifests": proc.stdout.encode(), "stderr": proc.stderr.encode()}) == []
    jobs = [doc for doc in docs if doc["kind"] == "Job"]
    assert len(jobs) == 2
    for job_doc in jobs:
        env = {e["name"]: e for e in job_doc["spec"]["template"]["spec"]["containers"][0]["env"]}
        # The token reaches the pod from the optional hf-token Secret, as a file, never as a literal value.
        assert "HF_TOKEN" not in env and env["HF_TOKEN_PATH"]["value"].startswith("/var/run/secrets/")


def test_a_spec_token_is_not_copied_into_kubernetes_manifests(tmp_path):
    proc = job(["k8s", "render", str(spec_with_token(tmp_path))], tmp_path)
    assert SPEC_SECRET not in proc.stdout + proc.stderr
    assert proc.returncode == 2 and "model.token" in proc.stderr  # refused, with the field named
