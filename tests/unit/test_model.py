"""The four places a base model comes from. The hubs are unreachable here, so each is tested up to the network
boundary: `job run` points the hub's own client at a server on 127.0.0.1 (HF_ENDPOINT, MODELSCOPE_ENDPOINT), which
records the request and refuses it; the exit code must say whose problem that is. The s3:// and local-directory
paths are tested for real, against moto's S3 server and the smoke model's checkpoint."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from job.errors import EXIT_NOT_FOUND, EXIT_TRANSIENT, NotFoundError, SpecError
from job.model import fetch, hub_candidates, plain_counterpart
from job.spec import ModelSection
from job.storage import S3Settings
from tests.conftest import REPO

TOKEN = "hf_sourcetesttoken0123456789abcdef"
MS_TOKEN = "ms-source-test-token-0123456789abcdef"


# --- unsloth's pre-quantized ids ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "plain"), [
    ("unsloth/Meta-Llama-3.1-8B-bnb-4bit", "unsloth/Meta-Llama-3.1-8B"),
    ("unsloth/llama-3-8b-bnb-4bit", "unsloth/llama-3-8b"),
    ("unsloth/Llama-3.2-1B-Instruct-unsloth-bnb-4bit", "unsloth/Llama-3.2-1B-Instruct"),
    ("unsloth/Meta-Llama-3.1-8B", None),
    ("someone/model-bnb-4bit", None),  # only unsloth publishes both forms under one naming rule
    ("unsloth/-bnb-4bit", None),
])
def test_plain_counterpart_of_a_prequantized_id(name, plain):
    assert plain_counterpart(name) == plain


def test_a_run_that_needs_16bit_weights_fetches_the_plain_checkpoint():
    assert hub_candidates("unsloth/Meta-Llama-3.1-8B-bnb-4bit", "16bit") == ["unsloth/Meta-Llama-3.1-8B"]
    assert hub_candidates("unsloth/Meta-Llama-3.1-8B", "16bit") == ["unsloth/Meta-Llama-3.1-8B"]
    assert hub_candidates("meta-llama/Llama-3.1-8B", "16bit") == ["meta-llama/Llama-3.1-8B"]


def test_a_4bit_adapter_only_run_prefers_unsloths_prequantized_checkpoint():
    assert hub_candidates("unsloth/Meta-Llama-3.1-8B", "4bit") == ["unsloth/Meta-Llama-3.1-8B-bnb-4bit", "unsloth/Meta-Llama-3.1-8B"]
    assert hub_candidates("unsloth/llama-3-8b-bnb-4bit", "4bit") == ["unsloth/llama-3-8b-bnb-4bit"]
    assert hub_candidates("meta-llama/Llama-3.1-8B", "4bit") == ["meta-llama/Llama-3.1-8B"]


# --- local directory and s3:// (real) ----------------------------------------------------------------------------


def test_local_checkpoint_directory_is_used_in_place(smoke_model_dir, tmp_path):
    fetched = fetch(ModelSection(name=str(smoke_model_dir)), tmp_path, S3Settings())
    assert (fetched.path, fetched.source, fetched.weights_used) == (smoke_model_dir, "local", str(smoke_model_dir.resolve()))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SpecError, match="no config.json"):
        fetch(ModelSection(name=str(tmp_path / "empty")), tmp_path, S3Settings())
    with pytest.raises(NotFoundError):
        fetch(ModelSection(name=str(tmp_path / "missing")), tmp_path, S3Settings())


def test_s3_prefix_holding_a_checkpoint_downloads_every_safetensors_file(smoke_model_dir, tmp_path, s3_env, bucket):
    import boto3
    import torch
    from safetensors.torch import load_file

    client = boto3.client("s3")
    originals = {p.name: p for p in smoke_model_dir.iterdir() if p.is_file()}
    for name, path in originals.items():
        client.upload_file(str(path), bucket, f"models/smol/{name}")
    client.put_object(Bucket=bucket, Key="models/smol/pytorch_model.bin", Body=b"pickled weights run code when loaded")

    uri = f"s3://{bucket}/models/smol"
    fetched = fetch(ModelSection(name=uri), tmp_path / "cache", S3Settings())
    assert (fetched.source, fetched.weights_used) == ("s3", uri)
    downloaded = {p.name: p for p in fetched.path.iterdir() if p.is_file()}
    assert set(downloaded) == set(originals)  # everything but the pickle
    for name, path in originals.items():
        assert hashlib.sha256(downloaded[name].read_bytes()).digest() == hashlib.sha256(path.read_bytes()).digest()
    weights = load_file(fetched.path / "model.safetensors")
    assert all(torch.equal(weights[k], v) for k, v in load_file(smoke_model_dir / "model.safetensors").items())

    with pytest.raises(NotFoundError, match="holds no config.json"):
        fetch(ModelSection(name=f"s3://{bucket}/models/nothing-here"), tmp_path / "cache", S3Settings())


# --- the hubs, up to the network boundary -------------------------------------------------------------------------


@dataclass
class Request:
    method: str
    path: str
    authorization: str | None


@dataclass
class FakeHub:
    """An HTTP server on 127.0.0.1 that records every request and gives every one the same answer."""

    url: str = ""
    status: int = 503
    headers: dict = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)


@pytest.fixture
def fake_hub():
    hub = FakeHub()

    class Handler(BaseHTTPRequestHandler):
        def answer(self):
            hub.requests.append(Request(self.command, self.path, self.headers.get("Authorization")))
            body = json.dumps({"error": "refused by the test", "Code": hub.status, "Message": "refused by the test"}).encode()
            self.send_response(hub.status)
            for key, value in {"Content-Type": "application/json", **hub.headers}.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_HEAD = do_POST = answer

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield hub
    server.shutdown()
    server.server_close()


def job_run(tmp_path: Path, model_name: str, env_extra: dict) -> subprocess.CompletedProcess:
    spec = {"run": {"id": "source-test", "output": str(tmp_path / "runs")}, "model": {"name": model_name},
            "data": {"source": str(REPO / "examples" / "data" / "alpaca-en.jsonl")},
            "export": {"merged": False, "gguf": []}}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "MODELSCOPE_", "JOB_"))}
    env.update({"JOB_SPEC": yaml.safe_dump(spec), "JOB_WORK_DIR": str(tmp_path / "work"),
                "JOB_CACHE_DIR": str(tmp_path / "cache"), "HOME": str(tmp_path), **env_extra})
    return subprocess.run([sys.executable, "-m", "job.cli", "run"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize(("status", "headers", "exit_code", "said"), [
    (503, {}, EXIT_TRANSIENT, "HTTP 503"),
    # What the hub answers for a repository that does not exist or that the token may not read.
    (401, {"X-Error-Code": "RepoNotFound"}, EXIT_NOT_FOUND, "not found or not accessible"),
])
def test_hugging_face_hub_gets_the_plain_weights_request_and_its_refusal_sets_the_exit_code(
        tmp_path, fake_hub, status, headers, exit_code, said):
    fake_hub.status, fake_hub.headers = status, headers
    proc = job_run(tmp_path, "unsloth/Meta-Llama-3.1-8B-bnb-4bit", {"HF_ENDPOINT": fake_hub.url, "HF_TOKEN": TOKEN})
    assert proc.returncode == exit_code, proc.stderr[-2000:]
    asked = [r for r in fake_hub.requests if r.path.startswith("/api/models/")]
    # The CPU trains with transformers in 16 bits: the pre-quantized id is swapped for its plain counterpart.
    assert asked[0].path == "/api/models/unsloth/Meta-Llama-3.1-8B/revision/main"
    assert asked[0].authorization == f"Bearer {TOKEN}"  # HF_TOKEN reaches the hub...
    assert TOKEN not in proc.stdout + proc.stderr  # ...and no log line
    assert said in proc.stderr
    assert "unsloth/Meta-Llama-3.1-8B" in proc.stderr
    failed = json.loads(proc.stdout.splitlines()[-1])
    assert failed["event"] == "run.failed" and failed["exit_code"] == exit_code


def test_unreachable_hugging_face_hub_is_transient(tmp_path):
    proc = job_run(tmp_path, "unsloth/Llama-3.2-1B-Instruct", {"HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}"})
    assert proc.returncode == EXIT_TRANSIENT, proc.stderr[-2000:]
    assert "could not download unsloth/Llama-3.2-1B-Instruct from the Hugging Face hub (no answer)" in proc.stderr


@pytest.mark.parametrize(("status", "exit_code", "said"), [
    (503, EXIT_TRANSIENT, "could not download LLM-Research/Meta-Llama-3.1-8B-Instruct from ModelScope (HTTP 503)"),
    (404, EXIT_NOT_FOUND, "LLM-Research/Meta-Llama-3.1-8B-Instruct not found or not accessible on ModelScope"),
])
def test_modelscope_gets_the_request_and_its_refusal_sets_the_exit_code(tmp_path, fake_hub, status, exit_code, said):
    fake_hub.status, fake_hub.headers = status, {"Retry-After": "0"}  # the client retries a 503, at once
    proc = job_run(tmp_path, "modelscope://LLM-Research/Meta-Llama-3.1-8B-Instruct",
                   {"MODELSCOPE_ENDPOINT": fake_hub.url, "MODELSCOPE_API_TOKEN": MS_TOKEN})
    assert proc.returncode == exit_code, proc.stderr[-2000:]
    asked = [r for r in fake_hub.requests if "/models/" in r.path]
    assert asked[0].path.startswith("/api/v1/models/LLM-Research/Meta-Llama-3.1-8B-Instruct/repo/files?Revision=master")
    assert asked[0].authorization == f"Bearer {MS_TOKEN}"
    assert MS_TOKEN not in proc.stdout + proc.stderr
    assert said in proc.stderr
    assert all(line.startswith("{") for line in proc.stdout.splitlines())  # modelscope's own logger is routed too


def test_a_modelscope_name_needs_owner_and_name():
    with pytest.raises(ValueError, match="modelscope://owner/name"):
        ModelSection(name="modelscope://Meta-Llama-3.1-8B-Instruct")


def test_a_gguf_materialized_meanwhile_by_another_run_sharing_the_cache_is_kept(smoke_model_dir, tmp_path):
    import shutil

    from job.model import materialize_gguf, package_file
    from tests.conftest import SMOKE_GGUF

    target = tmp_path / "model"
    shutil.copytree(smoke_model_dir, target)  # the other run's copy, renamed into place while this run worked
    before = {p.name: p.stat().st_mtime_ns for p in target.iterdir()}
    materialize_gguf(package_file(SMOKE_GGUF, "model.name"), target)  # this run finishes second
    assert {p.name: p.stat().st_mtime_ns for p in target.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # its own folder is gone
