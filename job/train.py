"""The shared training loop: trl's SFTTrainer over the backend's model, with every argument from the spec.

unsloth patches trl's SFTConfig defaults when imported, so nothing here relies on a library default.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

from job import log
from job.spec import TrainingSection


@dataclass
class TrainResult:
    steps: int
    first_loss: float | None
    final_loss: float | None
    seconds: float
    tokens_per_second: float | None
    peak_gpu_memory_gib: float | None
    metrics_path: Path


def sft_config(training: TrainingSection, output_dir: Path, *, dtype_name: str, use_cpu: bool, backend: str):
    from trl import SFTConfig

    return SFTConfig(
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
        save_strategy="no",
        report_to=[],
        max_length=training.max_seq_length,
        packing=training.packing,
        padding_free=False,
        completion_only_loss=None,
        assistant_only_loss=False,
        # the backend switched checkpointing on while loading (unsloth's own variant on GPU)
        gradient_checkpointing=False,
        bf16=dtype_name == "bfloat16",
        fp16=dtype_name == "float16",
        use_cpu=use_cpu,
        dataloader_num_workers=0,
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=True,
        remove_unused_columns=True,
        dataset_num_proc=None,
    )


def _events_callback(metrics_path: Path, started: float):
    import torch
    from transformers import TrainerCallback

    events = log.get()

    class StepEvents(TrainerCallback):
        def __init__(self):
            self.last_tokens, self.last_time = 0, started
            self.losses: list[float] = []
            self.tps: list[float] = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
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
            }
            if torch.cuda.is_available():
                record["gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
            self.losses.append(float(record["loss"]))
            if state.global_step > 1:
                self.tps.append(rate)
            with open(metrics_path, "a") as fh:
                fh.write(json.dumps(record) + "\n")
            events.info("train.step", **record)

    return StepEvents()


def _LeanSFTTrainer():
    from transformers import Trainer
    from trl import SFTTrainer

    class LeanSFTTrainer(SFTTrainer):
        """trl's SFTTrainer without its per-step entropy and token-accuracy metrics: they take a softmax over the
        full logits (batch × sequence × vocabulary) and several host syncs every step, for numbers we do not log.
        The loss is the model's own, exactly as SFTTrainer computes it."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    return LeanSFTTrainer


def run(model, tokenizer, dataset, training: TrainingSection, work_dir: Path, info: dict) -> TrainResult:
    import torch
    from transformers import PrinterCallback

    events = log.get()
    metrics_path = work_dir / "metrics.jsonl"
    metrics_path.unlink(missing_ok=True)
    config = sft_config(
        training, work_dir / "trainer", dtype_name=info["dtype"], use_cpu=not torch.cuda.is_available(), backend=info["backend"]
    )
    started = time.monotonic()
    callback = _events_callback(metrics_path, started)
    trainer = _LeanSFTTrainer()(model=model, args=config, train_dataset=dataset, processing_class=tokenizer, callbacks=[callback])
    trainer.remove_callback(PrinterCallback)  # it prints raw dicts to stdout; our callback emits events instead
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    events.info("train.started", rows=len(dataset), max_steps=training.max_steps, epochs=training.num_epochs,
                batch_size=training.batch_size, gradient_accumulation_steps=training.gradient_accumulation_steps, **info)
    trainer.train()
    seconds = time.monotonic() - started
    losses = callback.losses
    tps = sorted(callback.tps)
    result = TrainResult(
        steps=trainer.state.global_step,
        first_loss=losses[0] if losses else None,
        final_loss=losses[-1] if losses else None,
        seconds=round(seconds, 2),
        tokens_per_second=round(tps[len(tps) // 2], 1) if tps else None,
        peak_gpu_memory_gib=round(torch.cuda.max_memory_allocated() / 2**30, 3) if torch.cuda.is_available() else None,
        metrics_path=metrics_path,
    )
    if result.final_loss is not None and not math.isfinite(result.final_loss):
        from job.errors import VerificationError

        raise VerificationError(f"training diverged: final loss {result.final_loss}", hint="lower training.learning_rate")
    events.info("train.finished", steps=result.steps, first_loss=result.first_loss, final_loss=result.final_loss,
                seconds=result.seconds, tokens_per_second=result.tokens_per_second,
                peak_gpu_memory_gib=result.peak_gpu_memory_gib)
    return result
