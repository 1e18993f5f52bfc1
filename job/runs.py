"""The runs under an output location, read from what each run left there (the files of job.rundir).

A run folder with neither manifest, failure record nor checkpoint (a publish cut short) counts as incomplete.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field

import yaml

from job import verify
from job.errors import NotFoundError
from job.rundir import FAILURE, MANIFEST, METRICS, SPEC
from job.storage import LocalStorage, S3Settings, S3Storage, open_location
from job.train import PREFERENCE_METRICS

CHECKPOINT = re.compile(r"^checkpoints/step-(\d+)/checkpoint\.json$")


@dataclass
class Run:
    run_id: str
    status: str  # complete | incomplete | failed
    base_model: str | None = None
    hyperparameters: dict = field(default_factory=dict)
    steps: int | None = None
    train_loss: float | None = None
    eval_loss: float | None = None
    artifacts: list[str] = field(default_factory=list)
    checkpoints: list[int] = field(default_factory=list)  # steps, oldest first
    failure: dict | None = None
    manifest: dict | None = None  # only for `show`

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "manifest" or v is not None}


def _store(location: str, s3: S3Settings) -> LocalStorage | S3Storage:
    store = open_location(location.rstrip("/") or "/", s3)
    if isinstance(store, LocalStorage) and not store.root.is_dir():
        raise NotFoundError(f"no directory {location}", hint="pass the run.output of your runs: a local path or s3://bucket/prefix")
    return store


def list_runs(location: str, s3: S3Settings) -> list[Run]:
    store = _store(location, s3)
    by_run: dict[str, set[str]] = {}
    for key in store.list():
        run_id, sep, rest = key.partition("/")
        if sep and rest:
            by_run.setdefault(run_id, set()).add(rest)
    return [summarize(store, run_id, keys) for run_id, keys in sorted(by_run.items())]


def is_run_folder(location: str, s3: S3Settings) -> bool:
    """Whether LOCATION is one run's folder (OUTPUT/RUN_ID) rather than the output that holds runs."""
    store = _store(location, s3)
    return any(store.exists(name) for name in (MANIFEST, FAILURE)) or bool(store.list("checkpoints/"))


def find_run(location: str, run_id: str, s3: S3Settings) -> Run:
    store = _store(location, s3)
    keys = {key[len(run_id) + 1 :] for key in store.list(f"{run_id}/")}
    if not keys:
        raise NotFoundError(f"no run {run_id!r} under {location}", hint=f"`job runs list {location}` lists them")
    return summarize(store, run_id, keys, keep_manifest=True)


def summarize(store, run_id: str, keys: set[str], keep_manifest: bool = False) -> Run:
    """One run from its files' keys (relative to OUTPUT/RUN_ID/), reading only the records that decide its state."""

    def read_json(key: str) -> dict:
        return json.loads(store.read_bytes(f"{run_id}/{key}"))

    records = {int(m.group(1)): m.group(0) for m in map(CHECKPOINT.match, keys) if m}
    checkpoints = sorted(records)
    if MANIFEST in keys:
        manifest = read_json(MANIFEST)
        spec, training = manifest.get("spec") or {}, manifest.get("training") or {}
        run = Run(run_id, "complete", steps=training.get("steps"), train_loss=training.get("final_loss"),
                  eval_loss=training.get("final_eval_loss"), artifacts=_artifacts(manifest), checkpoints=checkpoints,
                  manifest=manifest if keep_manifest else None)
        if run.eval_loss is None and METRICS in keys and _has_eval(spec):
            run.eval_loss = _last_losses(store.read_bytes(f"{run_id}/{METRICS}"))[1]
    else:
        failure = read_json(FAILURE) if FAILURE in keys else None
        latest = read_json(records[checkpoints[-1]]) if checkpoints else {}
        spec = (failure or {}).get("spec") or latest.get("spec") or {}
        if not spec and SPEC in keys:
            spec = yaml.safe_load(store.read_bytes(f"{run_id}/{SPEC}")) or {}
        run = Run(run_id, "failed" if failure else "incomplete", checkpoints=checkpoints, failure=failure,
                  steps=latest.get("step", checkpoints[-1] if checkpoints else (failure or {}).get("step")),
                  train_loss=latest.get("loss"), eval_loss=latest.get("eval_loss"))
        if checkpoints:
            folder = records[checkpoints[-1]].rsplit("/", 1)[0]
            run.artifacts = [folder]
            # The checkpoint carries the metrics so far when its record does not name the losses.
            if run.train_loss is None and f"{folder}/{METRICS}" in keys:
                run.train_loss, run.eval_loss = _last_losses(store.read_bytes(f"{run_id}/{folder}/{METRICS}"))
    run.base_model = (spec.get("model") or {}).get("name")
    run.hyperparameters = _hyperparameters(spec)
    return run


def _has_eval(spec: dict) -> bool:
    section = spec.get("data") or {}
    return bool(section.get("eval") or section.get("eval_split"))


def _last_losses(metrics: bytes) -> tuple[float | None, float | None]:
    """The last train loss and the last eval loss in a metrics.jsonl."""
    train = evaluation = None
    for line in metrics.decode("utf-8", "replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut off by preemption
        if isinstance(record, dict):
            train = train if record.get("loss") is None else record["loss"]
            evaluation = evaluation if record.get("eval_loss") is None else record["eval_loss"]
    return train, evaluation


def _artifacts(manifest: dict) -> list[str]:
    tops = {f["path"].split("/", 1)[0] for f in manifest.get("files", [])}
    found = [name for name in ("adapter", "merged") if name in tops]
    found += [f"gguf:{t}" for t in (manifest.get("export") or {}).get("gguf_types") or []]
    found += [name for name in ("loss.png",) if name in tops]
    return found


def _hyperparameters(spec: dict) -> dict:
    lora, training = spec.get("lora") or {}, spec.get("training") or {}
    picked = {
        "lr": training.get("learning_rate"),
        "r": lora.get("r"),
        "alpha": lora.get("alpha"),
        "batch": training.get("batch_size"),
        "accum": training.get("gradient_accumulation_steps"),
        "max_seq_length": training.get("max_seq_length"),
        "max_steps": training.get("max_steps"),
    }
    return {k: v for k, v in picked.items() if v is not None}


# --- presentation (pure) -------------------------------------------------------------------------------------


def _short_model(name: str | None) -> str:
    if not name:
        return "?"
    # pkg://, s3:// and local paths say little before their last part; a hub id keeps its owner.
    return name.rstrip("/").rsplit("/", 1)[-1] if "://" in name or name.startswith(("/", ".", "~")) else name


def _loss(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def _detail(run: Run) -> str:
    if run.status == "failed":
        f = run.failure or {}
        where = f" in {f['stage']}" if f.get("stage") else ""
        return f"{f.get('error', 'error')}{where} (exit {f.get('exit_code', '?')}): {f.get('message', '')}"[:120]
    if run.status == "incomplete" and not run.checkpoints:
        return "no manifest and no checkpoint (publish cut short, or still running)"
    extra = [f"{len(run.checkpoints)} checkpoint(s)"] if run.status == "incomplete" else []
    return " ".join(run.artifacts + extra)


def table(runs: list[Run]) -> str:
    header = ("RUN", "STATUS", "MODEL", "LR", "R", "BATCH", "STEPS", "LOSS", "EVAL", "ARTIFACTS / ERROR")
    body = []
    for run in runs:
        hp = run.hyperparameters
        batch = f"{hp['batch']}x{hp.get('accum', 1)}" if "batch" in hp else "-"
        body.append((run.run_id, run.status, _short_model(run.base_model), f"{hp['lr']:g}" if "lr" in hp else "-",
                     str(hp.get("r", "-")), batch, "-" if run.steps is None else str(run.steps),
                     _loss(run.train_loss), _loss(run.eval_loss), _detail(run)))
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1] for row in [header, *body]
    )


def describe(run: Run) -> str:
    """`job runs show`: the manifest's summary and the probe answers, or what a failed/incomplete run left."""
    lines = [f"run {run.run_id}: {run.status}", f"  base model: {run.base_model or '?'}"]
    if run.hyperparameters:
        lines.append("  hyper-parameters: " + " ".join(f"{k}={v}" for k, v in run.hyperparameters.items()))
    lines.append(f"  steps {run.steps if run.steps is not None else '-'} · train loss {_loss(run.train_loss)} · "
                 f"eval loss {_loss(run.eval_loss)}")
    if run.failure:
        lines.append(f"  failed: {_detail(run)}")
        lines += [f"  failed at: {run.failure['time']}"] if run.failure.get("time") else []
    if run.checkpoints:
        lines.append(f"  checkpoints: {len(run.checkpoints)}, latest at step {run.checkpoints[-1]}")
    manifest = run.manifest
    if not manifest:
        return "\n".join(lines)
    data, training = manifest.get("data") or {}, manifest.get("training") or {}
    files = manifest.get("files") or []
    lines += [
        f"  published {manifest.get('published_at', '?')}: {len(files)} files, "
        f"{sum(f.get('bytes', 0) for f in files) / 2**20:.1f} MiB · {' '.join(run.artifacts)}",
        f"  data: {data.get('source')} ({data.get('format')}, template {data.get('chat_template')}) · "
        f"{data.get('rows_used')} rows used, {data.get('rows_dropped')} dropped, {data.get('rows_truncated')} truncated · "
        f"{data.get('tokens')} tokens, {data.get('trained_tokens')} trained",
        f"  training: {training.get('backend')} {training.get('precision')} · loss {_loss(training.get('first_loss'))} → "
        f"{_loss(training.get('final_loss'))} · {training.get('seconds')} s · {training.get('tokens_per_second')} tok/s",
    ]
    lines += _method_lines(manifest)
    if verification := manifest.get("verification"):
        lines.append("  verification:")
        lines += [f"    {row}" for row in verify.table(verification)]
    for probe in manifest.get("probes") or []:
        lines.append(f"  Q: {probe.get('prompt')}")
        lines += [f"    {key}: {value}" for key, value in probe.items() if key not in ("prompt", "stopped")]
        if unended := [name for name, ended in (probe.get("stopped") or {}).items() if not ended]:
            lines.append(f"    (no EOS within the token limit: {', '.join(unended)})")
    return "\n".join(lines)


def _number(value) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) else str(value)


def preference_metrics(preference: dict | None) -> list[tuple[str, object]]:
    """(name, value) of a manifest's training.preference, in job.train's order, then any other name it holds."""
    preference = {k: v for k, v in (preference or {}).items() if v is not None}
    return [(k, preference[k]) for k in PREFERENCE_METRICS if k in preference] + \
        sorted((k, v) for k, v in preference.items() if k not in PREFERENCE_METRICS)


def _method_lines(manifest: dict) -> list[str]:
    """The training method, the preference metrics and the parent run; nothing for a manifest written before runs
    recorded them."""
    training = manifest.get("training") or {}
    lines = [f"  method: {training['method']}"] if training.get("method") else []
    if metrics := preference_metrics(training.get("preference")):
        lines.append("  preference (last logged step): " + " · ".join(f"{k} {_number(v)}" for k, v in metrics))
    if parent := (manifest.get("lineage") or {}).get("parent"):
        lines.append(f"  parent run: {parent.get('run_id', '?')} ({parent.get('method', '?')}) · "
                     f"{parent.get('uri', '?')}")
        lines.append(f"    manifest {parent.get('manifest', '?')} · sha256 {parent.get('manifest_sha256', '?')}")
    return lines


def split_run_uri(uri: str) -> tuple[str, str]:
    """LOCATION/RUN_ID → (LOCATION, RUN_ID)."""
    location, _, run_id = uri.rstrip("/").rpartition("/")
    return location, run_id


def as_json(runs: list[Run]) -> str:
    return json.dumps([r.as_dict() for r in runs], indent=2)

