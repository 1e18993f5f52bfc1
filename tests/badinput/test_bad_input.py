"""The bad-input corpus (cases.yaml) through the real CLI: each case gets its exit code, an error that names
the field, row, file or URI and says what to do, and nothing published as complete.

Cases run as subprocesses in parallel, started together by one module fixture; each test waits for its own.
They fail before training: the smoke model comes from the cache (warmed once, before the subprocesses start).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from job import errors
from tests.conftest import FAKE_KEY_ID, FAKE_SECRET, REPO, _free_port

HERE = Path(__file__).resolve().parent
CASES = yaml.safe_load((HERE / "cases.yaml").read_text())
EXIT = {"user": errors.EXIT_USER, "not_found": errors.EXIT_NOT_FOUND, "transient": errors.EXIT_TRANSIENT}
DEFAULT_SETS = ["export.merged=false", "export.gguf=[]", "training.max_steps=2"]
# The kinds of bad input issue #6 names; the corpus must keep covering every one.
REQUIRED_CATEGORIES = {
    "wrong type", "unknown key", "impossible value", "missing file", "unreadable S3 object", "empty dataset",
    "rows with missing fields", "wrong format declared", "non-UTF-8", "huge rows",
    "chat template drops the assistant turn", "GGUF type unknown", "path traversal in names",
    "safetensors only", "trust_remote_code", "transient infrastructure", "secrets",
}  # fmt: skip
DENIED_BUCKET = "job-denied"


@dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr: str
    case_dir: Path
    seconds: float


@dataclass
class Context:
    root: Path
    s3_endpoint: str
    bucket: str
    denied_endpoint: str
    reader_keys: tuple[str, str]
    smoke_model_dir: Path


def fill(text: str, case_dir: Path, ctx: Context) -> str:
    return (text.replace("{case}", str(case_dir)).replace("{bucket}", ctx.bucket)
            .replace("{denied_bucket}", DENIED_BUCKET).replace("{repo}", str(REPO)))


def content(value, case_dir: Path, ctx: Context) -> bytes:
    """A file's bytes from its description in cases.yaml."""
    if isinstance(value, str):
        return fill(value, case_dir, ctx).encode()
    if "binary" in value:
        return value["binary"].encode("latin-1")
    if "fixture" in value:
        return (HERE / "files" / value["fixture"]).read_bytes()
    return (value.get("before", "") + value["repeat"] * value["times"] + value.get("after", "")).encode()


def s3_client(endpoint: str, keys: tuple[str, str] = (FAKE_KEY_ID, FAKE_SECRET)):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=keys[0], aws_secret_access_key=keys[1],
                        region_name="us-east-1")


def build_checkpoint(spec: dict, target: Path, smoke: Path) -> None:
    """The smoke checkpoint, linked file by file, with files dropped, written or config keys changed."""
    target.mkdir(parents=True)
    for item in smoke.iterdir():
        if item.name not in spec.get("drop", []):
            (target / item.name).symlink_to(item)
    if spec.get("config"):
        config = json.loads((smoke / "config.json").read_text())
        (target / "config.json").unlink()
        (target / "config.json").write_text(json.dumps({**config, **spec["config"]}))
    for name, text in spec.get("write", {}).items():
        (target / name).unlink(missing_ok=True)
        (target / name).write_text(text)


def case_env(case: dict, case_dir: Path, ctx: Context) -> dict[str, str]:
    # Nothing from the caller's shell that could change the spec or the credentials.
    inherited = {k: v for k, v in os.environ.items()
                 if not k.startswith(("JOB__", "JOB_SPEC", "AWS_", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"))}
    env = {**inherited, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "JOB_WORK_DIR": str(case_dir / "work"),
           "AWS_ENDPOINT_URL_S3": ctx.s3_endpoint, "AWS_ACCESS_KEY_ID": FAKE_KEY_ID,
           "AWS_SECRET_ACCESS_KEY": FAKE_SECRET, "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    identity = case.get("s3_identity")
    if identity:
        env["AWS_ENDPOINT_URL_S3"] = ctx.denied_endpoint
        key_id, secret = ctx.reader_keys if identity == "list-only" else ("AKIAJOBUNKNOWNKEY0001", "x" * 40)
        env.update(AWS_ACCESS_KEY_ID=key_id, AWS_SECRET_ACCESS_KEY=secret)
    env.update({k: fill(str(v), case_dir, ctx) for k, v in case.get("env", {}).items()})
    return env


def command(case: dict, case_dir: Path, ctx: Context) -> list[str]:
    spec = case.get("spec", str(REPO / "examples" / "smoke.yaml"))
    if "spec_text" in case:
        spec = str(case_dir / "spec.yaml")
        Path(spec).write_text(case["spec_text"])
    args = [sys.executable, "-m", "job.cli", case.get("command", "run")]
    if spec != "none":
        args += ["--spec", fill(spec, case_dir, ctx)]
    defaults = [] if "spec_text" in case else DEFAULT_SETS  # a spec of its own is the whole input under test
    for item in [f"run.output={case_dir / 'out'}", *defaults, *case.get("set", [])]:
        args += ["--set", fill(item, case_dir, ctx)]
    return args


def run_case(case: dict, ctx: Context) -> Outcome:
    case_dir = ctx.root / case["id"]
    case_dir.mkdir()
    for name, value in case.get("files", {}).items():
        (case_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (case_dir / name).write_bytes(content(value, case_dir, ctx))
    if case.get("s3"):
        client = s3_client(ctx.s3_endpoint)
        for key, value in case["s3"].items():
            client.put_object(Bucket=ctx.bucket, Key=key, Body=content(value, case_dir, ctx))
    if "checkpoint" in case:
        build_checkpoint(case["checkpoint"], case_dir / "model", ctx.smoke_model_dir)
    started = time.monotonic()
    proc = subprocess.run(command(case, case_dir, ctx), cwd=case_dir, env=case_env(case, case_dir, ctx),
                          capture_output=True, text=True, timeout=600)
    return Outcome(proc.returncode, proc.stdout, proc.stderr, case_dir, round(time.monotonic() - started, 1))


def wait_for_port(port: int) -> None:
    # A plain TCP probe: an HTTP request would spend one of the unauthenticated actions below.
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("moto server did not start")


@pytest.fixture(scope="module")
def denied_s3():
    """A second S3 server that checks credentials: a bucket with one object, and a user who may list it only."""
    port = _free_port()
    # moto serves this many requests before it starts checking signatures and policies: exactly the setup below.
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "5"}
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        import boto3

        url = f"http://127.0.0.1:{port}"
        client = s3_client(url)
        iam = boto3.client("iam", endpoint_url=url, aws_access_key_id=FAKE_KEY_ID, aws_secret_access_key=FAKE_SECRET,
                           region_name="us-east-1")
        client.create_bucket(Bucket=DENIED_BUCKET)
        client.put_object(Bucket=DENIED_BUCKET, Key="data/train.jsonl", Body=b'{"text": "private"}\n')
        iam.create_user(UserName="lister")
        key = iam.create_access_key(UserName="lister")["AccessKey"]
        list_only = {"Version": "2012-10-17",
                     "Statement": [{"Effect": "Allow", "Action": ["s3:ListBucket"], "Resource": "*"}]}
        iam.put_user_policy(UserName="lister", PolicyName="list-only", PolicyDocument=json.dumps(list_only))
        yield url, (key["AccessKeyId"], key["SecretAccessKey"])
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def corpus(request, tmp_path_factory, s3_server, smoke_model_dir, denied_s3):
    """Every selected case started at once on a small pool; the tests below collect the outcomes one by one."""
    bucket = f"badinput-{time.time_ns()}"
    s3_client(s3_server).create_bucket(Bucket=bucket)
    ctx = Context(tmp_path_factory.mktemp("badinput"), s3_server, bucket, denied_s3[0], denied_s3[1], smoke_model_dir)
    selected = {item.callspec.params["case"]["id"] for item in request.session.items
                if getattr(item, "originalname", None) == "test_bad_input_gets_a_clear_error_and_publishes_nothing"}
    pool = ThreadPoolExecutor(max_workers=(os.cpu_count() or 2) + 1)
    futures: dict[str, Future] = {case["id"]: pool.submit(run_case, case, ctx) for case in CASES
                                  if case["id"] in selected and not skip_reason(case)}
    yield futures, ctx
    pool.shutdown(cancel_futures=True)


def skip_reason(case: dict) -> str | None:
    if case.get("needs") == "cpu_only":
        import torch

        if torch.cuda.is_available():
            return "checks a refusal that only happens without CUDA"
    return None


def error_paragraph(stderr: str) -> str:
    start = stderr.rfind("\nerror: ") + 1 if "\nerror: " in stderr else stderr.find("error: ")
    assert start >= 0, f"no 'error:' line on stderr:\n{stderr[-2000:]}"
    return stderr[start:].strip()


def published_manifests(ctx: Context, case_dir: Path) -> list[str]:
    local = [str(p) for p in (case_dir / "out").rglob("manifest.json")] if (case_dir / "out").exists() else []
    remote = [obj["Key"] for obj in s3_client(ctx.s3_endpoint).list_objects_v2(Bucket=ctx.bucket).get("Contents", [])
              if obj["Key"].endswith("manifest.json")]
    return local + remote


def test_the_corpus_covers_every_kind_of_bad_input():
    ids = [case["id"] for case in CASES]
    assert len(ids) == len(set(ids)), "case ids must be unique"
    assert len(CASES) >= 40
    assert REQUIRED_CATEGORIES <= {case["category"] for case in CASES}
    for case in CASES:
        assert case["exit"] in EXIT and case["names"] and case["says"], case["id"]


@pytest.mark.parametrize("case", CASES, ids=[case["id"] for case in CASES])
def test_bad_input_gets_a_clear_error_and_publishes_nothing(case, corpus):
    if reason := skip_reason(case):
        pytest.skip(reason)
    futures, ctx = corpus
    outcome: Outcome = futures[case["id"]].result()
    output = outcome.stdout + outcome.stderr
    assert "Traceback" not in output, output[-3000:]
    assert outcome.returncode == EXIT[case["exit"]], \
        f"exit {outcome.returncode} after {outcome.seconds}s\n{outcome.stderr[-3000:]}"

    paragraph = error_paragraph(outcome.stderr)
    assert len(paragraph) < 1500, "an error is one paragraph, not a dump"
    for expected in case["names"] + case["says"]:
        assert fill(expected, outcome.case_dir, ctx) in paragraph, f"{expected!r} not in:\n{paragraph}"
    for secret in case.get("not_in_output", []):
        assert secret not in output
        written = [p for folder in ("out", "work") for p in (outcome.case_dir / folder).rglob("*") if p.is_file()]
        assert not [p for p in written if secret.encode() in p.read_bytes()]

    if case.get("command", "run") == "run":
        events = [json.loads(line) for line in outcome.stdout.splitlines() if line.strip()]
        assert events and events[-1]["event"] == "run.failed", outcome.stdout[-2000:]
        assert events[-1]["exit_code"] == outcome.returncode
    assert published_manifests(ctx, outcome.case_dir) == []
    for record in (outcome.case_dir / "out").rglob("failure.json") if (outcome.case_dir / "out").exists() else []:
        failure = json.loads(record.read_text())
        assert failure["status"] == "failed" and failure["exit_code"] == outcome.returncode
    for path in case.get("absent", []):
        assert not (outcome.case_dir / path).exists(), f"{path} was written outside the run's folders"

