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


def test_local_output_files_get_the_mode_the_umask_gives_any_new_file(tmp_path):
    # A shared volume's model server, running as another user, must be able to read what was published.
    store = LocalStorage(tmp_path / "out")
    publish.publish(make_staging(tmp_path), store, "r1", {"status": "complete"})
    umask = os.umask(0o022)
    os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "out" / "r1").rglob("*") if p.is_file()}
    assert set(modes) == {"adapter_config.json", "metrics.jsonl", "manifest.json"}
    assert set(modes.values()) == {0o666 & ~umask}, modes


def test_folder_markers_are_not_objects(s3_env, bucket):
    import boto3

    client = boto3.client("s3")
    for key in ("models/smol/", "models/smol/sub/", "models/smol/config.json"):  # a console's "Create folder" markers
        client.put_object(Bucket=bucket, Key=key, Body=b"{}" if key.endswith(".json") else b"")
    assert S3Storage(f"s3://{bucket}/models/smol", S3Settings()).list() == ["config.json"]


@pytest.mark.parametrize(("status", "code", "kind"), [
    (404, "NoSuchKey", "not_found"),
    (403, "AccessDenied", "not_found"),
    (400, "InvalidArgument", "spec"),  # e.g. a store that does not support the checksum sent
    (400, "AuthorizationHeaderMalformed", "spec"),  # the wrong region for the endpoint
    (301, "PermanentRedirect", "spec"),
    (400, "RequestTimeout", "transient"),
    (400, "ExpiredToken", "transient"),  # a web-identity token renewed by the next attempt
    (404, "NoSuchUpload", "transient"),  # a multipart upload an earlier attempt completed: sent again whole
    (429, "TooManyRequests", "transient"),
    (503, "SlowDown", "transient"),
    (500, "InternalError", "transient"),
])
def test_storage_errors_keep_their_kind(status, code, kind):
    from botocore.exceptions import ClientError

    from job.storage import classify

    error = ClientError({"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")
    assert classify(error, "s3://b/k").kind == kind


def test_a_request_botocore_refuses_before_sending_is_a_spec_error():
    from botocore.exceptions import ParamValidationError

    from job.storage import classify

    assert classify(ParamValidationError(report="Invalid bucket name \"a b\""), "s3://a b/k").kind == "spec"


def test_http_reads_retry_only_what_a_retry_can_mend(tmp_path):
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from job.errors import TransientError
    from job.storage import read_uri

    class Answer(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/hang-up":  # the connection closed before any answer
                self.close_connection = True
                return
            status, promised = (200, "10") if self.path == "/cut-short" else (int(self.path.strip("/")), "2")
            self.send_response(status)
            self.send_header("Content-Length", promised)  # /cut-short: the body ends 8 bytes early
            self.end_headers()
            self.wfile.write(b"ok")
            self.close_connection = True

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert read_uri(f"{base}/200") == b"ok"
        for status in (429, 500, 503):
            with pytest.raises(TransientError, match=f"HTTP {status}"):
                read_uri(f"{base}/{status}")
        for status in (401, 403, 404):
            with pytest.raises(NotFoundError, match=f"HTTP {status}"):
                read_uri(f"{base}/{status}")
        # a dropped connection, a body cut short: the network's trouble, worth the retry an orchestrator makes
        for path in ("hang-up", "cut-short"):
            with pytest.raises(TransientError, match=f"{base}/{path}"):
                read_uri(f"{base}/{path}")
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(TransientError, match="refused"):  # nobody listens there any more
        read_uri(f"{base}/200")


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


def test_early_uploads_are_not_sent_twice_and_a_failed_run_deletes_them(tmp_path, s3_env, bucket):
    store = S3Storage(f"s3://{bucket}", S3Settings())
    staging = make_staging(tmp_path)
    (staging / "merged").mkdir()
    (staging / "merged" / "model.safetensors").write_bytes(b"w" * 4096)
    publish.publish(staging, store, "r1", {"status": "complete"})  # an earlier, complete run of the same id

    early = publish.EarlyUploads(store, "r1", staging)
    assert not store.exists("r1/manifest.json"), "the old manifest no longer vouches for files about to change"
    (staging / "merged" / "model.safetensors").write_bytes(b"v" * 4096)
    early.send(staging / "merged")
    assert early.wait() == {"merged/model.safetensors": publish.sha256_file(staging / "merged" / "model.safetensors")}
    assert store.read_bytes("r1/merged/model.safetensors") == b"v" * 4096
    early.discard()  # the run failed after the upload: nothing it sent stays
    assert not store.exists("r1/merged/model.safetensors") and not store.exists("r1/manifest.json")

    recorded = RecordingStorage(tmp_path / "local")
    early = publish.EarlyUploads(recorded, "r2", staging)
    early.send(staging / "merged")
    manifest = publish.publish(staging, recorded, "r2", {"status": "complete"}, early)
    assert recorded.writes.count("r2/merged/model.safetensors") == 1 and recorded.writes[-1] == "r2/manifest.json"
    assert {f["path"] for f in manifest["files"]} >= {"merged/model.safetensors", "metrics.jsonl"}
