"""Publish a run: every artifact first, `manifest.json` last. A run is complete only when its manifest exists."""

from __future__ import annotations

import json
import time
from importlib import metadata
from pathlib import Path

from job import log
from job.storage import LocalStorage, S3Storage, sha256_file

MANIFEST = "manifest.json"
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


def publish(staging: Path, store: LocalStorage | S3Storage, run_id: str, body: dict) -> dict:
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
    manifest = {**body, "run_id": run_id, "files": files, "published_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    store.put_bytes(manifest_key, json.dumps(manifest, indent=2).encode())
    events.info("publish.finished", destination=f"{store.uri}/{run_id}", uploaded=sent, unchanged=skipped,
                seconds=round(time.monotonic() - started, 2))
    return manifest

