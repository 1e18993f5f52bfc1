"""Local directories and s3:// locations behind one small interface.

S3 goes through boto3's transfer manager (multipart and parallel above a threshold). Endpoint, region and
credentials come from the spec or from the standard AWS chain (env, profile, IRSA, instance role); nothing
here reads or logs a credential.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from job.errors import NotFoundError, SpecError, TransientError

MULTIPART_THRESHOLD = 64 * 1024 * 1024
_NOT_FOUND_CODES = {"NoSuchBucket", "NoSuchKey", "404", "AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"}


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
    endpoint_url: str | None = None
    region: str | None = None


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
        with tempfile.NamedTemporaryFile(dir=target.parent, prefix=".partial-", delete=False) as tmp:
            tmp_path = Path(tmp.name)
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

    def download_file(self, key: str, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self._path(key), local)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)


class S3Storage:
    def __init__(self, uri: str, settings: S3Settings):
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.uri = uri.rstrip("/")
        self.bucket, self.prefix = split_s3(self.uri)
        self.client = boto3.client(
            "s3",
            endpoint_url=settings.endpoint_url,
            region_name=settings.region,
            config=Config(retries={"mode": "standard", "max_attempts": 8}, connect_timeout=10, read_timeout=120),
        )
        self.transfer = TransferConfig(
            multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_THRESHOLD, max_concurrency=8
        )

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _raise(self, exc: Exception, what: str):
        from botocore.exceptions import BotoCoreError, ClientError

        if isinstance(exc, ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in _NOT_FOUND_CODES:
                raise NotFoundError(
                    f"{what}: {code}", hint="check the bucket name, the key and that the credentials may access it"
                ) from exc
            raise TransientError(f"{what}: {code or exc}") from exc
        if isinstance(exc, BotoCoreError):
            from botocore.exceptions import NoCredentialsError

            if isinstance(exc, NoCredentialsError):
                raise NotFoundError(f"{what}: no AWS credentials found", hint="set the standard AWS env or role") from exc
            raise TransientError(f"{what}: {type(exc).__name__}: {exc}") from exc
        raise exc

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
                return False
            self._raise(exc, f"s3://{self.bucket}/{self._key(key)}")
        except Exception as exc:  # noqa: BLE001 - mapped to our error kinds
            self._raise(exc, f"s3://{self.bucket}/{self._key(key)}")

    def read_bytes(self, key: str) -> bytes:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except Exception as exc:  # noqa: BLE001
            self._raise(exc, f"s3://{self.bucket}/{self._key(key)}")

    def list(self, prefix: str = "") -> list[str]:
        full = self._key(prefix) if prefix else (f"{self.prefix}/" if self.prefix else "")
        strip = f"{self.prefix}/" if self.prefix else ""
        keys = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
                keys.extend(obj["Key"][len(strip) :] for obj in page.get("Contents", []))
        except Exception as exc:  # noqa: BLE001
            self._raise(exc, f"s3://{self.bucket}/{full}")
        return sorted(keys)

    def _remote_sha256(self, key: str, size: int) -> str | None:
        from botocore.exceptions import ClientError

        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError:
            return None
        if head.get("ContentLength") != size:
            return None
        return head.get("Metadata", {}).get("sha256")

    def upload_file(self, local: Path, key: str, sha256: str) -> bool:
        if self._remote_sha256(key, local.stat().st_size) == sha256:
            return False
        try:
            self.client.upload_file(
                str(local), self.bucket, self._key(key), ExtraArgs={"Metadata": {"sha256": sha256}}, Config=self.transfer
            )
        except Exception as exc:  # noqa: BLE001
            self._raise(exc, f"upload to s3://{self.bucket}/{self._key(key)}")
        return True

    def put_bytes(self, key: str, data: bytes) -> None:
        try:
            self.client.put_object(
                Bucket=self.bucket, Key=self._key(key), Body=data, Metadata={"sha256": hashlib.sha256(data).hexdigest()}
            )
        except Exception as exc:  # noqa: BLE001
            self._raise(exc, f"s3://{self.bucket}/{self._key(key)}")

    def download_file(self, key: str, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.client.download_file(self.bucket, self._key(key), str(local), Config=self.transfer)
        except Exception as exc:  # noqa: BLE001
            self._raise(exc, f"s3://{self.bucket}/{self._key(key)}")


    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as exc:  # noqa: BLE001
            self._raise(exc, f"delete s3://{self.bucket}/{self._key(key)}")


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
            raise NotFoundError(f"{uri}: HTTP {exc.code}") from exc
        except (urllib.error.URLError, TimeoutError) as exc:
            raise TransientError(f"{uri}: {exc}") from exc
    try:
        return Path(uri).read_bytes()
    except (FileNotFoundError, IsADirectoryError) as exc:
        raise NotFoundError(f"no file {uri}") from exc
