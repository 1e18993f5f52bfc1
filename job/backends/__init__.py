"""The training backend seam: each backend loads a model with LoRA adapters for training; the loop is shared.

A backend module exposes `load_for_training(model_path, model, lora, training) -> (peft_model, tokenizer, info)`.
Heavy imports (torch, transformers, unsloth) live inside the backend modules and nowhere above them.
"""

from __future__ import annotations

import importlib

from job.errors import SpecError
from job.spec import TrainingSection

BACKENDS = {"hf": "job.backends.hf", "unsloth": "job.backends.unsloth"}


def pick(training: TrainingSection, cuda: bool) -> str:
    if training.backend == "auto":
        return "unsloth" if cuda else "hf"
    if training.backend == "unsloth" and not cuda:
        raise SpecError("training.backend: unsloth needs a CUDA GPU", hint="use backend: hf (or auto) on CPU")
    return training.backend


def check_precision(precision: str, backend: str, capability: tuple[int, int] | None) -> None:
    """fp8 needs unsloth on a card with fp8 matmuls (Hopper or newer): refused, never silently replaced."""
    if precision != "fp8":
        return
    if backend != "unsloth" or capability is None:
        raise SpecError("model.precision: fp8 needs the unsloth backend on a CUDA GPU",
                        hint="use precision 4bit or 16bit here, or run on an H100/H200")
    if capability < (9, 0):
        raise SpecError(f"model.precision: fp8 needs compute capability 9.0 or newer; this GPU has "
                        f"{capability[0]}.{capability[1]}", hint="use precision 4bit or 16bit, or run on an H100/H200")


def load(name: str):
    return importlib.import_module(BACKENDS[name])
