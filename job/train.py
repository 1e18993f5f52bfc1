"""The shared training loop: trl's trainer for training.method (SFTTrainer, DPOTrainer, KTOTrainer or ORPOTrainer)
over the backend's model, with every argument from the spec.

unsloth patches trl's SFTConfig defaults when imported, so nothing here relies on a library default. The trainer's
speed-specific overrides, and the private names of transformers and trl they depend on, are in job.trainer_overrides.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from job import log
from job.errors import GpuOutOfMemory, Interrupted, Preempted, VerificationError
from job.spec import TrainingSection
from job.trainer_overrides import TrainerVariant, make_trainer


class StopRequest:
    """Set by the SIGTERM handler of `job run` (job/cli/run.py). While the training loop runs it only asks for a stop, which the loop
    honours after the current step (then writes a checkpoint); outside the loop the handler ends the run at once."""

    def __init__(self) -> None:
        self.requested = False
        self.in_training_loop = False
        self.saved_step: int | None = None  # the step of the newest checkpoint this attempt wrote

    def on_sigterm(self, *_) -> None:
        self.requested = True
        if not self.in_training_loop:
            raise Interrupted("stopped by SIGTERM outside the training loop")


@dataclass
class CheckpointPlan:
    """Where and when checkpoints go: `save(local_dir, step)` uploads one, `resume_from` is a downloaded one."""

    every_steps: int | None
    every_minutes: float | None
    save: object  # Callable[[Path, int], None]
    resume_from: Path | None = None


@dataclass
class TrainResult:
    steps: int
    first_loss: float | None
    final_loss: float | None
    seconds: float
    tokens_per_second: float | None
    peak_gpu_memory_gib: float | None
    metrics_path: Path
    final_eval_loss: float | None = None
    preference: dict[str, float] | None = None  # PREFERENCE_METRICS at the last logged step


def dataloader_workers(training: TrainingSection, *, use_cpu: bool) -> int:
    if training.dataloader_workers == "auto":
        return 0 if use_cpu else 2
    return training.dataloader_workers


def trainer_config(training: TrainingSection, output_dir: Path, *, dtype_name: str, use_cpu: bool, backend: str,
                   evaluate: bool = False, report_to: list[str] | None = None):
    """The trl config of training.method (SFTConfig, DPOConfig, KTOConfig or ORPOConfig), every field job relies on
    given from the spec or here."""
    workers = dataloader_workers(training, use_cpu=use_cpu)
    common = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=training.batch_size,
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        learning_rate=training.learning_rate,
        warmup_steps=training.warmup_steps,
        lr_scheduler_type=training.lr_scheduler,
        weight_decay=training.weight_decay,
        max_grad_norm=training.max_grad_norm,
        optim=training.optim,
        seed=training.seed,
        data_seed=training.seed,
        max_steps=training.max_steps,
        num_train_epochs=training.num_epochs,
        logging_steps=training.logging_steps,
        logging_first_step=True,
        # True (trl's default; unsloth's patched default is False) reads every micro-batch's loss back to check it,
        # stalling the GPU; a non-finite loss shows in the logs as it is, and a diverged run fails at the end.
        logging_nan_inf_filter=False,
        # Checkpoints are asked for by our callback (steps, minutes, SIGTERM) and uploaded from on_save.
        save_strategy="no",
        save_only_model=False,
        eval_strategy="steps" if evaluate else "no",
        eval_steps=training.eval_every if evaluate else None,
        per_device_eval_batch_size=training.batch_size,
        # TensorBoard is attached by run() with a writer for the run's own folder (its callback reads a global env var).
        report_to=[name for name in report_to or [] if name != "tensorboard"],
        # the backend switched checkpointing on while loading (unsloth's own variant on GPU)
        gradient_checkpointing=False,
        bf16=dtype_name == "bfloat16",
        fp16=dtype_name == "float16",
        use_cpu=use_cpu,
        # On a GPU, batches are collated in worker processes and copied from pinned memory without blocking, so
        # the host queues the next step instead of collating while the GPU idles: at 1B batch 2 that closed a 6% gap
        # to the bare unsloth loop in the same process (docs/benchmarks.md).
        dataloader_num_workers=workers,
        dataloader_prefetch_factor=4 if workers else None,
        dataloader_pin_memory=not use_cpu,
        accelerator_config={"non_blocking": not use_cpu},
        ddp_find_unused_parameters=False,  # every LoRA parameter is used; the search costs a graph traversal a step
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=True,
        remove_unused_columns=True,
        dataset_num_proc=None,
        max_length=training.max_seq_length,
    )
    settings = training.method_settings()
    if training.method == "sft":
        from trl import SFTConfig

        return SFTConfig(**common, packing=training.packing, padding_free=False, completion_only_loss=None,
                         assistant_only_loss=False)
    # The reference is the policy's adapter as loaded (trl copies it to a frozen "ref" adapter): no second model.
    reference = dict(precompute_ref_log_probs=False, sync_ref_model=False, activation_offloading=False)
    if training.method == "dpo":
        from trl import DPOConfig

        return DPOConfig(**common, **reference, **settings.model_dump(), disable_dropout=True,
                         truncation_mode="keep_start", padding_free=False, pad_to_multiple_of=None,
                         f_divergence_type="reverse_kl")
    if training.method == "kto":
        from trl import KTOConfig

        return KTOConfig(**common, **reference, **settings.model_dump(), disable_dropout=True, pad_to_multiple_of=None)
    from trl.experimental.orpo import ORPOConfig

    return ORPOConfig(**common, **settings.model_dump(), disable_dropout=True, max_completion_length=None,
                      padding_value=None, generate_during_eval=False, is_encoder_decoder=False)


# What trl's preference trainers log beside the loss (their means over the logging interval).
PREFERENCE_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                      "logps/rejected", "kl", "log_odds_ratio", "log_odds_chosen", "nll_loss")


def _events_callback(metrics_path: Path, started: float):
    import torch
    from transformers import TrainerCallback

    events = log.get()

    class StepEvents(TrainerCallback):
        def __init__(self):
            self.last_tokens, self.last_time = 0, started
            self.losses: list[float] = []
            self.eval_losses: list[float] = []
            self.eval_steps: list[int] = []
            self.preference: dict[str, float] = {}  # the last logged value of each PREFERENCE_METRICS
            self.tps: list[float] = []
            self.logged_here = 0
            self.first_step: int | None = None
            self.first_time = started

        def on_train_begin(self, args, state, control, **kwargs):
            # A resumed run's count starts at the checkpoint's: its first rate counts this attempt's tokens only.
            self.last_tokens = state.num_input_tokens_seen

        def on_step_begin(self, args, state, control, **kwargs):
            if self.first_step is None:
                self.first_step, self.first_time = state.global_step, time.monotonic()

        def _eta(self, state, now) -> float | None:
            done = state.global_step - (self.first_step or 0)
            if done <= 0 or not state.max_steps:
                return None
            return round((now - self.first_time) / done * (state.max_steps - state.global_step), 1)

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if "eval_loss" in logs:
                record = {"step": state.global_step, "eval_loss": logs["eval_loss"]}
                self.eval_losses.append(float(logs["eval_loss"]))
                self.eval_steps.append(state.global_step)
                with open(metrics_path, "a") as fh:
                    fh.write(json.dumps(record) + "\n")
                events.info("train.eval", **record)
                return
            if "loss" not in logs:
                return
            now = time.monotonic()
            tokens = state.num_input_tokens_seen
            rate = (tokens - self.last_tokens) / max(now - self.last_time, 1e-9)
            self.last_tokens, self.last_time = tokens, now
            record = {
                "step": state.global_step,
                "epoch": round(state.epoch or 0.0, 4),
                "loss": logs.get("loss"),
                "learning_rate": logs.get("learning_rate"),
                "grad_norm": logs.get("grad_norm"),
                "tokens": tokens,
                "tokens_per_second": round(rate, 1),
                "elapsed_seconds": round(now - started, 2),
                "max_steps": state.max_steps,
                "eta_seconds": self._eta(state, now),
            }
            if torch.cuda.is_available():
                record["gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
            for name in PREFERENCE_METRICS:
                for key in (name, f"train/{name}"):
                    if logs.get(key) is not None:
                        record[name] = logs[key]
                        self.preference[name] = float(logs[key])
            self.losses.append(float(record["loss"]))
            if self.logged_here:  # the first step of a process includes its warm-up
                self.tps.append(rate)
            self.logged_here += 1
            with open(metrics_path, "a") as fh:
                fh.write(json.dumps(record) + "\n")
            events.info("train.step", **record)

    return StepEvents()


def _checkpoint_callback(plan: CheckpointPlan, stop: StopRequest, metrics_path: Path):
    import shutil

    import torch.distributed as dist
    from transformers import TrainerCallback

    events = log.get()

    class Checkpointing(TrainerCallback):
        def __init__(self):
            self.last_save = time.monotonic()
            self.control_group = None
            if dist.is_available() and dist.is_initialized() and dist.get_backend() != "gloo":
                # The stop flag travels over a CPU (gloo) group: as a GPU tensor under NCCL, reading it back every
                # step would make the host wait for the step's kernels and stall the next step's launch.
                self.control_group = dist.new_group(backend="gloo")

        def _agree(self, stop_requested: bool, save_due: bool) -> tuple[bool, bool]:
            """Every rank must stop, and save, after the same step: a save gathers the token count across ranks, and
            a rank that went on alone would hang in its next collective. A signal to any rank, or a checkpoint due by
            any rank's clock, decides for all."""
            if not (dist.is_available() and dist.is_initialized()):
                return stop_requested, save_due
            import torch

            flags = torch.tensor([int(stop_requested), int(save_due)], dtype=torch.int32)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.control_group)
            return bool(flags[0]), bool(flags[1])

        def on_step_end(self, args, state, control, **kwargs):
            by_time = plan.every_minutes and time.monotonic() - self.last_save >= plan.every_minutes * 60
            stopping, by_time = self._agree(stop.requested, bool(by_time))
            if stopping:
                stop.requested = True  # also where the signal did not arrive: no rank may go on to publish
                events.warning("train.stop_requested", step=state.global_step, reason="SIGTERM")
                control.should_save = True
                control.should_training_stop = True
                return
            if state.global_step >= state.max_steps:
                return  # the final adapter is published anyway
            by_steps = plan.every_steps and state.global_step % plan.every_steps == 0
            if by_steps or by_time:
                control.should_save = True

        def on_save(self, args, state, control, **kwargs):
            self.last_save = time.monotonic()
            stop.saved_step = state.global_step
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            # The reference adapter is rebuilt from the adapter as loaded on every attempt. Kept here, it would also
            # make transformers resume only the checkpoint's adapter subfolders, never the trained adapter beside them.
            shutil.rmtree(folder / REFERENCE_ADAPTER, ignore_errors=True)
            if state.is_world_process_zero:
                shutil.copyfile(metrics_path, folder / "metrics.jsonl")
                plan.save(folder, state.global_step)
                shutil.rmtree(folder, ignore_errors=True)

    return Checkpointing()


def _final_evaluation_callback():
    from transformers import TrainerCallback

    class FinalEvaluation(TrainerCallback):
        """The final model is evaluated in the last step, inside the training loop, where every tracker still has
        its run open: evaluated after training, MLflow opened a second run for it and TensorBoard a writer in a
        folder that is not published."""

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps:
                control.should_evaluate = True

    return FinalEvaluation()


def _restore_metrics(resume_from: Path, metrics_path: Path, callback) -> None:
    """Carry the interrupted attempt's metrics up to the checkpoint, so the run's record has every step once."""
    saved = resume_from / "metrics.jsonl"
    if not saved.exists():
        return
    metrics_path.write_bytes(saved.read_bytes())
    for line in saved.read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            callback.losses.append(float(record["loss"]))
        if "eval_loss" in record:
            callback.eval_losses.append(float(record["eval_loss"]))
            callback.eval_steps.append(record["step"])
        callback.preference.update({name: record[name] for name in PREFERENCE_METRICS if name in record})


def run(model, tokenizer, dataset, training: TrainingSection, work_dir: Path, info: dict, *,
        checkpoints: CheckpointPlan | None = None, stop: StopRequest | None = None, eval_dataset=None,
        report_to: list[str] | None = None, logging_dir: Path | None = None, extra_callbacks: Sequence = (),
        trainer_variant: TrainerVariant | None = None) -> TrainResult:
    """Train `model` on `dataset` as `training` says, writing metrics.jsonl to `work_dir`.

    `extra_callbacks` (transformers TrainerCallbacks) are called after job's own, and `trainer_variant` departs from
    job's trainer: both for benchmarks and tests that observe or compare the training loop; `job run` uses neither."""
    import torch
    from transformers import PrinterCallback

    events = log.get()
    stop = stop or StopRequest()
    metrics_path = work_dir / "metrics.jsonl"
    metrics_path.unlink(missing_ok=True)
    config = trainer_config(
        training, work_dir / "trainer", dtype_name=info["dtype"], use_cpu=not torch.cuda.is_available(),
        backend=info["backend"], evaluate=eval_dataset is not None and training.eval_every is not None, report_to=report_to,
    )
    started = time.monotonic()
    callback = _events_callback(metrics_path, started)
    callbacks = [callback]
    resume_from = checkpoints.resume_from if checkpoints else None
    if checkpoints:
        callbacks.append(_checkpoint_callback(checkpoints, stop, metrics_path))
    if eval_dataset is not None:
        callbacks.append(_final_evaluation_callback())
    if resume_from:
        _restore_metrics(resume_from, metrics_path, callback)
    if logging_dir:
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback

        callbacks.append(TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(logging_dir))))
    callbacks.extend(extra_callbacks)
    if training.method != "sft":
        # trl renders and tokenizes the conversational columns itself; input_ids is the rows for verification.
        dataset = dataset.remove_columns("input_ids")
        eval_dataset = eval_dataset.remove_columns("input_ids") if eval_dataset is not None else None
    trainer = make_trainer(trainer_variant or TrainerVariant(), config, method=training.method, model=model,
                           train_dataset=dataset, eval_dataset=eval_dataset, processing_class=tokenizer,
                           callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)  # it prints raw dicts to stdout; our callback emits events instead
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    resumed_step = checkpoint_step(resume_from) if resume_from else None
    events.info("train.started", rows=len(dataset), max_steps=training.max_steps, epochs=training.num_epochs,
                batch_size=training.batch_size, gradient_accumulation_steps=training.gradient_accumulation_steps,
                resumed_from_step=resumed_step, **info)
    # A checkpoint of the last step (SIGTERM in it): transformers checks max_steps only after a step, so resuming
    # would train one step past the end. The checkpoint's adapter is the trained one.
    finished = resumed_step is not None and 0 < training.max_steps <= resumed_step
    stop.in_training_loop = True
    out_of_memory = False
    try:
        if finished:
            _load_adapter(model, resume_from)
            events.info("train.already_finished", step=resumed_step)
        else:
            trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except torch.OutOfMemoryError:
        out_of_memory = True  # raised below, once this block has let go of the traceback and the tensors it holds
    finally:
        stop.in_training_loop = False
    if out_of_memory:
        step = trainer.state.global_step
        del trainer
        _release_gpu_memory(torch)
        raise _out_of_memory(step, training, info, resumed=resume_from is not None)
    if stop.requested:
        step = trainer.state.global_step
        # A signal after the last step's end (in a final evaluation, say) finds no step left to checkpoint after.
        saved = "its checkpoint is saved" if stop.saved_step == step else "a rerun resumes from the newest checkpoint"
        raise Preempted(f"stopped by SIGTERM after step {step}; {saved}", hint="run again with the same run id to resume")
    if finished and eval_dataset is not None and resumed_step not in callback.eval_steps:
        trainer.evaluate()  # no training loop ran to evaluate the final model in
    seconds = time.monotonic() - started
    losses = callback.losses
    tps = sorted(callback.tps)
    result = TrainResult(
        steps=resumed_step if finished else trainer.state.global_step,
        first_loss=losses[0] if losses else None,
        final_loss=losses[-1] if losses else None,
        seconds=round(seconds, 2),
        tokens_per_second=round(tps[len(tps) // 2], 1) if tps else None,
        peak_gpu_memory_gib=round(torch.cuda.max_memory_allocated() / 2**30, 3) if torch.cuda.is_available() else None,
        metrics_path=metrics_path,
        final_eval_loss=callback.eval_losses[-1] if callback.eval_losses else None,
        preference=dict(callback.preference) or None,
    )
    if REFERENCE_ADAPTER in getattr(model, "peft_config", {}):
        model.delete_adapter(REFERENCE_ADAPTER)  # what is exported and published is the trained adapter alone
    if result.final_loss is not None and not math.isfinite(result.final_loss):
        raise VerificationError(f"training diverged: final loss {result.final_loss}", hint="lower training.learning_rate")
    events.info("train.finished", steps=result.steps, first_loss=result.first_loss, final_loss=result.final_loss,
                final_eval_loss=result.final_eval_loss, preference=result.preference, seconds=result.seconds,
                tokens_per_second=result.tokens_per_second, peak_gpu_memory_gib=result.peak_gpu_memory_gib)
    return result


# The frozen copy of the adapter trl's DPO and KTO trainers add to a PeftModel as their reference.
REFERENCE_ADAPTER = "ref"


def checkpoint_step(checkpoint_dir: Path) -> int:
    """The step a Trainer checkpoint folder (checkpoint-N) was saved after."""
    return int(checkpoint_dir.name.rsplit("-", 1)[-1])


def _load_adapter(model, checkpoint_dir: Path) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(checkpoint_dir / "adapter_model.safetensors"))


def _release_gpu_memory(torch) -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _out_of_memory(step: int, training: TrainingSection, info: dict, resumed: bool) -> GpuOutOfMemory:
    import torch

    used = ""
    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        used = f"; {torch.cuda.max_memory_allocated() / 2**30:.1f} of {total / 2**30:.1f} GiB allocated at the peak"
    message = (f"the GPU ran out of memory in optimizer step {step + 1} (training.batch_size {training.batch_size} x "
               f"max_seq_length {training.max_seq_length}, gradient_checkpointing {training.gradient_checkpointing}, "
               f"precision {info.get('precision', 'n/a')}{used})")
    remedies = []
    if training.batch_size > 1:
        remedies.append(f"lower training.batch_size below {training.batch_size} (raise gradient_accumulation_steps to "
                        "keep the global batch)")
    if not training.gradient_checkpointing:
        remedies.append("set training.gradient_checkpointing: true")
    remedies.append("shorten training.max_seq_length or use a card with more memory (`job plan` shows what fits)")
    hint = "; ".join(remedies)
    if "batch_size" in (info.get("resolved") or {}).get("auto", []):
        hint = f"batch_size auto chose {training.batch_size} from job's memory estimate, which was too low here: {hint}"
    if resumed:  # the checkpoint resumes only the settings that wrote it, gradient checkpointing aside
        hint += ("; this run resumed a checkpoint: gradient_checkpointing: true resumes it, other changes need a new "
                 "run.id")
    return GpuOutOfMemory(message, step=step, hint=hint)


def run_fitting(model, tokenizer, dataset, training: TrainingSection, work_dir: Path, info: dict, *, may_halve: bool,
                **kwargs) -> TrainResult:
    """`run`, halving the batch size while the first optimizer step of this attempt runs out of GPU memory, when
    `may_halve`: the pipeline allows it for a batch size that `auto` chose, in a single process. Only the first step
    is retried: no weight has changed since the start (or the checkpoint, which the retry loads again).
    - A fresh run trains exactly as if auto had chosen the smaller batch.
    - A resumed run goes on with the checkpoint's optimizer state, learning-rate schedule and place in the data,
      which belong to its global batch: that is kept, by accumulating the smaller batches (batch 8 becomes 4 x 2).
      A card with less memory than the one that wrote the checkpoint (a spot run rescheduled to a smaller card,
      or an fp8 checkpoint going on with the 16-bit base) can still finish the run.
    The record of the auto choices (info["resolved"]) follows, so checkpoints and the manifest say what ran."""
    events = log.get()
    checkpoints = kwargs.get("checkpoints")
    resume_from = checkpoints.resume_from if checkpoints else None
    first_step = checkpoint_step(resume_from) if resume_from else 0
    while True:
        try:
            return run(model, tokenizer, dataset, training, work_dir, info, **kwargs)
        except GpuOutOfMemory as oom:
            if not (may_halve and oom.step == first_step and training.batch_size > 1):
                raise
            batch, accumulation = training.batch_size, training.gradient_accumulation_steps
            if resume_from:  # the largest smaller batch that divides this one, so batch x accumulation stays
                smaller = max(d for d in range(1, batch) if batch % d == 0)
                accumulation *= batch // smaller
            else:
                smaller = batch // 2
            events.warning("train.out_of_memory", step=oom.step + 1, batch_size=batch, retry_batch_size=smaller,
                           retry_gradient_accumulation_steps=accumulation)
            resolved = info.get("resolved")
            if resolved is not None:
                resolved["batch_size"] = smaller
                if resume_from:
                    resolved["gradient_accumulation_steps"] = accumulation
                resolved["reason"] = f"{resolved.get('reason', '')}; halved from {batch} after running out of memory"
            training = training.model_copy(update={"batch_size": smaller, "gradient_accumulation_steps": accumulation})
