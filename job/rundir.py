"""The run folder, OUTPUT/RUN_ID/: the names of the files that decide a run's state and the records job writes
there, declared and written here and read through here by `job runs`, `job verify`, the summary and the model card.

OUTPUT/RUN_ID/manifest.json      complete: a Manifest, written last by publish (every other file is checked first)
OUTPUT/RUN_ID/failure.json       failed: a Failure, the attempt's first error; removed when a retry starts
OUTPUT/RUN_ID/checkpoints/step-N/checkpoint.json   incomplete: checkpoints only (job.checkpoint)

A manifest wins over a failure record (a retried run that then published is complete), and a failure record over
checkpoints.
"""

from __future__ import annotations

import json
import time
from typing import Any, TypedDict

from job.errors import JobError

MANIFEST = "manifest.json"
FAILURE = "failure.json"
METRICS = "metrics.jsonl"
SPEC = "spec.yaml"


class File(TypedDict):
    path: str  # relative to OUTPUT/RUN_ID/
    bytes: int
    sha256: str


class Manifest(TypedDict, total=False):
    status: str  # "complete"
    run_id: str
    published_at: str  # UTC, ISO 8601
    spec: dict[str, Any]  # the resolved spec, secrets masked
    model: dict[str, Any]  # source, description, trust_remote_code
    data: dict[str, Any]  # rows kept and dropped, tokens, template; "eval" when evaluated
    training: dict[str, Any]  # backend, precision, resolved settings, steps, first/final loss, seconds, tokens/s,
    # method, preference (a preference method's rewards and log-probabilities at the last logged step)
    lineage: dict[str, Any] | None  # {"parent": job.lineage.Parent.as_dict()} for a run chained by model.adapter
    export: dict[str, Any]  # merge_method, gguf_types, llama_cpp {commit, source}
    verification: dict[str, Any]  # job.verify.Verification.as_dict()
    probes: list[dict[str, Any]]  # greedy answers: a sample to read, never a gate
    versions: dict[str, str]
    timings_seconds: dict[str, float]  # per stage
    files: list[File]  # every published file but the manifest, with its sha256


class Failure(TypedDict, total=False):
    status: str  # "failed"
    error: str  # the JobError's kind, or "bug"
    message: str
    exit_code: int
    stage: str
    time: str  # UTC, ISO 8601
    rank: int  # under torchrun only


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def failure_record(exc: Exception, stage: str, rank: int | None = None) -> Failure:
    error = exc if isinstance(exc, JobError) else None
    record = Failure(status="failed", error=error.kind if error else "bug",
                     message=str(exc) if error else f"{type(exc).__name__}: {exc}",
                     exit_code=error.exit_code if error else 1, stage=stage, time=utc_now())
    if rank is not None:
        record["rank"] = rank
    return record


def write_failure(store, run_id: str, record: Failure, *, unless_recorded: bool = False) -> None:
    """`unless_recorded`: keep a record already there (under torchrun the first rank's failure is the cause)."""
    key = f"{run_id}/{FAILURE}"
    if unless_recorded and store.exists(key):
        return
    store.put_bytes(key, json.dumps(record, indent=2).encode())


def clear_failure(store, run_id: str) -> None:
    store.delete(f"{run_id}/{FAILURE}")


def read_manifest(store, run_id: str) -> Manifest | None:
    key = f"{run_id}/{MANIFEST}"
    return json.loads(store.read_bytes(key)) if store.exists(key) else None


def encode(record: Manifest | Failure) -> bytes:
    return json.dumps(record, indent=2).encode()
