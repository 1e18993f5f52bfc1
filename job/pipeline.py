"""`job run`: the stages a user names, top to bottom.

resolve spec (job/cli/run.py) → set up → fetch_model → load_data → preflight → train → probe → export → verify → publish
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import structlog
import yaml

from job import backends, card, checkpoint, data, export, lineage, llamacpp, log, model, plots, publish, rundir, runtime, settings, train, verify
from job.errors import GpuOutOfMemory, NoUsableGpu, Preempted
from job.runtime import Paths, Process
from job.spec import Spec
from job.storage import S3Settings, open_location


@dataclass
class RunResult:
    run_id: str
    destination: str
    manifest: dict


@contextlib.contextmanager
def stage(name: str, timings: dict, current: dict):
    """One stage: its start and finish events and its seconds; `current` names it for the failure record."""
    current["stage"] = name
    events = log.get()
    started = time.monotonic()
    with structlog.contextvars.bound_contextvars(stage=name):
        events.info("stage.started")
        yield
        timings[name] = round(time.monotonic() - started, 2)
        events.info("stage.finished", seconds=timings[name])


def run(spec: Spec, paths: Paths, stop: train.StopRequest | None = None, process: Process | None = None) -> RunResult | None:
    """One run; a failure leaves RUN_ID/failure.json (except a preemption, which leaves a checkpoint).

    Under torchrun every rank trains its shard of each batch; rank 0 alone checkpoints, exports, verifies and
    publishes, and the others return None once training is over."""
    process = process or Process()
    store = open_location(spec.run.output, S3Settings(spec.run.endpoint_url, spec.run.region))
    store.list(f"{spec.run_id}/")  # unreachable storage fails here, before a model download or training
    if process.is_main:
        rundir.clear_failure(store, spec.run_id)  # a retry is in progress now, not failed
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


def _run(spec: Spec, paths: Paths, store, stop: train.StopRequest, current: dict, process: Process) -> RunResult | None:
    run_id, s3 = spec.run_id, S3Settings(spec.run.endpoint_url, spec.run.region)
    env = _set_up(spec, paths, process)
    if (published := rundir.read_manifest(store, run_id)) and published.get("spec") == spec.masked():
        # A retried pod after a complete publish (e.g. killed while exiting): nothing left to do.
        log.get().info("run.already_complete", run_id=run_id, destination=f"{store.uri}/{run_id}")
        return RunResult(run_id=run_id, destination=f"{store.uri}/{run_id}", manifest=published)
    # Fail on missing tools, or a checkpoint this spec may not resume, before paying for a model download or training.
    tools = llamacpp.locate(paths.llama_cpp_dir) if spec.export.gguf else None
    fingerprint = settings.training_fingerprint(spec)
    resume = checkpoint.latest(store, run_id)
    if resume:
        checkpoint.check_compatible(resume, fingerprint, process.world_size)
    timings: dict[str, float] = {}

    with stage("fetch_model", timings, current):
        fetched = model.fetch(spec.model, paths.cache_dir, s3)
        model.check(fetched, spec.model, spec.training.max_seq_length)
        if tools:
            export.check_convertible(tools, model.read_config(fetched.path))
        if process.is_main:
            export.check_disk(spec.export, model.read_config(fetched.path), env.work)
        tokenizer = model.load_tokenizer(fetched.path, spec.model.trust_remote_code)
        parent = lineage.fetch(spec, env.work, s3) if spec.model.adapter else None

    with stage("load_data", timings, current):
        dataset, eval_dataset, data_stats, template = data.prepare_with_eval(
            spec.data, tokenizer, spec.training, env.work, s3)
        held_out = eval_dataset if eval_dataset is not None else dataset

    vocab = base_gguf = None
    if tools and process.is_main:
        with stage("preflight", timings, current):
            texts = verify.preflight_texts(tokenizer, spec.export.probes, held_out)
            vocab = verify.preflight(tools, fetched.path, tokenizer, texts, env.work / "preflight")
        base_gguf = _start_base_gguf(spec, tools, fetched.path, tokenizer, paths.cache_dir, env.work)

    with stage("train", timings, current):
        peft_model, result, info = _train(spec, env, store, fetched, parent, tokenizer, dataset, eval_dataset, resume,
                                          fingerprint, stop, process)
        if not process.is_main:
            return None

    with stage("probe", timings, current):
        env.backend.for_inference(peft_model)
        report = verify.ProbeReport(spec.export.probes, max_new_tokens=spec.export.probe_max_new_tokens)
        verify.answer_with_adapter(peft_model, tokenizer, report)
        evaluation = verify.evaluation_set(tokenizer, report, held_out, vocab.bos_id if vocab and vocab.add_bos else None)

    # Artifacts start uploading as soon as each is made; only the manifest, written after every gate passed, vouches
    # for them (a failure deletes them again).
    early = publish.EarlyUploads(store, run_id, env.staging)
    try:
        with stage("export", timings, current):
            adapter_dir = export.save_adapter(peft_model, tokenizer, env.staging)
            del peft_model  # the training model's memory is freed before the merge loads the 16-bit base
            exported, references = _export(spec, env, fetched, adapter_dir, tokenizer, template, tools, base_gguf,
                                           evaluation, early.send)

        with stage("verify", timings, current):
            verification = verify.Verification(evaluation)
            if references:
                verification = verify.verify_artifacts(evaluation, references[0], fetched.path, exported.adapter_dir,
                                                       exported.merged_dir, exported.gguf, tools, tokenizer,
                                                       env.work / "verify", spec.model.trust_remote_code, report)
            verify.save_evaluation(evaluation, env.staging)
            verification.raise_for_failures()
    except BaseException:
        early.discard()
        raise

    with stage("publish", timings, current):
        body = rundir.Manifest(
            status="complete",
            spec=spec.masked(),
            model={"source": fetched.source, "description": fetched.description,
                   "trust_remote_code": spec.model.trust_remote_code},
            data=data_stats,
            training={**info, "steps": result.steps, "first_loss": result.first_loss, "final_loss": result.final_loss,
                      "final_eval_loss": result.final_eval_loss, "resumed_from_step": resume.step if resume else None,
                      "seconds": result.seconds, "tokens_per_second": result.tokens_per_second,
                      "peak_gpu_memory_gib": result.peak_gpu_memory_gib, "method": spec.training.method,
                      "preference": result.preference},
            lineage={"parent": parent.as_dict()} if parent else None,
            export={"merge_method": exported.merge_method, "gguf_types": list(exported.gguf),
                    "gguf_method": exported.gguf_method,
                    "llama_cpp": {"commit": tools.commit, "source": llamacpp.SOURCE} if tools else None},
            verification=verification.as_dict(),
            probes=report.as_dict(),
            versions=publish.package_versions(),
            timings_seconds=timings,
        )
        manifest = _publish(spec, env.staging, store, body, result.metrics_path, early)
    return RunResult(run_id=run_id, destination=f"{store.uri}/{run_id}", manifest=manifest)


@dataclass
class _Environment:
    """What the stages share about this process: the training backend, the card, and its working folders."""

    torch: object
    backend_name: str
    backend: object
    capability: tuple[int, int] | None
    work: Path
    staging: Path  # what publish uploads


def _set_up(spec: Spec, paths: Paths, process: Process) -> _Environment:
    import torch

    if torch.cuda.is_available() and process.world_size > 1:
        # Before anything touches CUDA: else every rank opens a context on card 0, and rank 0 sees less free memory.
        torch.cuda.set_device(process.local_rank)
    if paths.image_variant == "cuda" and spec.training.backend != "hf" and not torch.cuda.is_available():
        # Training an 8B model on the CPU would run for days: in the CUDA image, CPU training is asked for by name.
        raise NoUsableGpu(f"this CUDA image found no usable GPU: {runtime.why_no_gpu(torch)}",
                          hint="give the pod an nvidia.com/gpu limit on a node whose driver is new enough; to train on "
                               "the CPU on purpose, set training.backend: hf")
    # The backend is imported first: unsloth must patch transformers, trl and peft before anyone imports them.
    backend_name = backends.pick(spec.training, torch.cuda.is_available())
    capability = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
    backends.check_precision(spec.model.precision, backend_name, capability)
    backend = backends.load(backend_name)
    import datasets  # noqa: F401 - imported so their loggers can be routed now
    import transformers  # noqa: F401

    log.route_library_logs()
    runtime.join_process_group(process, torch.cuda.is_available())
    work = paths.work_dir / spec.run_id if process.is_main else paths.work_dir / spec.run_id / f"rank-{process.rank}"
    staging = work / "out"
    export.clean(staging)
    staging.mkdir(parents=True)
    return _Environment(torch, backend_name, backend, capability, work, staging)


def _train(spec: Spec, env: _Environment, store, fetched, parent: lineage.Parent | None, tokenizer, dataset,
           eval_dataset, resume, fingerprint: str, stop: train.StopRequest, process: Process):
    """The adapter, trained (or resumed) with the `auto` settings resolved once; a resumed run keeps what its
    checkpoint was trained with. Ranks other than 0 leave the process group here."""
    torch = env.torch
    resolved = settings.resumed_settings(resume, spec, env.backend_name, env.capability) if resume else None
    resolved = resolved or runtime.on_rank_0(process, lambda: settings.resolve_auto(
        spec, model.read_config(fetched.path), dataset, settings.device(torch), env.backend_name))
    model_section = spec.model.model_copy(update={"precision": resolved["precision"]})
    # gradient_accumulation_steps is in the record only where a resumed run's batch was halved to fit its card
    training = spec.training.model_copy(update={k: resolved[k] for k in
                                                ("batch_size", "gradient_checkpointing", "gradient_accumulation_steps")
                                                if k in resolved})
    peft_model, _, info = env.backend.load_for_training(fetched.path, model_section, spec.lora, training)
    if parent:
        lineage.load_adapter(peft_model, parent.adapter_dir)  # a preference method's reference, too
    info["world_size"] = process.world_size  # the batch size is per process; tokens/s counts every process
    info["resolved"] = resolved
    record = {"fingerprint": fingerprint, "world_size": process.world_size, "resolved": resolved}
    checkpoints = train.CheckpointPlan(
        every_steps=spec.training.checkpoint_every,
        every_minutes=spec.training.checkpoint_every_minutes,
        save=lambda folder, step: checkpoint.upload(store, spec.run_id, folder, step, record),
        resume_from=checkpoint.download(store, resume, env.work / "resume" / f"checkpoint-{resume.step}") if resume else None,
    )
    if resume:
        log.get().info("train.resuming", step=resume.step, checkpoint=f"{store.uri}/{resume.key}")
    tensorboard_dir = env.staging / "tensorboard" if "tensorboard" in spec.logging.report_to else None
    # An auto batch size that runs out of memory in the first step of this attempt is halved and retried (the
    # estimate erred, or a resumed run landed on a smaller card); a resumed run keeps its global batch.
    may_halve = process.world_size == 1 and "batch_size" in resolved["auto"]
    result = train.run_fitting(
        peft_model, tokenizer, dataset, training, env.work, info, may_halve=may_halve, checkpoints=checkpoints, stop=stop,
        eval_dataset=eval_dataset, report_to=spec.logging.report_to, logging_dir=tensorboard_dir)
    if process.world_size > 1:
        torch.distributed.destroy_process_group()  # from here on rank 0 works alone
    return peft_model, result, info


def _start_base_gguf(spec: Spec, tools, base_path: Path, tokenizer, cache_dir: Path,
                     work: Path) -> export.BaseGguf | None:
    """The base's GGUF, converted while the adapter trains, where the GGUFs can be made from it."""
    if refusal := export.base_gguf_refusal(spec.lora, spec.export):
        log.get().info("export.base_gguf.skipped", reason=refusal)
        return None
    return export.BaseGguf(tools, base_path, tokenizer, cache_dir, work).start()


def _export(spec: Spec, env: _Environment, fetched, adapter_dir: Path, tokenizer, template, tools,
            base_gguf: export.BaseGguf | None, evaluation, send: Callable[[Path], None]):
    """The merged 16-bit weights and the GGUFs in the staging folder beside the adapter, each handed to `send` once
    made, and the reference distributions verify scores them against: computed on the adapter over the 16-bit base
    while the merge has it loaded.

    With the base's GGUF at hand, llama.cpp merges the adapter into it and quantizes on the CPU while the merge into
    the 16-bit weights runs on the GPU; else the merged weights are converted once they are saved."""
    exported = export.Exported(adapter_dir=adapter_dir)
    gc.collect()
    if env.torch.cuda.is_available():
        env.torch.cuda.empty_cache()
    references = []
    base_gguf_path = base_gguf.wait() if base_gguf else None
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="gguf") as gguf_thread:
        gguf_made = None
        if tools and base_gguf_path:
            exported.gguf_method = "the adapter merged into the base's bf16 GGUF by llama-export-lora"
            gguf_made = gguf_thread.submit(
                _with_context(structlog.contextvars.get_contextvars(), export.to_gguf_from_base), tools, base_gguf_path,
                base_gguf.source, adapter_dir, env.staging, spec.export.gguf, spec.run_id, on_made=send)
        if spec.export.merged:
            exported.merged_dir, exported.merge_method = export.merge(
                fetched.path, exported.adapter_dir, env.staging, spec.model,
                before_merge=lambda unmerged: references.append(verify.references(unmerged, evaluation)))
            send(exported.merged_dir)
        if gguf_made is not None:
            exported.gguf = gguf_made.result()
        elif tools:
            exported.gguf_method = "the merged weights converted by llama.cpp's converter"
            exported.gguf = export.to_gguf(tools, exported.merged_dir, env.staging, spec.export.gguf, spec.run_id,
                                           on_made=send)
    if tools:
        family = card.template_family(tokenizer.chat_template, template)
        first = exported.gguf[spec.export.gguf[0]].name
        system = card.default_system(tokenizer, family)
        (env.staging / "gguf" / "Modelfile").write_text(card.modelfile(first, family, system))
    return exported, references


def _with_context(context: dict, fn: Callable) -> Callable:
    """`fn` with the caller's log fields bound, for another thread (its events name the run and stage too)."""
    def bound(*args, **kwargs):
        with structlog.contextvars.bound_contextvars(**context):
            return fn(*args, **kwargs)
    return bound


def _publish(spec: Spec, staging: Path, store, body: rundir.Manifest, metrics_path: Path,
             early: publish.EarlyUploads) -> rundir.Manifest:
    (staging / rundir.METRICS).write_bytes(metrics_path.read_bytes())
    plots.loss_curve(staging / rundir.METRICS, staging / "loss.png")
    (staging / rundir.SPEC).write_text(yaml.safe_dump(spec.masked(), sort_keys=False))
    files = [p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file()]
    (staging / "README.md").write_text(card.model_card({**body, "run_id": spec.run_id}, files))
    manifest = publish.publish(staging, store, spec.run_id, body, early)
    # Complete: the checkpoints and an earlier attempt's failure record have served their purpose.
    checkpoint.remove_all(store, spec.run_id)
    rundir.clear_failure(store, spec.run_id)
    return manifest


def _out_of_memory_outside_training(exc: Exception, stage_name: str) -> GpuOutOfMemory | None:
    """Out of GPU memory while loading, evaluating, merging or verifying: the user's to change, like in a step."""
    import torch

    if not isinstance(exc, torch.OutOfMemoryError):
        return None
    return GpuOutOfMemory(
        f"the GPU ran out of memory in stage {stage_name}",
        hint="use a card with more memory (`job plan` shows which fit) or precision: 4bit; merging and verifying load "
             "the 16-bit base on the GPU, so export.merged: false (with export.gguf: []) needs the least")


def _record_failure(store, run_id: str, exc: Exception, stage_name: str, process: Process) -> None:
    """The attempt's first failure, from whichever rank it happened on: under torchrun the others usually fail
    because of it (a collective that lost its peer), and their records would hide the cause."""
    record = rundir.failure_record(exc, stage_name, process.rank if process.world_size > 1 else None)
    try:
        # Rank 0 cleared the last attempt's record at the start: one there now is this attempt's.
        rundir.write_failure(store, run_id, record, unless_recorded=process.world_size > 1)
    except Exception:  # noqa: BLE001 - the original error matters more than its record
        log.get().warning("run.failure_not_recorded", run_id=run_id)
