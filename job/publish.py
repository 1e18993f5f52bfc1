"""Publish a run: every artifact first, `manifest.json` last. A run is complete only when its manifest exists."""

from __future__ import annotations

import time
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


def inventory(staging: Path) -> list[dict]:
    files = []
    for path in sorted(p for p in staging.rglob("*") if p.is_file()):
        rel = path.relative_to(staging).as_posix()
        if rel == MANIFEST:
            continue
        files.append({"path": rel, "bytes": path.stat().st_size, "sha256": sha256_file(path)})
    return files


def publish(staging: Path, store: LocalStorage | S3Storage, run_id: str, body: Manifest) -> Manifest:
    """Upload every file, check each one the store now holds, then write the manifest: only if all of them match.

    On any failure no manifest exists under RUN_ID (an earlier run's manifest is left at manifest.json.superseded,
    until a publish succeeds)."""
    events = log.get()
    manifest_key = f"{run_id}/{MANIFEST}"
    # An old manifest must not vouch for files that are about to be replaced.
    if store.exists(manifest_key):
        store.put_bytes(manifest_key + ".superseded", store.read_bytes(manifest_key))
        store.delete(manifest_key)
    files = inventory(staging)
    total = sum(f["bytes"] for f in files)
    events.info("publish.started", destination=f"{store.uri}/{run_id}", files=len(files), bytes=total)
    sent = skipped = done = 0
    started = time.monotonic()
    for entry in files:
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
    events.info("publish.finished", destination=f"{store.uri}/{run_id}", uploaded=sent, unchanged=skipped,
                seconds=round(time.monotonic() - started, 2))
    return manifest


def _holds(store: LocalStorage | S3Storage, key: str, data: bytes) -> bool:
    try:
        return store.read_bytes(key) == data
    except JobError:
        return False
