import io
import json
import os

import pytest

from job import log, publish
from job.errors import NotFoundError
from job.storage import LocalStorage, S3Settings, S3Storage, open_location, sha256_file


def make_staging(tmp_path, big_bytes=0):
    staging = tmp_path / "staging"
    (staging / "adapter").mkdir(parents=True)
    (staging / "adapter" / "adapter_config.json").write_text('{"r": 16}')
    (staging / "metrics.jsonl").write_text('{"step": 1}\n')
    if big_bytes:
        (staging / "merged.bin").write_bytes(os.urandom(big_bytes))
    return staging


def test_s3_round_trip_over_http_with_multipart(tmp_path, s3_env, bucket):
    part = 5 * 1024 * 1024  # S3's minimum part
    store = S3Storage(f"s3://{bucket}/runs", S3Settings(multipart_threshold=part, multipart_chunksize=part))
    staging = make_staging(tmp_path, big_bytes=12 * 1024 * 1024)
    manifest = publish.publish(staging, store, "r1", {"status": "complete"})
    head = store.client.head_object(Bucket=bucket, Key="runs/r1/merged.bin")
    assert head["ETag"].strip('"').endswith("-3")  # three parts: it really went multipart
    for entry in manifest["files"]:
        local = tmp_path / "back" / entry["path"]
        store.download_file(f"r1/{entry['path']}", local)
        assert sha256_file(local) == entry["sha256"] and local.stat().st_size == entry["bytes"]
    stored = json.loads(store.read_bytes("r1/manifest.json"))
    assert {f["path"] for f in stored["files"]} == {"adapter/adapter_config.json", "metrics.jsonl", "merged.bin"}


def test_identical_objects_are_not_sent_again(tmp_path, s3_env, bucket):
    store = S3Storage(f"s3://{bucket}", S3Settings())
    path = make_staging(tmp_path) / "metrics.jsonl"
    digest = sha256_file(path)
    assert store.upload_file(path, "k/metrics.jsonl", digest) is True
    assert store.upload_file(path, "k/metrics.jsonl", digest) is False
    path.write_text('{"step": 2}\n')
    assert store.upload_file(path, "k/metrics.jsonl", sha256_file(path)) is True


class RecordingStorage(LocalStorage):
    """A real local store that also remembers the order in which keys were written."""

    def __init__(self, root):
        super().__init__(root)
        self.writes = []

    def upload_file(self, local, key, sha256):
        self.writes.append(key)
        return super().upload_file(local, key, sha256)

    def put_bytes(self, key, data):
        self.writes.append(key)
        super().put_bytes(key, data)


def test_manifest_is_written_last_and_supersedes_an_old_one(tmp_path):
    store = RecordingStorage(tmp_path / "out")
    staging = make_staging(tmp_path)
    publish.publish(staging, store, "r1", {"status": "complete"})
    assert store.writes[-1] == "r1/manifest.json" and store.writes.count("r1/manifest.json") == 1
    publish.publish(staging, store, "r1", {"status": "complete"})
    # the old manifest was set aside before the first upload, and is gone once the new one vouches for the files
    second = store.writes[store.writes.index("r1/manifest.json") + 1:]
    assert second[0] == "r1/manifest.json.superseded" and second[-1] == "r1/manifest.json"
    assert not store.exists("r1/manifest.json.superseded")


def test_failed_upload_leaves_no_manifest(tmp_path, s3_env, bucket):
    store = S3Storage(f"s3://{bucket}", S3Settings())
    staging = make_staging(tmp_path)
    os.chmod(staging / "metrics.jsonl", 0)
    if os.access(staging / "metrics.jsonl", os.R_OK):  # root reads anything: make the file vanish instead
        inventory = publish.inventory(staging)
        (staging / "metrics.jsonl").unlink()
        with pytest.raises(FileNotFoundError):
            for entry in inventory:
                store.upload_file(staging / entry["path"], f"r2/{entry['path']}", entry["sha256"])
    else:
        with pytest.raises(PermissionError):
            publish.publish(staging, store, "r2", {})
    assert not store.exists("r2/manifest.json")


def test_missing_bucket_is_not_found(s3_env):
    store = open_location("s3://no-such-bucket-here/prefix", S3Settings())
    with pytest.raises(NotFoundError):
        store.list()


def test_local_keys_cannot_escape_the_output(tmp_path):
    from job.errors import SpecError

    with pytest.raises(SpecError):
        LocalStorage(tmp_path).put_bytes("../outside.txt", b"x")


def test_log_events_are_json_and_secrets_are_redacted():
    stream = io.StringIO()
    stream.isatty = lambda: False
    secret = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"
    log.setup(secrets=[secret, "short"], stream=stream)
    log.get().info("upload.failed", url=f"https://x/?sig={secret}", nested={"k": [secret]}, note="short stays")
    import logging

    logging.getLogger("transformers").warning("library line with %s", secret)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert lines[0]["event"] == "upload.failed" and lines[0]["url"] == "https://x/?sig=***"
    assert lines[0]["nested"] == {"k": ["***"]} and lines[0]["note"] == "short stays"
    assert secret not in stream.getvalue() and "***" in lines[1]["event"]
