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


def load(name: str):
    return importlib.import_module(BACKENDS[name])
