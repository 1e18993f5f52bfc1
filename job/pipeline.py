"""`job run`: the stages a user names, top to bottom.

resolve spec (cli.py) → fetch model → load data → preflight → train → export → verify → publish
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import structlog
import yaml

from job import backends, card, checkpoint, data, export, llamacpp, log, model, plan, plots, publish, train, verify
from job.errors import DataError, GpuOutOfMemory, JobError, Preempted, SpecError
from job.spec import Spec
from job.storage import S3Settings, open_location


@dataclass
class Paths:
    """Machine-local places, from the environment (see cli.py), never from the spec."""

    work_dir: Path
    cache_dir: Path
    llama_cpp_dir: Path


@dataclass
class Process:
    """This process's place in a torchrun launch (rank 0 of 1 when alone)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass
class RunResult:
    run_id: str
    destination: str
    manifest: dict


@contextlib.contextmanager
def _current(current: dict, name: str):
    current["stage"] = name
    yield


@contextlib.contextmanager
def stage(name: str, timings: dict):
    events = log.get()
    started = time.monotonic()
    with structlog.contextvars.bound_contextvars(stage=name):
        events.info("stage.started")
        yield
        timings[name] = round(time.monotonic() - started, 2)
        events.info("stage.finished", seconds=timings[name])


FAILURE = "failure.json"


def training_fingerprint(spec: Spec) -> str:
    """What a checkpoint depends on: a changed export, checkpoint cadence, number of collating processes or gradient
    checkpointing (it trades memory for recomputation; the math is the same) may resume it, a changed model may not."""
    # Fields left at their defaults are left out, so a newer job with new fields still resumes an older checkpoint.
    body = spec.model_dump(mode="json", include={"model", "lora", "data", "training"}, exclude={"model": {"token"}},
                           exclude_defaults=True)
    for field in ("checkpoint_every", "checkpoint_every_minutes", "dataloader_workers", "gradient_checkpointing"):
        body.get("training", {}).pop(field, None)
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def run(spec: Spec, paths: Paths, stop: train.StopRequest | None = None, process: Process | None = None) -> RunResult | None:
    """One run; a failure leaves RUN_ID/failure.json (except a preemption, which leaves a checkpoint).

    Under torchrun every rank trains its shard of each batch; rank 0 alone checkpoints, exports, verifies and
    publishes, and the others return None once training is over."""
    process = process or Process()
    store = open_location(spec.run.output, S3Settings(spec.run.endpoint_url, spec.run.region))
    store.list(f"{spec.run_id}/")  # unreachable storage fails here, before a model download or training
    if process.is_main:
        store.delete(f"{spec.run_id}/{FAILURE}")  # a retry is in progress now, not failed
    current = {"stage": "start"}
    try:
        return _run(spec, paths, store, stop or train.StopRequest(), current, process)
    except Preempted:
        raise
    except Exception as exc:
        error = _out_of_memory_outside_training(exc, current["stage"]) or exc
        _record_failure(store, spec.run_id, error, current["stage"], process)
        if error is exc:
            raise
        raise error from exc


def _out_of_memory_outside_training(exc: Exception, stage_name: str) -> GpuOutOfMemory | None:
    """Out of GPU memory while loading, evaluating, merging or verifying: the user's to change, like in a step."""
    import torch

    if not isinstance(exc, torch.OutOfMemoryError):
        return None
    return GpuOutOfMemory(
        f"the GPU ran out of memory in stage {stage_name}",
        hint="use a card with more memory (`job plan` shows which fit) or precision: 4bit; merging and verifying load "
             "the 16-bit base on the GPU, so export.merged: false (with export.gguf: []) needs the least")


def _device(torch) -> tuple[str, float, tuple[int, int]] | None:
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
    arch = plan.arch_from_config(config, name=spec.model.name)
    card = plan.gpu_for_device(name, free_gib, capability)
    longest = max(map(len, dataset["input_ids"]))
    lookup = spec.model_copy(update={"training": training.model_copy(update={"backend": backend_name})})
    choice = plan.choose_for_spec(lookup, arch, card, longest=longest, rows=len(dataset))
    if not choice.fits:
        raise SpecError(f"{', '.join(auto)}: no configuration fits this GPU: {choice.reason}",
                        hint="lower training.max_seq_length or lora.r, or use a card with more memory (see `job plan`)")
    resolved = {"batch_size": choice.batch_size, "gradient_checkpointing": choice.gradient_checkpointing,
                "precision": choice.precision, "auto": auto, "reason": choice.reason,
                "predicted": {"peak_gib": round(choice.memory.total, 2), "tokens_per_second": round(choice.tokens_per_second)}}
    log.get().info("train.auto_resolved", **resolved)
    return resolved


def _resumed_settings(resume, spec: Spec, backend_name: str, capability: tuple[int, int] | None) -> dict | None:
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


def _on_rank_0(process: Process, decide):
    """`decide()` on rank 0 alone, its answer (or its error) given to every rank. The `auto` choices depend on each
    card's free memory: ranks that chose apart would train different configurations, or different numbers of steps
    and then wait on each other forever."""
    if process.world_size == 1:
        return decide()
    import torch.distributed as dist

    box: list = [None]
    failure = None
    if process.is_main:
        try:
            box[0] = {"value": decide()}
        except Exception as exc:  # noqa: BLE001 - re-raised below, once the other ranks know not to wait
            failure, box[0] = exc, {"error": str(exc), "user": isinstance(exc, JobError)}
    dist.broadcast_object_list(box, src=0)
    if failure:
        raise failure
    if "error" in box[0]:
        if box[0]["user"]:
            raise SpecError(box[0]["error"], where="rank 0")
        raise RuntimeError(f"rank 0 failed: {box[0]['error']}")
    return box[0]["value"]


def _join_process_group(process: Process, cuda: bool) -> None:
    """Join torchrun's group before loading anything, so each rank loads onto its own card; the Trainer reuses it."""
    import torch
    import torch.distributed as dist

    if process.world_size == 1 or dist.is_initialized():
        return
    if cuda:
        torch.cuda.set_device(process.local_rank)
    else:
        # accelerate names each CPU rank's device "cpu:N", and transformers then loads a resumed optimizer state
        # with map_location="cpu:N", a location torch.load does not know. Plain "cpu" on every rank.
        os.environ.setdefault("ACCELERATE_TORCH_DEVICE", "cpu")
    dist.init_process_group(backend="nccl" if cuda else "gloo")


def _record_failure(store, run_id: str, exc: Exception, stage_name: str, process: Process) -> None:
    """The attempt's first failure, from whichever rank it happened on: under torchrun the others usually fail
    because of it (a collective that lost its peer), and their records would hide the cause."""
    error = exc if isinstance(exc, JobError) else None
    record = {
        "status": "failed",
        "error": error.kind if error else "bug",
        "message": str(exc) if error else f"{type(exc).__name__}: {exc}",
        "exit_code": error.exit_code if error else 1,
        "stage": stage_name,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **({"rank": process.rank} if process.world_size > 1 else {}),
    }
    try:
        if process.world_size > 1 and store.exists(f"{run_id}/{FAILURE}"):
            return  # rank 0 cleared the last attempt's record at the start: this one is this attempt's
        store.put_bytes(f"{run_id}/{FAILURE}", json.dumps(record, indent=2).encode())
    except Exception:  # noqa: BLE001 - the original error matters more than its record
        log.get().warning("run.failure_not_recorded", run_id=run_id)


def _run(spec: Spec, paths: Paths, store, stop: train.StopRequest, current: dict, process: Process) -> RunResult | None:
    import torch

    if torch.cuda.is_available() and process.world_size > 1:
        # Before anything touches CUDA: else every rank opens a context on card 0, and rank 0 sees less free memory.
        torch.cuda.set_device(process.local_rank)
    # The backend is imported first: unsloth must patch transformers, trl and peft before anyone imports them.
    backend_name = backends.pick(spec.training, torch.cuda.is_available())
    capability = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
    backends.check_precision(spec.model.precision, backend_name, capability)
    backend = backends.load(backend_name)
    import datasets  # noqa: F401 - imported so their loggers can be routed now
    import transformers  # noqa: F401

    log.route_library_logs()
    run_id = spec.run_id
    s3 = S3Settings(spec.run.endpoint_url, spec.run.region)
    events = log.get()
    _join_process_group(process, torch.cuda.is_available())
    work = paths.work_dir / run_id if process.is_main else paths.work_dir / run_id / f"rank-{process.rank}"
    staging = work / "out"
    export.clean(staging)
    staging.mkdir(parents=True)
    timings: dict[str, float] = {}
    cuda = torch.cuda.is_available()
    if store.exists(f"{run_id}/{publish.MANIFEST}"):
        published = json.loads(store.read_bytes(f"{run_id}/{publish.MANIFEST}"))
        if published.get("spec") == spec.masked():
            # A retried pod after a complete publish (e.g. killed while exiting): nothing left to do.
            events.info("run.already_complete", run_id=run_id, destination=f"{store.uri}/{run_id}")
            return RunResult(run_id=run_id, destination=f"{store.uri}/{run_id}", manifest=published)
    # Fail on missing tools before paying for a model download or training.

    tools = llamacpp.locate(paths.llama_cpp_dir) if spec.export.gguf else None
    fingerprint = training_fingerprint(spec)
    world_size = process.world_size
    resume = checkpoint.latest(store, run_id)
    if resume:
        checkpoint.check_compatible(resume, fingerprint, world_size)

    with stage("fetch_model", timings), _current(current, "fetch_model"):
        fetched = model.fetch(spec.model, paths.cache_dir, s3)
        model.check(fetched, spec.model, spec.training.max_seq_length)
        if tools:
            export.check_convertible(tools, model.read_config(fetched.path))
        tokenizer = model.load_tokenizer(fetched.path, spec.model.trust_remote_code)

    with stage("load_data", timings), _current(current, "load_data"):
        dataset, data_stats, template = data.prepare(spec.data, tokenizer, spec.training.max_seq_length, work, s3)
        eval_dataset = None
        if spec.data.eval:
            eval_section = spec.data.model_copy(update={"source": spec.data.eval, "eval": None, "max_rows": None})
            eval_dataset, data_stats["eval"], _ = data.prepare(eval_section, tokenizer, spec.training.max_seq_length,
                                                                work / "eval", s3)
        elif spec.data.eval_split:
            try:
                parts = dataset.train_test_split(test_size=spec.data.eval_split, seed=spec.training.seed)
            except ValueError as exc:  # datasets refuses a split that leaves either side empty
                raise DataError(f"data.eval_split: {spec.data.eval_split} of {len(dataset)} rows leaves no row on one "
                                f"side ({exc})", hint="use more rows, another eval_split, or a separate data.eval") from exc
            dataset, eval_dataset = parts["train"], parts["test"]
            data_stats["eval"] = {"rows": len(eval_dataset), "from": "data.eval_split"}

    vocab = None
    if tools and process.is_main:
        with stage("preflight", timings), _current(current, "preflight"):
            texts = verify.preflight_texts(tokenizer, spec.export.probes, eval_dataset if eval_dataset is not None else dataset)
            vocab = verify.preflight(tools, fetched.path, tokenizer, texts, work / "preflight")

    with stage("train", timings), _current(current, "train"):
        # `auto` fields resolved once; a resumed run keeps what its checkpoint was trained with.
        resolved = _resumed_settings(resume, spec, backend_name, capability) if resume else None
        resolved = resolved or _on_rank_0(process, lambda: resolve_auto(
            spec, model.read_config(fetched.path), dataset, _device(torch), backend_name))
        model_section = spec.model.model_copy(update={"precision": resolved["precision"]})
        # gradient_accumulation_steps is in the record only where a resumed run's batch was halved to fit its card
        training = spec.training.model_copy(update={k: resolved[k] for k in
                                                    ("batch_size", "gradient_checkpointing", "gradient_accumulation_steps")
                                                    if k in resolved})
        peft_model, _, info = backend.load_for_training(fetched.path, model_section, spec.lora, training)
        info["world_size"] = process.world_size  # the batch size is per process; tokens/s counts every process
        info["resolved"] = resolved
        plan = train.CheckpointPlan(
            every_steps=spec.training.checkpoint_every,
            every_minutes=spec.training.checkpoint_every_minutes,
            save=lambda folder, step: checkpoint.upload(
                store, run_id, folder, step, {"fingerprint": fingerprint, "world_size": world_size, "resolved": resolved}),
            resume_from=checkpoint.download(store, resume, work / "resume" / f"checkpoint-{resume.step}") if resume else None,
        )
        if resume:
            events.info("train.resuming", step=resume.step, checkpoint=f"{store.uri}/{resume.key}")
        tensorboard_dir = staging / "tensorboard" if "tensorboard" in spec.logging.report_to else None
        # An auto batch size that runs out of memory in the first step of this attempt is halved and retried (the
        # estimate erred, or a resumed run landed on a smaller card); a resumed run keeps its global batch.
        may_halve = process.world_size == 1 and "batch_size" in resolved["auto"]
        result = train.run_fitting(
            peft_model, tokenizer, dataset, training, work, info, may_halve=may_halve, checkpoints=plan, stop=stop,
            eval_dataset=eval_dataset, report_to=spec.logging.report_to, logging_dir=tensorboard_dir)
        if process.world_size > 1:
            torch.distributed.destroy_process_group()  # from here on rank 0 works alone
            if not process.is_main:
                return None
        backend.for_inference(peft_model)
        report = verify.ProbeReport(spec.export.probes, max_new_tokens=spec.export.probe_max_new_tokens)
        verify.answer_with_adapter(peft_model, tokenizer, report)
        evaluation = verify.evaluation_set(tokenizer, report, eval_dataset if eval_dataset is not None else dataset,
                                           vocab.bos_id if vocab and vocab.add_bos else None)

    with stage("export", timings), _current(current, "export"):
        exported = export.Exported(adapter_dir=export.save_adapter(peft_model, tokenizer, staging))
        del peft_model
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        references = []  # computed on the adapter over the 16-bit base while the merge has it loaded
        if spec.export.merged:
            exported.merged_dir, exported.merge_method = export.merge(
                fetched.path, exported.adapter_dir, staging, spec.model,
                before_merge=lambda unmerged: references.append(verify.references(unmerged, evaluation)))
        if tools:
            exported.gguf = export.to_gguf(tools, exported.merged_dir, staging, spec.export.gguf, stem=run_id)
            family = card.template_family(tokenizer.chat_template, template)
            first = exported.gguf[spec.export.gguf[0]].name
            system = card.default_system(tokenizer, family)
            (staging / "gguf" / "Modelfile").write_text(card.modelfile(first, family, system))

    with stage("verify", timings), _current(current, "verify"):
        verification = verify.Verification(evaluation)
        if references:
            verification = verify.verify_artifacts(evaluation, references[0], fetched.path, exported.adapter_dir,
                                                   exported.merged_dir, exported.gguf, tools, tokenizer, work / "verify",
                                                   spec.model.trust_remote_code, report)
        verify.save_evaluation(evaluation, staging)
        verification.raise_for_failures()

    with stage("publish", timings), _current(current, "publish"):
        body = {
            "status": "complete",
            "spec": spec.masked(),
            "model": {"source": fetched.source, "description": fetched.description, "trust_remote_code": spec.model.trust_remote_code},
            "data": data_stats,
            "training": {**info, "steps": result.steps, "first_loss": result.first_loss, "final_loss": result.final_loss,
                         "final_eval_loss": result.final_eval_loss, "resumed_from_step": resume.step if resume else None,
                         "seconds": result.seconds, "tokens_per_second": result.tokens_per_second,
                         "peak_gpu_memory_gib": result.peak_gpu_memory_gib},
            "export": {"merge_method": exported.merge_method, "gguf_types": list(exported.gguf),
                       "llama_cpp": {"commit": tools.commit, "source": llamacpp.SOURCE} if tools else None},
            "verification": verification.as_dict(),
            "probes": report.as_dict(),
            "versions": publish.package_versions(),
            "timings_seconds": timings,
        }
        (staging / "metrics.jsonl").write_bytes(result.metrics_path.read_bytes())
        plots.loss_curve(staging / "metrics.jsonl", staging / "loss.png")
        (staging / "spec.yaml").write_text(yaml.safe_dump(spec.masked(), sort_keys=False))
        files = [p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file()]
        (staging / "README.md").write_text(card.model_card({**body, "run_id": run_id}, files))
        manifest = publish.publish(staging, store, run_id, body)
        # Complete: the checkpoints and an earlier attempt's failure record have served their purpose.
        checkpoint.remove_all(store, run_id)
        store.delete(f"{run_id}/{FAILURE}")

    return RunResult(run_id=run_id, destination=f"{store.uri}/{run_id}", manifest=manifest)
