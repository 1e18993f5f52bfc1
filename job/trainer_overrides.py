"""The trainer's speed-specific parts: every place where job overrides, or depends on, a name that transformers, trl,
unsloth or torch does not document as public.

They are checked against the versions pyproject.toml pins: transformers 5.17.0, trl 1.14.2, accelerate 1.15.0,
unsloth 2026.10.9 and torch 2.11-2.14. Before moving a pin, read the methods named below in the new version;
tests/unit/test_trainer_overrides.py fails when one is missing or has a new signature, and
tests/unit/test_train_tokens.py trains with these parts and with transformers' own loop and compares the results.

Private methods of transformers' `Trainer` that `lean_trainer`'s class overrides (under SFTTrainer for sft; under
trl's DPOTrainer, KTOTrainer and trl.experimental's ORPOTrainer for the preference methods):
- `_track_num_input_tokens(inputs)`: transformers reads each micro-batch's token count back with `.item()` right after
  queuing its backward, so the GPU idles while the host queues clipping and the optimizer step. The override keeps
  the count on the device until the host waits anyway: a log line (`log`) or a checkpoint.
- `_save_checkpoint(model, trial)`: extended to add that pending count first, so a checkpoint's
  `state.num_input_tokens_seen` is complete and a resumed run counts on from the right number.
- `_clip_grad_norm(model)`: transformers clips `model.parameters()`, a walk over every module each step; the trainable
  parameters alone give the same norm. Sharded, sagemaker and mixed-mesh setups keep transformers' own path, which
  the override finds out by calling the private `_has_mixed_mesh_grads(model)`.

Names `lean_trainer`'s class adds beside transformers' own, which must not clash with theirs: the attributes
`_pending_tokens` and `_trainable` and the method `_flush_token_count` (transformers 5.17.0 and trl 1.14.2 use none, in
the SFT, DPO, KTO and ORPO trainers).

Undocumented behaviour relied on:
- `SFTTrainer.compute_loss` is skipped for `Trainer.compute_loss`: trl's adds per-step entropy and token accuracy (a
  softmax over the full logits and several host syncs) that job does not log, and adds nothing to the loss itself.
- transformers calls `model.train()` in `training_step` and `model.zero_grad()` after each optimizer step, both
  through the model object, so the instance attributes `ModuleWalksOnce` sets over torch's `nn.Module.train` and
  `nn.Module.zero_grad` take their place while the trainer trains.
- `trainer.data_collator` is replaced after the trainer is made: transformers reads it only when `train()` builds the
  data loader (`Trainer._get_dataloader`).
- unsloth 2026.10.9 patches the Trainer's `_inner_training_loop` and training step when imported. Its loop still runs
  transformers' `_run_epoch`, which calls the methods above, and its step already skips the `model.train()` walk.
  The CPU tests do not import unsloth: only a run on a GPU checks this.

Named for bench/train_throughput.py only:
- `STEP_PHASES` lists the `Trainer` methods one step runs through, two of them private (`_clip_grad_norm`,
  `_maybe_log_save_evaluate`), for the bench to time them.
- The environment variable `UNSLOTH_MIXED_PRECISION=bfloat16` (its `noautocast` variant) stops unsloth from turning
  bf16 autocast back on; unsloth does not document it.

Elsewhere: job/backends/unsloth.py switches `torch._inductor.config.coordinate_descent_tuning` (and
`coordinate_descent_check_all_directions`) back off after torchao's fp8 conversion leaves them on for the process,
or unsloth's per-layer compile autotunes every kernel for minutes.

Nothing here imports transformers or trl at import time: `import unsloth` must precede them, and job.train, which
imports this module, is imported as the CLI starts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

# The Trainer methods one optimizer step runs through, each with the part of the step it stands for.
STEP_PHASES = (("get_batch_samples", "next_batch"), ("training_step", "forward_backward"), ("_clip_grad_norm", "clip"),
               ("_maybe_log_save_evaluate", "log"))


class WithoutFullAttentionMask:
    """trl's collator, leaving out an attention mask that masks nothing (a batch without padding, not packed).

    For a causal model no mask and a mask of ones are the same computation, but not the same cost: with the mask,
    job's step at 1B batch 2 was 8% slower than the bare unsloth loop in the same process (median of four processes,
    docs/benchmarks.md). The check runs where the batch is collated (a data loader worker, on the CPU), so it costs
    the training process nothing. A padded batch keeps its mask; so does a packed one (with position_ids), where
    leaving it out would let unsloth infer the sequence boundaries and change what attends to what."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, examples):
        batch = self.collate(examples)
        mask = batch.get("attention_mask")
        if mask is not None and "position_ids" not in batch and bool(mask.all()):
            del batch["attention_mask"]
        return batch


class ModuleWalksOnce:
    """While trl's loop trains: `model.train()` walks the module tree only when the model is not in training mode
    already, and `model.zero_grad()` drops the trainable parameters' gradients, the only ones there are.

    transformers calls both on every step, and each walks every module (1,337 of them for a 16-layer Llama with LoRA
    on all 7 projections): 1.5-2.9 ms for zero_grad() on the H200's host, where a 1B step at batch 2 is bound by the
    host (docs/benchmarks.md). unsloth's patched training step already skips the train() walk; the hf backend's does
    not.

    The first `train()` always walks in full (a loaded model's wrapper can be in training mode over an inner model in
    eval mode), and so does the first after an `eval()` (an evaluation). A submodule switched to eval mode by hand,
    while the model itself stays in training mode, stays in eval mode until then."""

    def __init__(self, model, trainable):
        self.model, self.trainable, self.walked = model, trainable, False

    def train(self, mode: bool = True):
        if mode and self.walked and self.model.training:
            return self.model
        self.walked = bool(mode)
        return self.walk(mode)

    def zero_grad(self, set_to_none: bool = True) -> None:
        if not set_to_none:
            return self.clear(set_to_none)
        for parameter in self.trainable:
            parameter.grad = None

    def __enter__(self):
        self.saved = {name: self.model.__dict__[name] for name in ("train", "zero_grad") if name in self.model.__dict__}
        self.walk, self.clear = self.model.train, self.model.zero_grad  # the model's own, whoever defined them
        self.model.train, self.model.zero_grad = self.train, self.zero_grad
        return self

    def __exit__(self, *exc) -> None:
        del self.model.train, self.model.zero_grad
        self.model.__dict__.update(self.saved)


def lean_trainer(base: type) -> type:
    """`base` (one of trl's trainers) with the step's host-side costs removed: the token count read back each
    micro-batch, the module walks of `model.train()`/`model.zero_grad()` and of gradient clipping, the FLOP count."""

    class LeanTrainer(base):
        # transformers counts the tokens of each micro-batch with `.item()` right after its backward is queued, so
        # the GPU idles while the host then queues gradient clipping and the optimizer step. Keep the count on the
        # device and read it where the host waits anyway: when a log line reads the loss, and before a checkpoint.
        _pending_tokens = None

        def _track_num_input_tokens(self, inputs):
            import torch

            # A preference batch holds each pair's two sequences, as one batch (dpo, kto) or side by side (orpo).
            masks = [inputs[key] for key in ("attention_mask", "chosen_attention_mask", "rejected_attention_mask")
                     if inputs.get(key) is not None]
            count = 0
            if not masks:  # no padding to skip: a mask of ones left out, or trl's padding-free rows
                count = inputs[getattr(self.model, "main_input_name", "input_ids")].numel()
            for mask in masks:
                if mask.device.type == "cpu":
                    count += int(mask.sum())  # no device involved, nothing to wait for
                else:
                    count = mask.sum(dtype=torch.int64) + count  # queued behind the backward, read at the next flush
            self._pending_tokens = count if self._pending_tokens is None else self._pending_tokens + count

        def _flush_token_count(self):
            import torch

            if self._pending_tokens is None:
                return
            pending = torch.as_tensor(self._pending_tokens, dtype=torch.int64).to(self.args.device)
            self.state.num_input_tokens_seen += int(self.accelerator.gather(pending).sum().item())
            self._pending_tokens = None

        def log(self, logs, start_time=None):
            self._flush_token_count()
            super().log(logs, start_time)

        def _save_checkpoint(self, model, trial):
            self._flush_token_count()
            return super()._save_checkpoint(model, trial)

        def floating_point_ops(self, inputs):
            # The trainer's FLOP count walks every parameter of the model on each micro-batch; nothing reads it.
            return 0

        _trainable = None  # the parameters that get gradients, listed once a train()

        def train(self, *args, **kwargs):
            self._trainable = [p for p in self.model.parameters() if p.requires_grad]
            try:
                with ModuleWalksOnce(self.model, self._trainable):
                    return super().train(*args, **kwargs)
            finally:
                self._trainable = None

        def _clip_grad_norm(self, model):
            # transformers clips model.parameters(), a walk of every module a step; the frozen ones have no gradient
            # to clip. Sharded and sagemaker setups keep transformers' own path: theirs compare the list to the model's.
            from accelerate.utils import DistributedType
            from transformers.utils import is_sagemaker_mp_enabled

            plain = self.accelerator.distributed_type in (DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU)
            if self._trainable is None or not plain or is_sagemaker_mp_enabled() or self._has_mixed_mesh_grads(model):
                return super()._clip_grad_norm(model)
            return self.accelerator.clip_grad_norm_(self._trainable, self.args.max_grad_norm)

    LeanTrainer.__name__ = LeanTrainer.__qualname__ = f"Lean{base.__name__}"
    return LeanTrainer


def lean_sft_trainer() -> type:
    """The trainer class `job run` trains with (a new class each call, so a caller may subclass or change it alone)."""
    from transformers import Trainer
    from trl import SFTTrainer

    class LeanSFTTrainer(lean_trainer(SFTTrainer)):
        """trl's SFTTrainer without its per-step entropy and token-accuracy metrics: they take a softmax over the
        full logits (batch × sequence × vocabulary) and several host syncs every step, for numbers we do not log.
        The loss is the model's own, exactly as SFTTrainer computes it."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    return LeanSFTTrainer


def preference_trainer(method: str) -> type:
    """trl's trainer for a preference method (unsloth's patched one once unsloth is imported), made lean."""
    if method == "dpo":
        from trl import DPOTrainer as base
    elif method == "kto":
        from trl import KTOTrainer as base
    elif method == "orpo":
        from trl.experimental.orpo import ORPOTrainer as base
    else:
        raise ValueError(f"no preference trainer for method {method!r}")
    return lean_trainer(base)


@dataclass(frozen=True)
class TrainerVariant:
    """How a run's trainer departs from the one `job run` trains with, for a benchmark or a test that compares the two
    in one process; the default departs in nothing.

    trainer_class: made instead of `lean_sft_trainer()`'s class (or `preference_trainer(method)`'s), with the same
        arguments (a subclass of it, or of the trl trainer it extends).
    configure: called with the run's SFTConfig before the trainer is made, to change it in place.
    full_attention_mask: pass trl's attention mask to the model even where it masks nothing, as trl does."""

    trainer_class: type | None = None
    configure: Callable[[object], None] | None = None
    full_attention_mask: bool = False


def make_trainer(variant: TrainerVariant, args, method: str = "sft", **kwargs):
    """The trainer for `args` (the method's trl config) and trl's other arguments in `kwargs`, as `variant` asks."""
    if variant.configure is not None:
        variant.configure(args)
    default = lean_sft_trainer if method == "sft" else lambda: preference_trainer(method)
    trainer = (variant.trainer_class or default())(args=args, **kwargs)
    # A preference trainer's loss reads the attention mask itself.
    if method == "sft" and not variant.full_attention_mask:
        trainer.data_collator = WithoutFullAttentionMask(trainer.data_collator)  # read when train() makes its loader
    return trainer
