"""Object storage under faults, at the storage/publish level: boto3 → fault proxy → moto server.

The promise: a publish ends with a complete, correct manifest, or fails (TransientError, exit 75) with no manifest;
never a manifest that points at missing or wrong bytes. Reads survive the same faults, and a failed or interrupted
multipart upload leaves no pending upload behind.
"""

from __future__ import annotations

import json
import os
import signal
import threading

import pytest

from job import publish
from job.errors import EXIT_TRANSIENT, TransientError
from job.storage import S3Settings, S3Storage, read_uri, sha256_file
from tests.faults.conftest import assert_complete_and_correct, pending_uploads, stored
from tests.faults.proxy import Fault

PART = 5 * 1024 * 1024  # S3's smallest part
# Production's limits, shrunk so that a test gives up in seconds: 4 tries per request (botocore), 3 per step (ours).
FAST = S3Settings(request_attempts=4, step_attempts=3, backoff_seconds=0.05, max_backoff_seconds=0.5, connect_timeout=2,
                  read_timeout=2, multipart_threshold=PART, multipart_chunksize=PART, max_concurrency=4)


def make_staging(tmp_path, big_bytes: int = 12 * 1024 * 1024) -> tuple:
    """Small files plus one file above the multipart threshold (three parts)."""
    files = {
        "adapter/adapter_config.json": b'{"r": 16}',
        "adapter/adapter_model.safetensors": os.urandom(300_000),
        "metrics.jsonl": b'{"step": 1, "loss": 2.5}\n',
        "README.md": b"# model card\n",
    }
    if big_bytes:
        files["merged/model.safetensors"] = os.urandom(big_bytes)
    staging = tmp_path / "staging"
    for path, data in files.items():
        (staging / path).parent.mkdir(parents=True, exist_ok=True)
        (staging / path).write_bytes(data)
    return staging, files


def test_publish_through_intermittent_faults_is_complete_and_correct(tmp_path, bucket, proxy, direct):
    staging, files = make_staging(tmp_path)
    # A lost answer to CreateMultipartUpload: botocore creates a second upload, and the first is known to no one.
    proxy.add(Fault.DROP_RESPONSE, method="POST", match="?uploads", times=1)
    proxy.add(Fault.CORRUPT_REQUEST, method="PUT", match="partNumber=2", times=1)  # caught by the composite checksum
    proxy.add(Fault.DELAY, method="PUT", match="partNumber=3", times=1, seconds=3)  # past the 2 s read timeout
    proxy.add(Fault.SLOW_DOWN, method="PUT", times=1)
    proxy.add(Fault.DROP_REQUEST, every=7)
    proxy.add(Fault.DROP_RESPONSE, every=5)
    proxy.add(Fault.HTTP_500, every=4)
    proxy.add(Fault.HTTP_503, every=9)
    proxy.add(Fault.DELAY, every=6, seconds=0.2)

    manifest = publish.publish(staging, S3Storage(f"s3://{bucket}/runs", FAST), "r1", {"status": "complete"})

    assert_complete_and_correct(direct, bucket, "runs/r1", files)
    assert manifest == json.loads(stored(direct, bucket, "runs/r1/manifest.json"))
    for fault in ("corrupt_request", "delay", "slow_down", "drop_request", "drop_response", "http_500", "http_503"):
        assert proxy.injected[fault] >= 1, (fault, proxy.injected)


def test_an_object_lost_after_its_upload_blocks_the_manifest(tmp_path, bucket, s3_env, direct):
    """Each object is checked again once all are up: one deleted meanwhile (a lifecycle rule, a concurrent cleanup)
    must not end up in a manifest."""
    staging, _ = make_staging(tmp_path, big_bytes=0)

    class LosingStore(S3Storage):
        def upload_file(self, local, key, sha256):
            sent = super().upload_file(local, key, sha256)
            if key.endswith("metrics.jsonl"):
                direct.delete_object(Bucket=bucket, Key="runs/r1/README.md")
            return sent

    with pytest.raises(TransientError) as failure:
        publish.publish(staging, LosingStore(f"s3://{bucket}/runs", FAST), "r1", {"status": "complete"})

    assert "README.md: missing" in str(failure.value)
    assert stored(direct, bucket, "runs/r1/manifest.json") is None


def test_persistent_faults_fail_transient_and_leave_no_manifest(tmp_path, bucket, proxy, direct):
    staging, files = make_staging(tmp_path)
    store = S3Storage(f"s3://{bucket}/runs", FAST)
    earlier = publish.publish(staging, store, "r1", {"status": "complete"})  # an earlier complete run, no faults
    (staging / "merged" / "model.safetensors").write_bytes(os.urandom(12 * 1024 * 1024))  # this run replaces it
    proxy.add(Fault.HTTP_503, method="PUT", match="partNumber=")  # every part upload fails, for good

    with pytest.raises(TransientError) as failure:
        publish.publish(staging, store, "r1", {"status": "complete"})

    assert failure.value.exit_code == EXIT_TRANSIENT and "merged/model.safetensors" in str(failure.value)
    assert stored(direct, bucket, "runs/r1/manifest.json") is None
    # The earlier manifest was moved aside, and still describes the bytes that are there (the upload never landed).
    assert json.loads(stored(direct, bucket, "runs/r1/manifest.json.superseded")) == earlier
    for entry in earlier["files"]:
        assert stored(direct, bucket, f"runs/r1/{entry['path']}") == files[entry["path"]]
    assert pending_uploads(direct, bucket) == []
    assert proxy.injected["http_503"] >= 3 * FAST.request_attempts  # every try of every step was refused


def test_unreachable_store_fails_transient_with_no_manifest(tmp_path, bucket, proxy, direct):
    staging, _ = make_staging(tmp_path, big_bytes=0)
    proxy.add(Fault.DROP_REQUEST)  # the store is gone

    with pytest.raises(TransientError) as failure:
        publish.publish(staging, S3Storage(f"s3://{bucket}/runs", FAST), "r1", {"status": "complete"})

    assert failure.value.exit_code == EXIT_TRANSIENT
    assert direct.list_objects_v2(Bucket=bucket).get("KeyCount") == 0


@pytest.mark.parametrize("fault, published", [(Fault.DROP_REQUEST, False), (Fault.DROP_RESPONSE, True)])
def test_a_manifest_write_that_never_answers(tmp_path, bucket, proxy, direct, fault, published):
    """Lost requests: no manifest and exit 75. Lost answers to a write that landed: the run is published."""
    staging, files = make_staging(tmp_path, big_bytes=0)
    proxy.add(fault, method="PUT", match="manifest.json")

    if published:
        publish.publish(staging, S3Storage(f"s3://{bucket}/runs", FAST), "r1", {"status": "complete"})
        assert_complete_and_correct(direct, bucket, "runs/r1", files)
    else:
        with pytest.raises(TransientError):
            publish.publish(staging, S3Storage(f"s3://{bucket}/runs", FAST), "r1", {"status": "complete"})
        assert stored(direct, bucket, "runs/r1/manifest.json") is None
    assert proxy.injected[fault.value] == FAST.step_attempts * FAST.request_attempts


def test_a_failed_multipart_upload_is_aborted_even_when_the_first_abort_fails(tmp_path, bucket, proxy, direct):
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(12 * 1024 * 1024))
    proxy.add(Fault.HTTP_500, method="PUT", match="partNumber=2")  # the upload can never complete
    # s3transfer's own abort of the first attempt is lost: only our cleanup can remove that upload.
    proxy.add(Fault.DROP_REQUEST, method="DELETE", match="uploadId=", times=FAST.request_attempts)

    with pytest.raises(TransientError):
        S3Storage(f"s3://{bucket}", FAST).upload_file(big, "runs/big.bin", "0" * 64)

    assert proxy.injected["drop_request"] == FAST.request_attempts
    assert sum(1 for method, target in proxy.requests if method == "POST" and target.endswith("?uploads")) == 3
    assert pending_uploads(direct, bucket) == []
    assert stored(direct, bucket, "runs/big.bin") is None


def test_an_upload_interrupted_by_sigterm_is_aborted_and_not_retried(tmp_path, bucket, proxy, direct):
    """The CLI's SIGTERM handler, outside the training loop, raises Interrupted: the upload must end at once (not be
    retried as a transient failure while the pod's grace period runs out) and abort its multipart upload."""
    from job.errors import Interrupted
    from job.train import StopRequest

    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(12 * 1024 * 1024))
    proxy.add(Fault.DELAY, method="PUT", match="partNumber=", seconds=1.5)
    previous = signal.signal(signal.SIGTERM, StopRequest().on_sigterm)
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM))
    try:
        timer.start()
        with pytest.raises(Interrupted):
            S3Storage(f"s3://{bucket}", FAST).upload_file(big, "runs/big.bin", "0" * 64)
    finally:
        timer.cancel()
        signal.signal(signal.SIGTERM, previous)

    assert sum(1 for method, target in proxy.requests if method == "POST" and target.endswith("?uploads")) == 1
    assert pending_uploads(direct, bucket) == []
    assert stored(direct, bucket, "runs/big.bin") is None


def test_reads_survive_intermittent_faults(tmp_path, bucket, proxy, direct, monkeypatch):
    from job.model import fetch
    from job.spec import ModelSection

    spec_text = b"run: {id: r}\nmodel: {name: x}\ndata: {source: s3://b/k.jsonl}\n"
    rows = b"".join(json.dumps({"text": f"row {i}"}).encode() + b"\n" for i in range(2000))
    weights = os.urandom(12 * 1024 * 1024)
    direct.put_object(Bucket=bucket, Key="specs/run.yaml", Body=spec_text)  # as a user uploads: no sha256 of ours
    direct.put_object(Bucket=bucket, Key="data/train.jsonl", Body=rows)
    direct.put_object(Bucket=bucket, Key="models/tiny/config.json", Body=b'{"model_type": "llama"}')
    weights_path = tmp_path / "w.safetensors"
    weights_path.write_bytes(weights)
    # A model an earlier run published: multipart, with our sha256 in its metadata.
    S3Storage(f"s3://{bucket}/models/tiny", FAST).upload_file(weights_path, "model.safetensors", sha256_file(weights_path))
    proxy.add(Fault.DROP_MID_BODY, method="GET", every=4)
    for key in ("train.jsonl", "model.safetensors"):  # object bodies; a flipped byte in a listing is not a fault S3 has
        proxy.add(Fault.CORRUPT_RESPONSE, method="GET", match=key, times=1)
    proxy.add(Fault.HTTP_503, every=4)
    proxy.add(Fault.DROP_REQUEST, every=5)
    proxy.add(Fault.SLOW_DOWN, times=1)

    assert read_uri(f"s3://{bucket}/specs/run.yaml", FAST) == spec_text
    assert read_uri(f"s3://{bucket}/data/train.jsonl", FAST) == rows
    fetched = fetch(ModelSection(name=f"s3://{bucket}/models/tiny"), tmp_path / "cache", FAST)
    assert (fetched.path / "model.safetensors").read_bytes() == weights
    assert (fetched.path / "config.json").read_bytes() == b'{"model_type": "llama"}'
    for fault in ("drop_mid_body", "corrupt_response", "http_503", "drop_request", "slow_down"):
        assert proxy.injected[fault] >= 1, (fault, proxy.injected)
