"""boto3 → fault-injecting proxy (127.0.0.1) → moto server; the oracle reads moto directly, past the proxy."""

from __future__ import annotations

import hashlib
import json

import pytest

from tests.faults.proxy import FaultProxy


@pytest.fixture
def proxy(s3_server, bucket, monkeypatch):
    """A proxy in front of the S3 server, and the standard AWS environment pointed at it (the bucket already exists)."""
    with FaultProxy(s3_server) as fault_proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", fault_proxy.url)
        yield fault_proxy


@pytest.fixture
def direct(s3_server, s3_env):
    """A client that talks to the S3 server itself: what is really stored."""
    import boto3

    return boto3.client("s3", endpoint_url=s3_server)


def stored(direct, bucket: str, key: str) -> bytes | None:
    try:
        return direct.get_object(Bucket=bucket, Key=key)["Body"].read()
    except direct.exceptions.NoSuchKey:
        return None


def pending_uploads(direct, bucket: str) -> list[str]:
    return [u["Key"] for u in direct.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]


def assert_complete_and_correct(direct, bucket: str, run_prefix: str, expected_files: dict[str, bytes]) -> dict:
    """The manifest exists, lists exactly the expected files, and every listed object holds bytes matching its sha256."""
    manifest = json.loads(stored(direct, bucket, f"{run_prefix}/manifest.json"))
    assert {f["path"] for f in manifest["files"]} == set(expected_files)
    for entry in manifest["files"]:
        body = stored(direct, bucket, f"{run_prefix}/{entry['path']}")
        assert body is not None, entry["path"]
        assert len(body) == entry["bytes"] and hashlib.sha256(body).hexdigest() == entry["sha256"], entry["path"]
        assert body == expected_files[entry["path"]], entry["path"]
    assert pending_uploads(direct, bucket) == []
    return manifest
