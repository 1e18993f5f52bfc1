"""Publish a run: every artifact first, `manifest.json` last. A run is complete only when its manifest exists.

Large artifacts may go early (EarlyUploads), while later ones are made and checked; publish() then finds them in
the store and sends only the rest. Until the manifest is written, nothing under RUN_ID vouches for them."""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from importlib import metadata
from pathlib import Path

from job import log
from job.errors import JobError, TransientError
from job.rundir import MANIFEST, Manifest, encode, utc_now
from job.storage import LocalStorage, S3Storage, sha256_file

PACKAGES = ("job", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes", "unsloth",
            "unsloth_zoo", "gguf", "boto3")


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


HASHING_THREADS = 4


def inventory(staging: Path, known: dict[str, str] | None = None) -> list[dict]:
    """Every staged file with its size and sha256; `known` holds digests already computed (by EarlyUploads). The rest
    are hashed several at once: hashlib works outside the GIL, and the merged shards and GGUFs are many GB each."""
    paths = sorted(p for p in staging.rglob("*") if p.is_file() and p.relative_to(staging).as_posix() != MANIFEST)
    known = known or {}
    with ThreadPoolExecutor(max_workers=HASHING_THREADS) as pool:
        digests = list(pool.map(lambda p: known.get(p.relative_to(staging).as_posix()) or sha256_file(p), paths))
    return [{"path": p.relative_to(staging).as_posix(), "bytes": p.stat().st_size, "sha256": digest}
            for p, digest in zip(paths, digests)]


def retire_manifest(store: LocalStorage | S3Storage, run_id: str) -> None:
    """An old manifest must not vouch for files that are about to be replaced: it moves to manifest.json.superseded
    until a publish succeeds."""
    manifest_key = f"{run_id}/{MANIFEST}"
    if store.exists(manifest_key):
        store.put_bytes(manifest_key + ".superseded", store.read_bytes(manifest_key))
        store.delete(manifest_key)


class EarlyUploads:
    """Artifacts sent while the next ones are made and checked, one at a time in a background thread (each upload is
    itself parallel: boto3's transfer manager). publish() skips what arrived intact. If the run fails, discard()
    deletes what was sent: no manifest ever vouched for it."""

    def __init__(self, store: LocalStorage | S3Storage, run_id: str, staging: Path):
        self.store, self.run_id, self.staging = store, run_id, staging
        retire_manifest(store, run_id)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="early-upload")
        self._sent: list[Future] = []
        self.digests: dict[str, str] = {}  # written by the one upload thread, read once it has stopped

    def send(self, path: Path) -> None:
        """Upload a staged file, or every file of a staged folder, in the background."""
        for file in sorted(p for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file()):
            self._sent.append(self._pool.submit(self._upload, file.relative_to(self.staging).as_posix()))

    def _upload(self, rel: str) -> None:
        started = time.monotonic()
        self.digests[rel] = sha256_file(self.staging / rel)
        self.store.upload_file(self.staging / rel, f"{self.run_id}/{rel}", self.digests[rel])
        log.get().info("publish.early_upload", path=rel, bytes=(self.staging / rel).stat().st_size,
                       seconds=round(time.monotonic() - started, 2))

    def wait(self) -> dict[str, str]:
        """Every upload done (the first failure raised); the digests computed on the way."""
        for future in self._sent:
            future.result()
        self._pool.shutdown(wait=True)
        return dict(self.digests)

    def discard(self) -> None:
        """Stop sending, and delete whatever was sent (best effort: a failure is logged, never raised)."""
        for future in self._sent:
            future.cancel()
        self._pool.shutdown(wait=True)
        for rel in self.digests:
            key = f"{self.run_id}/{rel}"
            try:
                self.store.delete(key)
            except Exception:  # noqa: BLE001 - the run's own failure is the one to report
                log.get().warning("publish.early_upload_not_removed", key=f"{self.store.uri}/{key}")


def publish(staging: Path, store: LocalStorage | S3Storage, run_id: str, body: Manifest,
            early: EarlyUploads | None = None) -> Manifest:
    """Upload every file (those `early` sent intact are skipped), check each one the store now holds, then write the
    manifest: only if all of them match.

    On any failure no manifest exists under RUN_ID (an earlier run's manifest is left at manifest.json.superseded,
    until a publish succeeds)."""
    events = log.get()
    manifest_key = f"{run_id}/{MANIFEST}"
    retire_manifest(store, run_id)
    sent_early = early.wait() if early else {}
    files = inventory(staging, sent_early)
    total = sum(f["bytes"] for f in files)
    events.info("publish.started", destination=f"{store.uri}/{run_id}", files=len(files), bytes=total)
    sent = skipped = done = 0
    started = time.monotonic()
    for entry in files:
        if entry["path"] not in sent_early:  # those are checked with the rest below
            if store.upload_file(staging / entry["path"], f"{run_id}/{entry['path']}", entry["sha256"]):
                sent += 1
            else:
                skipped += 1
        done += entry["bytes"]
        events.info("publish.progress", path=entry["path"], bytes_done=done, bytes_total=total)
    # Checked again once all are up: the manifest vouches for what the store holds now, not for what it once accepted.
    problems = {}
    for entry in files:
        if problem := store.mismatch(f"{run_id}/{entry['path']}", staging / entry["path"], entry["sha256"]):
            problems[entry["path"]] = problem
    if problems:
        events.error("publish.verify_failed", destination=f"{store.uri}/{run_id}", problems=problems)
        raise TransientError(
            f"{len(problems)} published file(s) do not match what was staged: "
            + "; ".join(f"{path}: {problem}" for path, problem in sorted(problems.items())),
            where=f"{store.uri}/{run_id}", hint="no manifest was written; rerun to publish again",
        )
    manifest = Manifest(**body, run_id=run_id, files=files, published_at=utc_now())
    data = encode(manifest)
    try:
        store.put_bytes(manifest_key, data)
    except TransientError:
        # Every answer to the write may have been lost although the write landed: then the run is published.
        if not _holds(store, manifest_key, data):
            raise
    # The earlier manifest was kept only for as long as no manifest vouched for this run's files. The run is
    # published whatever this delete answers: a failure leaves a stale copy, never a failed run.
    try:
        store.delete(manifest_key + ".superseded")
    except JobError:
        events.warning("publish.superseded_not_removed", key=f"{store.uri}/{manifest_key}.superseded")
    events.info("publish.finished", destination=f"{store.uri}/{run_id}", uploaded=sent,
                uploaded_early=len(sent_early), unchanged=skipped,
                seconds=round(time.monotonic() - started, 2))
    return manifest


def _holds(store: LocalStorage | S3Storage, key: str, data: bytes) -> bool:
    try:
        return store.read_bytes(key) == data
    except JobError:
        return False
