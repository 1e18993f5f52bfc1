"""Resumable checkpoints in the output location: RUN_ID/checkpoints/step-NNNNNNNN/ with its own checkpoint.json.

A checkpoint is the Trainer's own checkpoint folder (adapter, optimizer, scheduler, RNG states, trainer state; the
data position follows from the step and the seeded sampler) plus our metrics so far. checkpoint.json is written last
and lists every file with its sha256, so a checkpoint cut off halfway through its upload is never picked.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

from job import log
from job.errors import SpecError
from job.storage import LocalStorage, S3Storage, sha256_file

PREFIX = "checkpoints"
RECORD = "checkpoint.json"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


@dataclass
class Checkpoint:
    step: int
    key: str  # RUN_ID/checkpoints/step-NNNNNNNN
    record: dict


def _key(run_id: str, step: int) -> str:
    return f"{run_id}/{PREFIX}/step-{step:08d}"


def complete(store: LocalStorage | S3Storage, run_id: str) -> list[Checkpoint]:
    """Every checkpoint whose record exists, oldest first."""
    found = []
    for key in store.list(f"{run_id}/{PREFIX}/"):
        parts = key.split("/")
        if len(parts) == 4 and parts[3] == RECORD and (match := _STEP_DIR.match(parts[2])):
            record = json.loads(store.read_bytes(key))
            found.append(Checkpoint(step=int(match.group(1)), key="/".join(parts[:3]), record=record))
    return sorted(found, key=lambda c: c.step)


def latest(store: LocalStorage | S3Storage, run_id: str) -> Checkpoint | None:
    found = complete(store, run_id)
    return found[-1] if found else None


def check_compatible(checkpoint: Checkpoint, fingerprint: str, world_size: int) -> None:
    """A checkpoint resumes only the run that wrote it, with the same number of processes."""
    record = checkpoint.record
    if record.get("fingerprint") != fingerprint:
        raise SpecError(
            f"checkpoint at step {checkpoint.step} ({checkpoint.key}) was written by a different spec "
            "(model, lora, data or training changed)",
            hint="restore the spec it was written with, or give this run a new run.id",
        )
    if record.get("world_size", 1) != world_size:
        raise SpecError(
            f"checkpoint at step {checkpoint.step} was written by {record.get('world_size', 1)} process(es); "
            f"this run has {world_size}: the data order and the per-process batch would change",
            hint=f"restart with {record.get('world_size', 1)} process(es), or give this run a new run.id",
        )


def download(store: LocalStorage | S3Storage, checkpoint: Checkpoint, dest: Path) -> Path:
    """Fetch a checkpoint into dest (verifying every file's sha256) and return dest."""
    events = log.get()
    dest.mkdir(parents=True, exist_ok=True)
    for entry in checkpoint.record["files"]:
        # storage checks the bytes against the record's sha256 and retries a mismatch before giving up (exit 75)
        store.download_file(f"{checkpoint.key}/{entry['path']}", dest / entry["path"], sha256=entry["sha256"])
    events.info("checkpoint.downloaded", step=checkpoint.step, files=len(checkpoint.record["files"]))
    return dest


def upload(store: LocalStorage | S3Storage, run_id: str, local_dir: Path, step: int, meta: dict) -> str:
    """Upload one checkpoint folder, its record last; then drop the older checkpoints."""
    events = log.get()
    started = time.monotonic()
    key = _key(run_id, step)
    files = []
    for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(local_dir).as_posix()
        digest = sha256_file(path)
        store.upload_file(path, f"{key}/{rel}", digest)
        files.append({"path": rel, "bytes": path.stat().st_size, "sha256": digest})
    record = {**meta, "step": step, "files": files, "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    store.put_bytes(f"{key}/{RECORD}", json.dumps(record, indent=2).encode())
    events.info("checkpoint.saved", step=step, destination=f"{store.uri}/{key}", files=len(files),
                bytes=sum(f["bytes"] for f in files), seconds=round(time.monotonic() - started, 2))
    for older in complete(store, run_id):
        if older.step < step:
            remove(store, older)
    return key


def remove(store: LocalStorage | S3Storage, checkpoint: Checkpoint) -> None:
    # The record goes first: from then on the checkpoint is incomplete and never picked, whatever is left of it.
    store.delete(f"{checkpoint.key}/{RECORD}")
    for key in store.list(f"{checkpoint.key}/"):
        store.delete(key)


def remove_all(store: LocalStorage | S3Storage, run_id: str) -> None:
    for checkpoint in complete(store, run_id):
        remove(store, checkpoint)
    for key in store.list(f"{run_id}/{PREFIX}/"):
        store.delete(key)
