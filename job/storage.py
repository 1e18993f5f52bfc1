"""Local directories and s3:// locations behind one small interface.

S3 goes through boto3's transfer manager (multipart and parallel above a threshold). Endpoint, region and
credentials come from the spec or from the standard AWS chain (env, profile, IRSA, instance role); nothing
here reads or logs a credential.

Under faults: every request is retried by botocore's `standard` retry mode (5xx, throttling with a longer backoff,
connection errors, with a retry quota). `adaptive` mode adds a client-side rate limiter that the AWS SDK reference
calls appropriate only for specialised cases; one job talks to one bucket, so standard's backoff is enough.
What botocore cannot retry, because it happens after a call returned, is retried here around the whole step
(an upload, a download, a read): a response body cut off mid-stream, a checksum that does not match after the
transfer, a multipart upload that failed as a whole. Exhausted retries end in TransientError (exit 75);
a missing bucket, key or permission in NotFoundError (exit 3), never retried.

Checksums end to end: uploads carry S3 flexible checksums (SHA256; S3 rejects a body that does not match) and our
own sha256 in the object metadata; every upload is checked afterwards (HEAD: size, metadata, and the stored
SHA256 checksum, recomputed locally part by part for multipart objects); downloads and reads are checked against
the sha256 we know. A failed multipart upload is aborted (s3transfer does it; we abort any the failure left).
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import os
import random
import shutil
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from job import log
from job.errors import NotFoundError, SpecError, TransientError, network_reason

MULTIPART_THRESHOLD = 64 * 1024 * 1024
_NOT_FOUND_CODES = {"NoSuchBucket", "NoSuchKey", "404", "NotFound", "AccessDenied", "403", "InvalidAccessKeyId",
                    "SignatureDoesNotMatch"}
# 4xx answers that a retry can mend: throttling, a timed-out request, a clock or a token that is renewed meanwhile,
# and a multipart upload completed by an earlier attempt whose answer was lost (the whole upload is sent again).
_TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "TooManyRequests", "RequestTimeout",
                    "RequestTimeTooSkewed", "ExpiredToken", "TokenRefreshRequired", "NoSuchUpload"}
T = TypeVar("T")


def sha256_file(path: Path, chunk: int = 8 * 1024 * 1024) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://") :].partition("/")
    return bucket, key


@dataclass
class S3Settings:
    """Where the store is (from the spec), and how hard to try: production defaults; tests shrink them."""

    endpoint_url: str | None = None
    region: str | None = None
    request_attempts: int = 8  # per request, botocore's standard mode, the first try included
    step_attempts: int = 3  # per whole step (upload, download, read), ours, around botocore's
    backoff_seconds: float = 1.0  # ours: full jitter over min(cap, base * 2**retry)
    max_backoff_seconds: float = 30.0
    connect_timeout: float = 10.0
    read_timeout: float = 120.0
    multipart_threshold: int = MULTIPART_THRESHOLD
    multipart_chunksize: int = MULTIPART_THRESHOLD
    max_concurrency: int = 8


class ChecksumMismatch(Exception):
    """Bytes moved but are not the bytes we meant: retried like a network error."""


class LocalStorage:
    def __init__(self, root: str):
        self.root = Path(root)
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root.resolve() not in (path, *path.parents):
            raise SpecError(f"key {key!r} escapes the output location {self.root}")
        return path

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def read_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError as exc:
            raise NotFoundError(f"no file {self._path(key)}") from exc

    def list(self, prefix: str = "") -> list[str]:
        base = self._path(prefix) if prefix else self.root.resolve()
        if not base.exists():
            return []
        root = self.root.resolve()
        return sorted(str(p.relative_to(root)) for p in base.rglob("*") if p.is_file())

    def upload_file(self, local: Path, key: str, sha256: str) -> bool:
        """Copy unless an identical file is already there. Returns whether bytes were written."""
        target = self._path(key)
        if target.is_file() and target.stat().st_size == local.stat().st_size and sha256_file(target) == sha256:
            return False
        target.parent.mkdir(parents=True, exist_ok=True)
        # A fresh name that copyfile creates itself, with the umask's mode: a NamedTemporaryFile's 0600 would follow the
        # file through the rename and leave artifacts on a shared volume unreadable to anyone else.
        tmp_path = target.with_name(f".partial-{uuid.uuid4().hex[:12]}-{target.name}")
        try:
            shutil.copyfile(local, tmp_path)
            os.replace(tmp_path, target)
        finally:
            tmp_path.unlink(missing_ok=True)
        return True

    def put_bytes(self, key: str, data: bytes) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".partial-{target.name}")
        tmp.write_bytes(data)
        os.replace(tmp, target)

    def download_file(self, key: str, local: Path, sha256: str | None = None) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self._path(key), local)
        if sha256 and sha256_file(local) != sha256:
            local.unlink()
            raise TransientError(f"{self._path(key)} does not match sha256 {sha256}", hint="was it replaced meanwhile?")

    def mismatch(self, key: str, local: Path, sha256: str) -> str | None:
        """Why the stored object is not `local` (whose sha256 is given), or None if it is."""
        target = self._path(key)
        if not target.is_file():
            return "missing"
        if target.stat().st_size != local.stat().st_size:
            return f"{target.stat().st_size} bytes stored, {local.stat().st_size} expected"
        return None if sha256_file(target) == sha256 else "stored bytes do not match the sha256"

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)


class S3Storage:
    def __init__(self, uri: str, settings: S3Settings):
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.uri = uri.rstrip("/")
        self.bucket, self.prefix = split_s3(self.uri)
        self.settings = settings
        self.client = boto3.client(
            "s3",
            endpoint_url=settings.endpoint_url,
            region_name=settings.region,
            config=Config(
                # total_max_attempts counts the first try; botocore's `max_attempts` key would count retries only.
                retries={"mode": "standard", "total_max_attempts": settings.request_attempts},
                connect_timeout=settings.connect_timeout,
                read_timeout=settings.read_timeout,
                max_pool_connections=max(10, settings.max_concurrency + 2),
            ),
        )
        # "classic" is s3transfer, whose retries and abort-on-failure are the ones tested here (not the CRT client).
        self.transfer = TransferConfig(
            multipart_threshold=settings.multipart_threshold,
            multipart_chunksize=settings.multipart_chunksize,
            max_concurrency=settings.max_concurrency,
            preferred_transfer_client="classic",
        )
        self._composites: dict[tuple, str] = {}

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _where(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def _retrying(self, what: str, step: Callable[[], T]) -> T:
        """Run a whole step, retrying transient failures with exponential backoff and full jitter."""
        attempts = max(1, self.settings.step_attempts)
        for attempt in range(1, attempts + 1):
            try:
                return step()
            except Exception as exc:  # noqa: BLE001 - sorted into our error kinds below
                error = classify(exc, what)
                if error is None:
                    raise
                if not isinstance(error, TransientError) or attempt == attempts:
                    if error is exc:
                        raise
                    raise error from exc
                ceiling = min(self.settings.max_backoff_seconds, self.settings.backoff_seconds * 2 ** (attempt - 1))
                delay = random.uniform(0, ceiling)
                log.get().warning("storage.retry", what=what, attempt=attempt, of=attempts, error=str(error),
                                  delay_seconds=round(delay, 2))
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _head(self, key: str) -> dict | None:
        from botocore.exceptions import ClientError

        try:
            return self.client.head_object(Bucket=self.bucket, Key=self._key(key), ChecksumMode="ENABLED")
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    def exists(self, key: str) -> bool:
        return self._retrying(self._where(key), lambda: self._head(key) is not None)

    def read_bytes(self, key: str) -> bytes:
        def read() -> bytes:
            # botocore checks the body against the object's stored checksum (single-part objects); we check our sha256.
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            data = response["Body"].read()
            expected = response.get("Metadata", {}).get("sha256")
            if expected and hashlib.sha256(data).hexdigest() != expected:
                raise ChecksumMismatch(f"read {len(data)} bytes that do not match the object's sha256 {expected}")
            return data

        return self._retrying(self._where(key), read)

    def list(self, prefix: str = "") -> list[str]:
        full = self._key(prefix) if prefix else (f"{self.prefix}/" if self.prefix else "")
        strip = f"{self.prefix}/" if self.prefix else ""

        def list_all() -> list[str]:
            keys = []
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
                keys.extend(obj["Key"][len(strip) :] for obj in page.get("Contents", []))
            # Zero-byte "folder" markers (a console's "Create folder") are no files: the local store lists none either.
            return sorted(k for k in keys if k and not k.endswith("/"))

        return self._retrying(f"s3://{self.bucket}/{full}", list_all)

    def _composite_sha256(self, local: Path, size: int) -> str:
        """S3's checksum of a multipart object: sha256 over the parts' sha256 digests, with our part size."""
        from s3transfer.utils import ChunksizeAdjuster

        part = ChunksizeAdjuster().adjust_chunksize(self.transfer.multipart_chunksize, size)
        cache_key = (str(local), size, local.stat().st_mtime_ns, part)
        if cache_key not in self._composites:
            digests = hashlib.sha256()
            with open(local, "rb") as fh:
                while block := fh.read(part):
                    digests.update(hashlib.sha256(block).digest())
            self._composites[cache_key] = base64.b64encode(digests.digest()).decode()
        return self._composites[cache_key]

    def _mismatch(self, head: dict | None, local: Path, sha256: str) -> str | None:
        if head is None:
            return "missing"
        size = local.stat().st_size
        if head.get("ContentLength") != size:
            return f"{head.get('ContentLength')} bytes stored, {size} expected"
        if head.get("Metadata", {}).get("sha256") != sha256:
            return "its sha256 metadata differs"
        stored = head.get("ChecksumSHA256")
        if stored:
            # S3 verified this checksum against the bytes it received; for a multipart object it covers each part.
            stored = stored.split("-")[0]
            full = base64.b64encode(bytes.fromhex(sha256)).decode()
            multipart = size >= self.transfer.multipart_threshold
            if stored != full and not (multipart and stored == self._composite_sha256(local, size)):
                return "its stored SHA256 checksum does not match the local file"
        return None

    def mismatch(self, key: str, local: Path, sha256: str) -> str | None:
        """Why the stored object is not `local` (whose sha256 is given), or None if it is. One HEAD."""
        return self._retrying(self._where(key), lambda: self._mismatch(self._head(key), local, sha256))

    def _abort_pending(self, key: str) -> None:
        """Abort every multipart upload pending at this key. s3transfer aborts the upload it knows when it fails, but
        that abort can fail too, and an upload whose CreateMultipartUpload answer was lost (botocore then creates
        another) is known to no one."""

        def abort_all() -> None:
            pending = self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=self._key(key)).get("Uploads", [])
            for upload in pending:
                if upload["Key"] == self._key(key):
                    self.client.abort_multipart_upload(Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"])
                    log.get().info("storage.multipart_aborted", key=self._where(key))

        try:
            self._retrying(f"abort uploads to {self._where(key)}", abort_all)
        except (TransientError, NotFoundError) as exc:  # the bucket's lifecycle rule is the backstop
            log.get().warning("storage.multipart_abort_failed", key=self._where(key), error=str(exc))

    def upload_file(self, local: Path, key: str, sha256: str) -> bool:
        """Upload unless an identical object is already there, then check what the store holds.

        Returns whether bytes were sent."""
        size = local.stat().st_size  # a missing local file is our bug, not the store's: raised before any retrying
        sent = False

        def upload() -> bool:
            nonlocal sent
            if self._mismatch(self._head(key), local, sha256) is None:
                return sent  # already there: identical from an earlier run, or an earlier attempt landed
            sent = True
            try:
                self.client.upload_file(
                    str(local), self.bucket, self._key(key), Config=self.transfer,
                    ExtraArgs={"Metadata": {"sha256": sha256}, "ChecksumAlgorithm": "SHA256"},
                )
            finally:
                if size >= self.transfer.multipart_threshold:
                    self._abort_pending(key)
            if problem := self._mismatch(self._head(key), local, sha256):
                raise ChecksumMismatch(f"after upload, the stored object is wrong: {problem}")
            return True

        return self._retrying(f"upload to {self._where(key)}", upload)

    def put_bytes(self, key: str, data: bytes) -> None:
        sha256 = hashlib.sha256(data).hexdigest()
        self._retrying(self._where(key), lambda: self.client.put_object(
            Bucket=self.bucket, Key=self._key(key), Body=data, Metadata={"sha256": sha256}, ChecksumAlgorithm="SHA256"
        ))

    def download_file(self, key: str, local: Path, sha256: str | None = None) -> None:
        """Download and check against `sha256`, else against the sha256 in the object's metadata if it has one."""
        local.parent.mkdir(parents=True, exist_ok=True)

        def download() -> None:
            head = self._head(key)
            if head is None:
                raise NotFoundError(f"{self._where(key)}: no such object")
            self.client.download_file(self.bucket, self._key(key), str(local), Config=self.transfer)
            expected = sha256 or head.get("Metadata", {}).get("sha256")
            if expected and sha256_file(local) != expected:
                local.unlink()
                raise ChecksumMismatch(f"downloaded bytes do not match sha256 {expected}")

        self._retrying(self._where(key), download)

    def delete(self, key: str) -> None:
        self._retrying(f"delete {self._where(key)}", lambda: self.client.delete_object(Bucket=self.bucket, Key=self._key(key)))


def classify(exc: BaseException, what: str) -> NotFoundError | TransientError | SpecError | None:
    """Our error kind for a storage failure, or None for anything else (a bug, a local file problem)."""
    import urllib3
    from boto3.exceptions import RetriesExceededError, S3UploadFailedError
    from botocore import exceptions as boto
    from s3transfer.exceptions import RetriesExceededError as TransferRetriesExceededError
    from s3transfer.exceptions import S3DownloadFailedError

    if isinstance(exc, (NotFoundError, TransientError, SpecError)):
        return exc
    if isinstance(exc, S3UploadFailedError) and exc.__context__ is not None:
        exc = exc.__context__  # boto3 wraps the ClientError in a message; the code is in the original
    if isinstance(exc, (RetriesExceededError, TransferRetriesExceededError)):
        exc = exc.last_exception or exc
    if isinstance(exc, boto.ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in _NOT_FOUND_CODES:
            return NotFoundError(f"{what}: {code}", hint="check the bucket name, the key and that the credentials may access it")
        detail = f"{what}: {code or exc}: {error.get('Message', '')}".rstrip(": ")
        if isinstance(status, int) and 300 <= status < 500 and status not in (408, 429) and code not in _TRANSIENT_CODES:
            # The store refused the request itself (another region, an unsupported feature): it would refuse it again.
            return SpecError(detail, hint="check run.output, run.endpoint_url and run.region (or AWS_REGION) for this store")
        return TransientError(detail)
    if isinstance(exc, (boto.NoCredentialsError, boto.PartialCredentialsError)):
        return NotFoundError(f"{what}: no usable AWS credentials", hint="set the standard AWS env or role")
    if isinstance(exc, boto.ParamValidationError):
        return SpecError(f"{what}: {exc}", hint="check the bucket and key in run.output (or the s3:// URI)")
    transient = (boto.ConnectionError, boto.HTTPClientError, boto.IncompleteReadError, boto.FlexibleChecksumError,
                 boto.ChecksumError, boto.CredentialRetrievalError, urllib3.exceptions.HTTPError, http.client.HTTPException,
                 ConnectionError, TimeoutError, ChecksumMismatch, S3DownloadFailedError, S3UploadFailedError,
                 RetriesExceededError, TransferRetriesExceededError)
    if isinstance(exc, transient):
        return TransientError(f"{what}: {network_reason(exc) if isinstance(exc, OSError) else exc}")
    return None


def open_location(uri: str, settings: S3Settings | None = None) -> LocalStorage | S3Storage:
    if uri.startswith("s3://"):
        return S3Storage(uri, settings or S3Settings())
    return LocalStorage(uri)


def read_uri(uri: str, settings: S3Settings | None = None) -> bytes:
    """Read one object: a local path, s3://bucket/key or http(s)://."""
    if uri.startswith("s3://"):
        bucket, key = split_s3(uri)
        if not key:
            raise SpecError(f"{uri} names a bucket, not an object")
        return S3Storage(f"s3://{bucket}", settings or S3Settings()).read_bytes(key)
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri, timeout=60) as resp:  # noqa: S310 - the user's own spec URL
                return resp.read()
        except urllib.error.HTTPError as exc:
            if exc.code >= 500 or exc.code in (408, 429):  # the server's trouble or its rate limit: a retry may pass
                raise TransientError(f"{uri}: HTTP {exc.code}") from exc
            raise NotFoundError(f"{uri}: HTTP {exc.code}") from exc
        except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as exc:
            raise TransientError(f"cannot read {uri}: {network_reason(exc)}") from exc
    try:
        return Path(uri).read_bytes()
    except (FileNotFoundError, IsADirectoryError) as exc:
        raise NotFoundError(f"no file {uri}") from exc
    except PermissionError as exc:
        raise NotFoundError(f"{uri}: permission denied", hint="make the file readable by the user job runs as") from exc
