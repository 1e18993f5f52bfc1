"""unsloth's QLoRA: the backend `auto` picks whenever CUDA is present.

`import unsloth` must come before transformers, trl and peft are imported anywhere in the process (it patches
them), so the pipeline loads this module before anything else heavy, and only this module imports it.
"""

from __future__ import annotations

import unsloth  # noqa: F401,I001 - must precede transformers/trl/peft
from unsloth import FastLanguageModel

from pathlib import Path

from job.spec import LoraSection, ModelSection, TrainingSection


def load_for_training(path: Path, model: ModelSection, lora: LoraSection, training: TrainingSection):
    import torch

    precision = "4bit" if model.precision == "auto" else model.precision
    dtype = None if model.dtype == "auto" else getattr(torch, model.dtype)
    base, tokenizer = FastLanguageModel.from_pretrained(
        model_name=str(path),
        max_seq_length=training.max_seq_length,
        dtype=dtype,
        load_in_4bit=precision == "4bit",
        # row-wise fp8 scaling: the variant measured to train; see docs/benchmarks.md for "block"
        load_in_fp8=True if precision == "fp8" else False,
        trust_remote_code=model.trust_remote_code,
        # device_map stays unsloth's default: under torchrun it puts each rank's copy on that rank's card
    )
    if precision == "fp8":
        # torchao's fp8 conversion switches inductor's coordinate-descent tuning on for the whole process and leaves
        # it on, so unsloth's per-layer compile then autotunes every kernel (minutes). Switch it back off.
        import torch._inductor.config as inductor

        inductor.coordinate_descent_tuning = False
        inductor.coordinate_descent_check_all_directions = False
    peft_model = FastLanguageModel.get_peft_model(
        base,
        r=lora.r,
        target_modules=list(lora.target_modules),
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        bias=lora.bias,
        use_gradient_checkpointing="unsloth" if training.gradient_checkpointing else False,
        random_state=training.seed,
        use_rslora=lora.use_rslora,
        init_lora_weights="loftq" if lora.loftq_config else True,
        loftq_config=lora.loftq_config or {},
    )
    used = peft_model.get_input_embeddings().weight.dtype if dtype is None else dtype
    info = {"backend": "unsloth", "precision": precision, "dtype": str(used).removeprefix("torch.")}
    return peft_model, tokenizer, info


def for_inference(peft_model) -> None:
    FastLanguageModel.for_inference(peft_model)
