"""model.adapter: a run that starts from a published run's adapter (an SFT run's, before preference tuning).

The parent is read through its manifest: it must be complete, trained on this spec's base with this spec's LoRA
settings, and its adapter files are downloaded against the checksums the manifest lists. The child's manifest
records the parent's manifest URI and checksum.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from job import log, rundir
from job.errors import NotFoundError, SpecError
from job.model import plain_counterpart
from job.spec import Spec
from job.storage import S3Settings, open_location

ADAPTER_DIR = "adapter"
# LoRA settings that decide the adapter's tensors and how they apply; dropout and the seed do not.
LORA_SHAPE = ("r", "alpha", "target_modules", "use_rslora", "bias")


@dataclass
class Parent:
    run_id: str
    uri: str  # the parent's run folder
    manifest_uri: str
    manifest_sha256: str
    method: str
    adapter_dir: Path  # the downloaded adapter

    def as_dict(self) -> dict[str, str]:
        return {"run_id": self.run_id, "uri": self.uri, "manifest": self.manifest_uri,
                "manifest_sha256": self.manifest_sha256, "method": self.method}


def _split(location: str) -> tuple[str, str]:
    """(the output the run was published to, its run id): s3://b/runs/r1 → (s3://b/runs, r1)."""
    parent, _, run_id = location.rstrip("/").rpartition("/")
    if not run_id or not parent or parent.endswith(":/"):
        raise SpecError(f"model.adapter: {location} does not name a run folder",
                        hint="give the run's folder: s3://bucket/prefix/RUN_ID/ or a local OUTPUT/RUN_ID")
    return parent, run_id


def _same_base(a: str, b: str) -> bool:
    return (plain_counterpart(a) or a) == (plain_counterpart(b) or b)


def check_parent(manifest: dict, spec: Spec, where: str) -> None:
    """The parent's base and LoRA settings against this spec's: exit 2 on a difference, naming the field."""
    parent_model = manifest.get("spec", {}).get("model", {})
    name, revision = parent_model.get("name"), parent_model.get("revision")
    if not name or not _same_base(name, spec.model.name) or (revision or None) != (spec.model.revision or None):
        shown = name + (f"@{revision}" if revision else "") if name else "an unrecorded base"
        asked = spec.model.name + (f"@{spec.model.revision}" if spec.model.revision else "")
        raise SpecError(f"model.adapter: the parent run {where} trained its adapter on {shown}, but model.name is "
                        f"{asked}", hint="set model.name (and model.revision) to the parent's base, or chain from a "
                        "run trained on this base")
    parent_lora = manifest.get("spec", {}).get("lora", {})
    ours = spec.lora.model_dump(mode="json")
    for field in LORA_SHAPE:
        theirs, mine = parent_lora.get(field), ours[field]
        if field == "target_modules" and theirs is not None:
            theirs, mine = sorted(theirs), sorted(mine)
        if theirs != mine:
            raise SpecError(f"lora.{field} is {ours[field]!r}, but the parent run {where} trained its adapter with "
                            f"{parent_lora.get(field)!r}", hint=f"set lora.{field}: {parent_lora.get(field)!r}: the "
                            "run goes on training the parent's adapter")


def fetch(spec: Spec, work_dir: Path, s3: S3Settings) -> Parent:
    """The parent run named by model.adapter, checked against `spec`, with its adapter downloaded to `work_dir`."""
    output, run_id = _split(spec.model.adapter)
    store = open_location(output, s3)
    where = f"{store.uri}/{run_id}"
    key = f"{run_id}/{rundir.MANIFEST}"
    if not store.exists(key):
        hint = ("the run has not published: wait for it to finish (`job runs show`)"
                if store.list(f"{run_id}/") else "check the URI: it must name the run's folder, which holds manifest.json")
        raise NotFoundError(f"model.adapter: {where} holds no {rundir.MANIFEST}", hint=hint)
    body = store.read_bytes(key)
    manifest = json.loads(body)
    if manifest.get("status") != "complete":
        raise SpecError(f"model.adapter: the run {where} is not complete", hint="chain from a published run")
    check_parent(manifest, spec, where)
    files = [f for f in manifest.get("files", []) if f["path"].startswith(f"{ADAPTER_DIR}/")]
    if not any(f["path"] == f"{ADAPTER_DIR}/adapter_model.safetensors" for f in files):
        raise NotFoundError(f"model.adapter: the run {where} published no adapter",
                            hint="chain from a run whose manifest lists adapter/adapter_model.safetensors")
    local = work_dir / "parent"
    for file in files:
        store.download_file(f"{run_id}/{file['path']}", local / file["path"], sha256=file["sha256"])
    parent = Parent(run_id=run_id, uri=where, manifest_uri=f"{where}/{rundir.MANIFEST}",
                    manifest_sha256=hashlib.sha256(body).hexdigest(),
                    method=manifest.get("spec", {}).get("training", {}).get("method", "sft"),
                    adapter_dir=local / ADAPTER_DIR)
    log.get().info("model.adapter.fetched", **parent.as_dict())
    return parent


def load_adapter(peft_model, adapter_dir: Path) -> None:
    """The parent's weights into the freshly made adapter of the same shape (the spec's lora, checked to match)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(adapter_dir / "adapter_model.safetensors")
    try:
        result = set_peft_model_state_dict(peft_model, weights)
    except RuntimeError as exc:  # torch's size mismatch
        raise SpecError(f"model.adapter: the parent's adapter does not fit this model: {str(exc)[:300]}",
                        hint="chain from a run trained on this base with these lora settings") from exc
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    if getattr(result, "unexpected_keys", None) or missing:
        raise SpecError(f"model.adapter: the parent's adapter does not fit this model ({len(missing)} LoRA tensors "
                        f"missing, {len(result.unexpected_keys)} unexpected)",
                        hint="chain from a run trained on this base with these lora settings")
