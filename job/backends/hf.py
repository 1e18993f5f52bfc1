"""transformers + peft (+ bitsandbytes 4-bit on CUDA): the backend that runs anywhere."""

from __future__ import annotations

from pathlib import Path

from job.errors import SpecError
from job.model import load_tokenizer
from job.spec import LoraSection, ModelSection, TrainingSection


def compute_dtype(model: ModelSection):
    import torch

    if model.dtype != "auto":
        return getattr(torch, model.dtype)
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def precision(model: ModelSection) -> str:
    import torch

    if model.precision == "auto":
        return "4bit" if torch.cuda.is_available() else "16bit"
    if model.precision == "4bit" and not torch.cuda.is_available():
        raise SpecError("model.precision: 4bit (QLoRA) needs a CUDA GPU", hint="use precision: 16bit or auto on CPU")
    return model.precision


def lora_config(lora: LoraSection, seed: int):
    from peft import LoftQConfig, LoraConfig

    extra = {}
    if lora.loftq_config:
        extra = {"init_lora_weights": "loftq", "loftq_config": LoftQConfig(**lora.loftq_config)}
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        bias=lora.bias,
        target_modules=list(lora.target_modules),
        use_rslora=lora.use_rslora,
        task_type="CAUSAL_LM",
        **extra,
    )


def load_for_training(path: Path, model: ModelSection, lora: LoraSection, training: TrainingSection):
    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    mode = precision(model)
    dtype = compute_dtype(model)
    kwargs = {"dtype": dtype, "trust_remote_code": model.trust_remote_code, "use_safetensors": True}
    if mode == "4bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        )
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    base = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    base.config.use_cache = False
    if mode == "4bit":
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=training.gradient_checkpointing)
    elif training.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    # LoRA's A matrices start random: seed them, or the same spec trains a different adapter every time.
    from transformers import set_seed

    set_seed(training.seed)
    peft_model = get_peft_model(base, lora_config(lora, training.seed))
    tokenizer = load_tokenizer(path, model.trust_remote_code)
    info = {"backend": "hf", "precision": mode, "dtype": str(dtype).removeprefix("torch.")}
    return peft_model, tokenizer, info


def for_inference(peft_model) -> None:
    peft_model.eval()
