"""The settings a run trains with where the spec leaves them to job (`auto`): decided once, on rank 0, for this
card, and kept across resumes, together with the fingerprint that says whether a checkpoint may be resumed."""

from __future__ import annotations

import hashlib
import json

from job import backends, log
from job.plan import estimate
from job.errors import SpecError
from job.spec import Spec


def training_fingerprint(spec: Spec) -> str:
    """What a checkpoint depends on: a changed export, checkpoint cadence, number of collating processes or gradient
    checkpointing (it trades memory for recomputation; the math is the same) may resume it, a changed model may not."""
    # Fields left at their defaults are left out, so a newer job with new fields still resumes an older checkpoint.
    body = spec.model_dump(mode="json", include={"model", "lora", "data", "training"}, exclude={"model": {"token"}},
                           exclude_defaults=True)
    for field in ("checkpoint_every", "checkpoint_every_minutes", "dataloader_workers", "gradient_checkpointing"):
        body.get("training", {}).pop(field, None)
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def device(torch) -> tuple[str, float, tuple[int, int]] | None:
    """The card this process trains on: its name, free memory in GiB and compute capability (None on CPU)."""
    if not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info()
    return torch.cuda.get_device_name(), free / 2**30, torch.cuda.get_device_capability()


def resolve_auto(spec: Spec, config: dict, dataset, device, backend_name: str) -> dict:
    """Batch size, gradient checkpointing and precision for this card: the spec's where it fixes them, else the
    fastest configuration job.plan predicts to fit the card's free memory with headroom."""
    training = spec.training
    fixed = {"batch_size": training.batch_size, "gradient_checkpointing": training.gradient_checkpointing,
             "precision": spec.model.precision}
    auto = [name for name, value in fixed.items() if value == "auto"]
    if not auto:
        return {**fixed, "auto": [], "reason": "as the spec sets them"}
    if device is None:
        # No memory model for CPU training: small, always-working settings.
        cpu = {"batch_size": 2, "gradient_checkpointing": False, "precision": "16bit"}
        return {**{k: (cpu[k] if v == "auto" else v) for k, v in fixed.items()}, "auto": auto,
                "reason": "on CPU: batch 2, no checkpointing, 16-bit"}
    name, free_gib, capability = device
    arch = estimate.arch_from_config(config, name=spec.model.name)
    card = estimate.gpu_for_device(name, free_gib, capability)
    longest = max(map(len, dataset["input_ids"]))
    lookup = spec.model_copy(update={"training": training.model_copy(update={"backend": backend_name})})
    choice = estimate.choose_for_spec(lookup, arch, card, longest=longest, rows=len(dataset))
    if not choice.fits:
        raise SpecError(f"{', '.join(auto)}: no configuration fits this GPU: {choice.reason}",
                        hint="lower training.max_seq_length or lora.r, or use a card with more memory (see `job plan`)")
    resolved = {"batch_size": choice.batch_size, "gradient_checkpointing": choice.gradient_checkpointing,
                "precision": choice.precision, "auto": auto, "reason": choice.reason,
                "predicted": {"peak_gib": round(choice.memory.total, 2), "tokens_per_second": round(choice.tokens_per_second)}}
    log.get().info("train.auto_resolved", **resolved)
    return resolved


def resumed_settings(resume, spec: Spec, backend_name: str, capability: tuple[int, int] | None) -> dict | None:
    """The settings the checkpoint was trained with, with two changes that let a preempted run go on elsewhere:
    gradient checkpointing as the spec now sets it, when it sets it (a card with less memory may turn it on), and a
    16-bit base where `auto` chose fp8 and this card has none (a spot run rescheduled from an H100 to an A100). The
    adapter does not depend on the base's storage format; the merged weights come from the 16-bit base anyway."""
    resolved = resume.record.get("resolved")
    if not resolved:
        return resolved
    wanted = spec.training.gradient_checkpointing
    if wanted != "auto" and resolved.get("gradient_checkpointing") != wanted:
        log.get().info("train.resume_changed", field="training.gradient_checkpointing",
                       was=resolved.get("gradient_checkpointing"), now=wanted)
        resolved = {**resolved, "gradient_checkpointing": wanted}
    if resolved.get("precision") == "fp8" and spec.model.precision == "auto":
        try:
            backends.check_precision("fp8", backend_name, capability)
        except SpecError as exc:
            log.get().info("train.resume_changed", field="model.precision", was="fp8", now="16bit",
                           reason=str(exc))
            resolved = {**resolved, "precision": "16bit"}
    return resolved
