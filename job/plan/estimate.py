"""Predict a (Q)LoRA run's peak GPU memory, tokens/s and the configuration that fits, without a GPU or weights.

Everything here is arithmetic over an architecture (the numbers in a config.json), a card from the shipped GPU
table and the spec's training choices, so `job plan` runs on a laptop and `job run` calls `choose_for_spec` to
resolve `training.batch_size: auto`, `training.gradient_checkpointing: auto` and `model.precision: auto` before
loading anything. No torch and no I/O beyond the package's own tables (job/resources/).

The constants were fitted to measurements on an H100 80GB (bench/results/2026-11-25-h100-plan-calibration);
docs/plan.md explains the formulas and their known error. Other cards are predicted by scaling with their published
dense bf16 rate and memory bandwidth (job/resources/gpus.yaml).
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import asdict, dataclass
from functools import cache
from importlib import resources
from typing import Any, Literal

import yaml

from job.errors import SpecError

GIB = 2**30


Precision = Literal["4bit", "16bit", "fp8"]


Backend = Literal["unsloth", "hf"]


# --- memory constants (bytes) -----------------------------------------------------------------------------------
# bitsandbytes NF4 with double quantization: 4 bits, an 8-bit absmax per 64 weights, an fp32 absmax per 256 blocks.
BYTES_PER_WEIGHT = {"4bit": 0.5 + 1 / 64 + 4 / (64 * 256), "16bit": 2.0, "fp8": 1.0}


# Optimizer state per trainable parameter (bitsandbytes keeps two uint8 moments; torch's AdamW two fp32 moments).
OPTIMIZER_BYTES = {"adamw_8bit": 2, "paged_adamw_8bit": 2, "adamw_torch": 8, "adamw_torch_fused": 8, "sgd": 0}


LORA_WEIGHT_BYTES = 4  # peft keeps adapters in fp32 over a 16-bit or 4-bit base; gradients likewise


BUFFERS_GIB = 0.03  # rotary tables, norms, cuBLAS workspace: measured static minus the weights (1B, 3B)


WORKSPACE_GIB = 0.10  # activations' intercept at zero tokens in the unsloth fits


# unsloth: activation bytes per token, in units of one decoder layer's saved tensors (`Arch.layer_bytes`).
UNSLOTH_FULL_LAYERS = 1.13  # no checkpointing: every layer's tensors, 13% over the counted ones (1B, 8B fit)


UNSLOTH_CHECKPOINTED_LAYERS = 2.42  # offloaded checkpointing: about two layers' worth stays on the GPU (1B, 8B fit)


# transformers+peft QLoRA: prepare_model_for_kbit_training casts embeddings and head to fp32, the residual stream
# follows, and attention over fp32 inputs materializes its score matrix (b x heads x s x s).
HF_LOGIT_BYTES = 6.57  # per token and vocabulary entry (fp32 logits and their softmax/gradient copies)


HF_SCORE_BYTES_CHECKPOINTED = 9.03  # per token, head and key position, one layer at a time


HF_SCORE_BYTES_FULL = 5.86  # per layer, token, head and key position when every layer keeps its scores


CUDA_CONTEXT_GIB = 0.8  # mem_get_info's used minus torch's reserved on the H100, CUDA 13


ALLOCATOR_OVERHEAD = 0.05  # torch's reserved over allocated at the peak (unsloth runs: 1-6%)


# --- speed constants --------------------------------------------------------------------------------------------
MATMUL_EFFICIENCY = 0.837  # achieved fraction of the card's dense bf16 rate on the model's matmuls (fit)


ACTIVATION_TRAFFIC = 24.4  # bytes moved per byte of saved activation (elementwise ops, LoRA paths, norms) (fit)


FP32_EFFICIENCY = 0.293  # hf: fp32 head and attention run at this fraction of the card's fp32 rate (fit)


FP8_MATMUL_SPEEDUP = 1.22  # unsloth fp8 vs bf16 on the base projections, H100 8B measurement


DEQUANT_BYTES_PER_WEIGHT = 1.69  # 4-bit: extra bytes moved per weight per pass to dequantize (8B 4bit vs 16bit)


# Per layer and optimizer step, time the GPU waits on the host (kernel launches, Python): small models at small
# batches are bound by it, so their tokens/s grow with batch size almost for free.
HOST_SECONDS_PER_LAYER = {("4bit", True): 0.0117, ("4bit", False): 0.0086, ("16bit", True): 0.0089, ("16bit", False): 0.0065}


OVERLAP_NORM = 5.35  # step time = (host^p + gpu^p)^(1/p): the two overlap, imperfectly
# unsloth runs a packed batch (padding-free: several documents a row, with their lengths) through each layer uncompiled,
# and its attention as one SDPA call per run of equal-length documents (torch 2.11 has no varlen kernel with GQA):
# 0.51 s more a step of 4 x 2048 tokens without checkpointing and 0.54 s with it, at the 8B shape on an H100 (fp8,
# FineTome-like rows, 4 documents a sequence; bench/results/2026-12-06-h100-packed-rows-vs-fixed). Modelled as
# unfused elementwise traffic: bytes per token, layer and unit of hidden size, over the card's memory bandwidth.
PACKED_BYTES_PER_TOKEN_LAYER_HIDDEN = 1636


# --- training methods (training.method) ------------------------------------------------------------------------


Method = Literal["sft", "dpo", "orpo", "kto"]


@dataclass(frozen=True)
class Sequences:
    """What one row of a training method runs in a step: sequences through forward and backward, sequences run
    forward without gradient (no activations kept), and whether a frozen copy of the adapter, the reference, runs
    forward over all of them."""

    trained: int
    untrained: int
    reference: bool

    @property
    def per_row(self) -> int:
        return self.trained + self.untrained

    @property
    def forward_only(self) -> int:
        """Sequence forwards a row without gradient: the untrained ones and the reference's."""
        return self.untrained + (self.per_row if self.reference else 0)


# dpo, orpo: chosen and rejected, concatenated into one batch. kto: the completion, plus a mismatched completion for
# the KL term. dpo and kto run the reference every step (job.train turns trl's precompute_ref_log_probs off).
METHOD_SEQUENCES = {"sft": Sequences(1, 0, False), "dpo": Sequences(2, 0, True), "orpo": Sequences(2, 0, False),
                    "kto": Sequences(1, 1, True)}


# A forward without gradient, as a fraction of a training step over the same sequences (a backward costs about two
# forwards). Not measured.
FORWARD_ONLY_FRACTION = 1 / 3


# unsloth's fused loss never materializes the logits, but trl's preference trainers take log-probabilities from
# them: bf16 logits and their gradient per trained token and vocabulary entry. A floor from the tensors' sizes (trl's
# fp32 log-softmax copies may add more), not measured. The hf fit already counts logits per token.
UNSLOTH_PREFERENCE_LOGIT_BYTES = 4


REFERENCE_GPU = "h100-sxm"  # the card the constants were fitted on


FP8_MIN_CAPABILITY = (9, 0)  # spec: model.precision fp8 needs compute capability >= 9.0


# `precision: auto` picks fp8 only without gradient checkpointing: with unsloth's checkpointing every decoder layer is
# compiled twice, and on the 8B shape the first step had not come after 3 minutes (docs/benchmarks.md). Named in the
# spec (`precision: fp8`), fp8 with checkpointing is still allowed. Nor for a model with a projection that fp8 cannot
# hold (Arch.fp8_compatible): that weight would stay bf16 and need more memory than predicted.
PRECISION_ORDER = ("16bit", "fp8", "4bit")  # ties in speed go to the more precise base


@dataclass(frozen=True)
class Arch:
    """A decoder-only transformer's shape: the numbers the estimates need from a config.json."""

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    num_experts: int = 1  # mixture of experts: every expert is held in memory, experts_per_token run per token
    experts_per_token: int = 1

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def projections(self) -> dict[str, tuple[int, int, int]]:
        """Per layer: module name → (in features, out features, copies)."""
        h, i, e = self.hidden_size, self.intermediate_size, self.num_experts
        return {"q_proj": (h, self.q_dim, 1), "k_proj": (h, self.kv_dim, 1), "v_proj": (h, self.kv_dim, 1),
                "o_proj": (self.q_dim, h, 1), "gate_proj": (h, i, e), "up_proj": (h, i, e), "down_proj": (i, h, e)}

    @property
    def fp8_compatible(self) -> bool:
        """Every projection can be stored in fp8: torchao's `_scaled_mm` needs both dimensions to be multiples of 16,
        and it silently leaves any other weight in bf16 (torchao 0.18, quantization/utils.py `_fp8_mm_compat`)."""
        return all(fan_in % 16 == 0 and fan_out % 16 == 0 for fan_in, fan_out, _ in self.projections().values())

    def linear_params(self, active: bool = False) -> int:
        """Parameters of the decoder layers' projections (what 4-bit/fp8 quantizes); `active`: those one token uses."""
        per_layer = 0
        for fan_in, fan_out, copies in self.projections().values():
            per_layer += fan_in * fan_out * (min(copies, self.experts_per_token) if active else copies)
        return self.num_layers * per_layer

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def head_params(self) -> int:
        """The output head's own parameters: none when it shares the embedding matrix."""
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    @property
    def layer_bytes(self) -> int:
        """bf16 bytes one decoder layer saves per token for backward: the layer input, both norm outputs, q, k, v,
        the attention output, the MLP input and its gate and up projections (flash attention saves no scores)."""
        h, i = self.hidden_size, self.intermediate_size * min(self.num_experts, self.experts_per_token)
        return 2 * (4 * h + 2 * self.q_dim + 2 * self.kv_dim + 2 * i)

    def lora_params(self, r: int, target_modules: list[str] | tuple[str, ...]) -> int:
        shapes = self.projections()
        per_layer = sum(r * (shapes[m][0] + shapes[m][1]) * shapes[m][2] for m in target_modules if m in shapes)
        return self.num_layers * per_layer

    @property
    def total_params(self) -> int:
        return self.linear_params() + self.embedding_params + self.head_params


def arch_from_config(config: dict[str, Any], name: str = "") -> Arch:
    """An `Arch` from a Hugging Face config.json (or the same numbers from GGUF metadata / the shipped table)."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config

    def first(*keys: str, default: Any = None) -> Any:
        for key in keys:
            if text.get(key) is not None:
                return text[key]
        return default

    hidden = first("hidden_size", "n_embd", "d_model")
    layers = first("num_hidden_layers", "n_layer", "num_layers")
    heads = first("num_attention_heads", "n_head")
    vocab = first("vocab_size")
    missing = [k for k, v in {"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
                              "vocab_size": vocab}.items() if not v]
    if missing:
        raise SpecError(f"model config of {name or 'the model'} lacks {', '.join(missing)}: not a decoder-only LM config")
    experts = int(first("num_local_experts", "num_experts", "n_routed_experts", default=1) or 1)
    intermediate = first("moe_intermediate_size") if experts > 1 and first("moe_intermediate_size") else None
    intermediate = intermediate or first("intermediate_size", "n_inner", "ffn_dim", default=None) or 4 * hidden
    # A config that does not say is treated as untied (Llama, Mistral and Qwen2 configs default to untied), which
    # counts the larger memory.
    tied = config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    return Arch(
        name=name or str(config.get("_name_or_path") or config.get("model_type") or "model"),
        hidden_size=int(hidden),
        num_layers=int(layers),
        num_heads=int(heads),
        num_kv_heads=int(first("num_key_value_heads", default=heads)),
        head_dim=int(first("head_dim", default=None) or hidden // heads),
        intermediate_size=int(intermediate),
        vocab_size=int(vocab),
        tie_word_embeddings=bool(tied),
        num_experts=experts,
        experts_per_token=int(first("num_experts_per_tok", "num_experts_per_token", default=1) or 1) if experts > 1 else 1,
    )


# Name parts that do not change the architecture: unsloth's pre-quantized uploads, chat tunes, the hub org.
_NEUTRAL_PARTS = {"instruct", "it", "chat", "bnb", "4bit", "unsloth", "hf", "base", "dynamic", "gguf", "fp8", "awq", "gptq"}


def normalize_model_id(model_id: str) -> str:
    """'unsloth/Meta-Llama-3.1-8B-Instruct-bnb-4bit' → 'llama-3.1-8b' (the key of job/resources/architectures.yaml)."""
    last = re.split(r"[/:]", model_id.rstrip("/"))[-1].lower()
    last = re.sub(r"\.(gguf|safetensors)$", "", last)
    last = re.sub(r"[.-](i?q\d\w*|f16|bf16|f32)$", "", last)  # a GGUF file's quantization tag
    parts = [p for p in last.split("-") if p and p not in _NEUTRAL_PARTS]
    if parts and parts[0] == "meta":
        parts = parts[1:]
    return "-".join(parts)


@cache
def shipped_table(name: str) -> dict[str, Any]:
    """One of the tables shipped in job/resources/ (gpus.yaml, architectures.yaml, prices.yaml)."""
    return yaml.safe_load(resources.files("job").joinpath("resources", name).read_text())


def known_architectures() -> dict[str, dict[str, Any]]:
    return shipped_table("architectures.yaml")["architectures"]


def arch_from_table(model_id: str) -> Arch | None:
    """The shipped config of a well-known model, matched on its normalized id and the table's aliases."""
    wanted = normalize_model_id(model_id)
    for key, entry in known_architectures().items():
        names = {key, *(normalize_model_id(a) for a in entry.get("aliases", []))}
        if wanted in names:
            return arch_from_config(entry["config"], name=key)
    return None


@dataclass(frozen=True)
class Gpu:
    kind: str
    name: str
    memory_gib: float  # what torch.cuda reports as total memory
    bf16_tflops: float  # dense (no sparsity) bf16 tensor rate, published
    fp32_tflops: float  # non-tensor fp32 rate, published
    bandwidth_gbs: float  # memory bandwidth, GB/s, published
    compute_capability: tuple[int, int]

    @property
    def supports_fp8(self) -> bool:
        return self.compute_capability >= FP8_MIN_CAPABILITY


def gpus() -> dict[str, Gpu]:
    out = {}
    for kind, entry in shipped_table("gpus.yaml")["gpus"].items():
        major, minor = (int(x) for x in str(entry["compute_capability"]).split("."))
        out[kind] = Gpu(kind=kind, name=entry["name"], memory_gib=float(entry["memory_gib"]),
                        bf16_tflops=float(entry["bf16_tflops"]), fp32_tflops=float(entry["fp32_tflops"]),
                        bandwidth_gbs=float(entry["bandwidth_gbs"]), compute_capability=(major, minor))
    return out


# Names users and providers write for the table's kinds, normalized as `_gpu_key` does. A bare "A100" is SkyPilot's
# and Lambda's 40GB card; a bare "H100" is the SXM card the clouds rent most.
GPU_ALIASES = {
    "h100": "h100-sxm", "h100-80gb": "h100-sxm", "h100-sxm5": "h100-sxm", "h100-80gb-hbm3": "h100-sxm",
    "h100-sxm-80gb": "h100-sxm", "h100-80gb-sxm": "h100-sxm", "h100-mega-80gb": "h100-sxm",
    "h100-80gb-pcie": "h100-pcie", "h100-pcie-80gb": "h100-pcie",
    "h200-141gb": "h200", "h200-sxm": "h200", "h200-sxm-141gb": "h200", "h200-141gb-hbm3e": "h200",
    "a100": "a100-40gb", "a100-40gb-sxm4": "a100-40gb", "a100-sxm4": "a100-40gb", "a100-sxm4-40gb": "a100-40gb",
    "a100-pcie-40gb": "a100-40gb", "a100-pcie": "a100-40gb",
    "a100-80gb-sxm4": "a100-80gb", "a100-sxm4-80gb": "a100-80gb", "a100-80gb-pcie": "a100-80gb",
    "a100-pcie-80gb": "a100-80gb", "a100-sxm": "a100-80gb",
    "l40s-48gb": "l40s", "l4-24gb": "l4", "a10g-24gb": "a10g",
    "4090": "rtx-4090", "rtx4090": "rtx-4090", "rtx-4090-24gb": "rtx-4090",
}


def _gpu_key(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' (RunPod), 'H100:8' (SkyPilot), 'gpu_8x_h100_sxm5' (Lambda) → 'h100-80gb-hbm3', …"""
    key = name.strip().lower()
    key = re.sub(r":\d+$", "", key)  # SkyPilot's count
    key = re.sub(r"^gpu_\d+x_", "", key)  # Lambda's instance type
    key = re.sub(r"\b(nvidia|geforce|tesla)\b", "", key)
    return re.sub(r"[\s_-]+", "-", key).strip("-")


def gpu(name: str) -> Gpu:
    """The table's card for a name as users and providers write it: a kind of job/resources/gpus.yaml, a common
    name in any case (H100, a100-80gb, L4), RunPod's GPU type id, SkyPilot's accelerator or Lambda's instance type."""
    table = gpus()
    key = _gpu_key(name)
    kind = name if name in table else key if key in table else GPU_ALIASES.get(key)
    if kind is None:
        kind = next((k for k in table if any(d.lower() in name.lower() for d in _device_names(k))), None)
    if kind is None:
        close = difflib.get_close_matches(key, [*table, *GPU_ALIASES], n=1, cutoff=0.5)
        suggestion = f"did you mean {GPU_ALIASES.get(close[0], close[0])}? " if close else ""
        raise SpecError(f"unknown GPU {name!r}: job/resources/gpus.yaml has no figures for it",
                        hint=f"{suggestion}known kinds: {', '.join(table)}")
    return table[kind]


def _device_names(kind: str) -> list[str]:
    return shipped_table("gpus.yaml")["gpus"][kind].get("device_names", [])


def gpu_for_device(device_name: str, memory_gib: float, capability: tuple[int, int]) -> Gpu:
    """The table's entry for a CUDA device seen at run time (torch.cuda.get_device_name / properties), with the
    memory the device reports. An unknown card gets the reference card's rates: `choose` compares configurations
    on one card, so only the ranking matters there, and memory is what decides."""
    wanted = device_name.lower()
    best = None
    for entry in gpus().values():
        if any(p.lower() in wanted for p in _device_names(entry.kind)) and abs(entry.memory_gib - memory_gib) < 0.15 * memory_gib:
            best = entry
            break
    base = best or gpus()[REFERENCE_GPU]
    return Gpu(kind=base.kind if best else "unknown", name=device_name, memory_gib=memory_gib, bf16_tflops=base.bf16_tflops,
               fp32_tflops=base.fp32_tflops, bandwidth_gbs=base.bandwidth_gbs, compute_capability=tuple(capability))


@dataclass(frozen=True)
class Memory:
    """Predicted GPU memory in GiB. `peak_allocated` is what torch.cuda.max_memory_allocated() reports;
    `total` adds what the allocator reserves beyond it and the CUDA context: what must fit on the card."""

    base_weights: float
    lora_weights: float
    gradients_and_optimizer: float
    activations: float
    allocator: float
    cuda_context: float
    logits: float = 0.0  # a preference method's full logits on unsloth (UNSLOTH_PREFERENCE_LOGIT_BYTES)

    @property
    def peak_allocated(self) -> float:
        return self.base_weights + self.lora_weights + self.gradients_and_optimizer + self.activations + self.logits

    @property
    def total(self) -> float:
        return self.peak_allocated + self.allocator + self.cuda_context

    def as_dict(self) -> dict[str, float]:
        out = {k: round(v, 3) for k, v in asdict(self).items()}
        out.update(peak_allocated=round(self.peak_allocated, 3), total=round(self.total, 3))
        return out


def estimate_memory(
    arch: Arch,
    *,
    precision: Precision,
    lora_r: int,
    target_modules: list[str] | tuple[str, ...],
    batch_size: int,
    seq_len: int,
    checkpointing: bool,
    backend: Backend = "unsloth",
    optim: str = "adamw_8bit",
    method: Method = "sft",
) -> Memory:
    """Peak GPU memory of LoRA training at one micro-batch of `batch_size` rows padded to `seq_len` tokens; `method`:
    training.method, whose rows may be several sequences (METHOD_SEQUENCES)."""
    sequences = METHOD_SEQUENCES[method]
    tokens = batch_size * seq_len * sequences.trained
    # transformers' kbit preparation upcasts every non-quantized parameter to fp32; unsloth keeps them in bf16.
    embed_bytes = 4 if backend == "hf" and precision == "4bit" else 2
    base = (arch.linear_params() * BYTES_PER_WEIGHT[precision]
            + (arch.embedding_params + arch.head_params) * embed_bytes) / GIB + BUFFERS_GIB
    lora = arch.lora_params(lora_r, target_modules)
    lora_gib = lora * LORA_WEIGHT_BYTES / GIB * (2 if sequences.reference else 1)  # the reference: a frozen copy
    states_gib = lora * (LORA_WEIGHT_BYTES + OPTIMIZER_BYTES.get(optim, 8)) / GIB
    if backend == "hf":
        per_token = HF_LOGIT_BYTES * arch.vocab_size
        if checkpointing:
            per_token += 4 * arch.num_layers * arch.hidden_size + 2 * arch.layer_bytes
            per_token += HF_SCORE_BYTES_CHECKPOINTED * arch.num_heads * seq_len
        else:
            per_token += arch.num_layers * (2 * arch.layer_bytes + HF_SCORE_BYTES_FULL * arch.num_heads * seq_len)
    else:
        layers = UNSLOTH_CHECKPOINTED_LAYERS if checkpointing else UNSLOTH_FULL_LAYERS * arch.num_layers
        per_token = layers * arch.layer_bytes
    activations = tokens * per_token / GIB + WORKSPACE_GIB
    logits = 0.0
    if method != "sft" and backend == "unsloth":
        logits = tokens * UNSLOTH_PREFERENCE_LOGIT_BYTES * arch.vocab_size / GIB
    peak = base + lora_gib + states_gib + activations + logits
    return Memory(base_weights=base, lora_weights=lora_gib, gradients_and_optimizer=states_gib, activations=activations,
                  allocator=ALLOCATOR_OVERHEAD * peak, cuda_context=CUDA_CONTEXT_GIB, logits=logits)


# GGUF bytes per weight from ggml's block layouts (bytes per block / weights per block). The _M and _L mixes keep
# some tensors at a higher type: +10%. K-quant files keep the output head at q6_k at least.
GGUF_BYTES_PER_WEIGHT = {
    "f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q6_k": 210 / 256, "q5_k": 176 / 256, "q5_0": 22 / 32,
    "q5_1": 24 / 32, "q4_k": 144 / 256, "q4_0": 18 / 32, "q4_1": 20 / 32, "q3_k": 110 / 256, "q2_k": 84 / 256,
    "iq4_nl": 18 / 32, "iq4_xs": 136 / 256, "tq1_0": 54 / 256, "tq2_0": 66 / 256, "mxfp4_moe": 17 / 32,
}


def gguf_bytes(arch: Arch, gguf_type: str) -> float:
    """The size of one GGUF file of the model, approximately (block layouts, not measured)."""
    base = gguf_type.removesuffix("_moe") if gguf_type == "mxfp4_moe" else gguf_type
    for suffix in ("_m", "_s", "_l"):
        if base.endswith(suffix) and base[: -len(suffix)] in GGUF_BYTES_PER_WEIGHT:
            base = base[: -len(suffix)]
    per_weight = GGUF_BYTES_PER_WEIGHT.get(gguf_type, GGUF_BYTES_PER_WEIGHT.get(base, 2.0))
    mix = 1.1 if gguf_type.endswith(("_m", "_l")) else 1.0
    head = max(per_weight, GGUF_BYTES_PER_WEIGHT["q6_k"]) if "_k" in gguf_type else per_weight
    return (arch.linear_params() + arch.embedding_params) * per_weight * mix + arch.head_params * head


@dataclass(frozen=True)
class Disk:
    """Peak disk of a run in GiB: reached while the last GGUF quantizes, when the model cache, the merged weights, the
    16-bit GGUF every quant is made from and the finished quants are all on disk at once."""

    model_cache: float  # the 16-bit base as downloaded
    merged: float
    gguf_intermediate: float  # 16-bit, deleted after the last quant unless bf16 is published
    gguf: float  # the published GGUF files
    base_gguf: float = 0.0  # the base's own bf16 GGUF, kept in the model cache (export.base_gguf_refusal)

    @property
    def cache(self) -> float:
        """What the model cache (JOB_CACHE_DIR) needs."""
        return self.model_cache + self.base_gguf

    @property
    def scratch(self) -> float:
        """What the run's working folder (JOB_WORK_DIR) needs."""
        return self.merged + self.gguf_intermediate + self.gguf

    @property
    def total(self) -> float:
        return self.cache + self.scratch

    def as_dict(self) -> dict[str, float]:
        out = {k: round(v, 2) for k, v in asdict(self).items()}
        out.update(cache=round(self.cache, 2), scratch=round(self.scratch, 2), total=round(self.total, 2))
        return out


def estimate_disk(arch: Arch, *, merged: bool, gguf_types: list[str] | tuple[str, ...], base_gguf: bool = False) -> Disk:
    """`base_gguf`: the GGUFs are made from the base's cached GGUF with the adapter merged in by llama.cpp."""
    sixteen_bit = arch.total_params * 2 / GIB
    published = [t for t in gguf_types if t != "bf16"]
    return Disk(
        model_cache=sixteen_bit,
        merged=sixteen_bit if merged else 0.0,
        gguf_intermediate=sixteen_bit if gguf_types else 0.0,
        gguf=sum(gguf_bytes(arch, t) for t in published) / GIB,
        base_gguf=sixteen_bit if base_gguf and gguf_types else 0.0,
    )


@dataclass(frozen=True)
class Speed:
    tokens_per_second: float
    step_seconds: float
    gpu_seconds: float  # the GPU's own work per step
    host_seconds: float  # the launch-bound floor per step
    bound: Literal["gpu", "host"]
    rows_per_second: float  # rows of the data (a preference pair is one row)


def estimate_throughput(
    arch: Arch,
    gpu: Gpu,
    *,
    precision: Precision,
    lora_r: int,
    target_modules: list[str] | tuple[str, ...],
    batch_size: int,
    seq_len: int,
    checkpointing: bool,
    backend: Backend = "unsloth",
    packed: bool = False,
    method: Method = "sft",
) -> Speed:
    """Training tokens per second (trained sequences x padded length per step / step time) on `gpu`; `packed`:
    sequences of several documents (training.packing), which unsloth trains on a slower path; `method`:
    training.method, whose rows may be several sequences, some run forward only (METHOD_SEQUENCES)."""
    sequences = METHOD_SEQUENCES[method]
    tokens = batch_size * seq_len * sequences.trained
    passes = 3 if checkpointing else 2  # forward, input-gradient backward (the base is frozen), recompute
    linear_flops = 2 * arch.linear_params(active=True) * passes
    if precision == "fp8" and gpu.supports_fp8:
        linear_flops /= FP8_MATMUL_SPEEDUP
    head_flops = 4 * arch.embedding_params  # forward and input gradient through the output head
    lora_flops = 6 * arch.lora_params(lora_r, target_modules)
    # causal attention: QK^T and AV, s/2 keys on average; flash backward is about 2.5 forwards
    attention_flops = arch.num_layers * 2 * seq_len * arch.q_dim * (4.5 if checkpointing else 3.5)
    flops = linear_flops + lora_flops + (0 if backend == "hf" else head_flops + attention_flops)
    traffic = ACTIVATION_TRAFFIC * arch.num_layers * arch.layer_bytes * (4 / 3 if checkpointing else 1)
    per_token = flops / (MATMUL_EFFICIENCY * gpu.bf16_tflops * 1e12) + traffic / (gpu.bandwidth_gbs * 1e9)
    if backend == "hf":
        # fp32 output head (forward + input gradient) and attention over fp32 inputs without a fused kernel
        fp32_flops = head_flops + arch.num_layers * 4 * seq_len * arch.q_dim * (4 if checkpointing else 3)
        per_token += fp32_flops / (FP32_EFFICIENCY * gpu.fp32_tflops * 1e12)
    gpu_seconds = tokens * per_token
    if precision == "4bit":
        gpu_seconds += passes * arch.linear_params() * DEQUANT_BYTES_PER_WEIGHT / (gpu.bandwidth_gbs * 1e9)
    host = arch.num_layers * HOST_SECONDS_PER_LAYER[("4bit" if precision == "4bit" else "16bit", checkpointing)]
    step = (gpu_seconds**OVERLAP_NORM + host**OVERLAP_NORM) ** (1 / OVERLAP_NORM)
    if packed and backend == "unsloth":
        step += (tokens * arch.num_layers * arch.hidden_size * PACKED_BYTES_PER_TOKEN_LAYER_HIDDEN
                 / (gpu.bandwidth_gbs * 1e9))
    bound = "gpu" if gpu_seconds >= host else "host"
    # Forward-only sequences (kto's KL completions, the reference pass) stretch the step by a fraction each.
    stretch = 1 + FORWARD_ONLY_FRACTION * sequences.forward_only / sequences.trained
    step, gpu_seconds, host = step * stretch, gpu_seconds * stretch, host * stretch
    return Speed(tokens_per_second=tokens / step, step_seconds=step, gpu_seconds=gpu_seconds, host_seconds=host,
                 bound=bound, rows_per_second=batch_size / step)


@dataclass(frozen=True)
class Choice:
    batch_size: int
    gradient_checkpointing: bool
    precision: Precision
    fits: bool
    memory: Memory
    tokens_per_second: float
    reason: str
    unsupported: bool = False  # the card cannot run it at all (fp8 below compute capability 9.0), whatever memory

    def as_dict(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "gradient_checkpointing": self.gradient_checkpointing,
                "precision": self.precision, "fits": self.fits, "unsupported": self.unsupported,
                "memory_gib": self.memory.as_dict(), "tokens_per_second": round(self.tokens_per_second, 1),
                "reason": self.reason}


BATCH_CANDIDATES = (1, 2, 4, 8, 16, 32, 64, 128)


def supported_precisions(gpu: Gpu, backend: Backend) -> tuple[Precision, ...]:
    """What the card and backend can train with: fp8 only through unsloth on compute capability >= 9.0."""
    if backend == "unsloth" and gpu.supports_fp8:
        return ("4bit", "16bit", "fp8")
    return ("4bit", "16bit")


def choose(
    arch: Arch,
    gpu: Gpu,
    *,
    lora_r: int,
    target_modules: list[str] | tuple[str, ...],
    seq_len: int,
    batch_size: int | Literal["auto"] = "auto",
    gradient_checkpointing: bool | Literal["auto"] = "auto",
    precision: Precision | Literal["auto"] = "auto",
    backend: Backend = "unsloth",
    optim: str = "adamw_8bit",
    headroom: float = 0.10,
    max_batch_size: int | None = None,
    packed: bool = False,
    method: Method = "sft",
) -> Choice:
    """The fastest configuration predicted to fit in `gpu.memory_gib` with `headroom` (a fraction of the card)
    left free. Fixed (non-auto) arguments are kept as given. When nothing fits, the smallest configuration is
    returned with fits=False, so callers can refuse it with the predicted numbers in hand.

    `max_batch_size` caps auto batch sizes (no point in a micro-batch larger than the dataset). `precision: auto`
    tries every precision the card and backend support (`supported_precisions`), less fp8 where the note at
    FP8_MIN_CAPABILITY says.
    """
    if precision == "fp8" and not gpu.supports_fp8:
        memory = estimate_memory(arch, precision="16bit", lora_r=lora_r, target_modules=target_modules,
                                 batch_size=batch_size if batch_size != "auto" else 1, seq_len=seq_len,
                                 checkpointing=gradient_checkpointing is not False, backend=backend, optim=optim,
                                 method=method)
        cc = ".".join(map(str, gpu.compute_capability))
        return Choice(batch_size if batch_size != "auto" else 1, gradient_checkpointing is not False, "fp8", False,
                      memory, 0.0, f"fp8 needs compute capability >= 9.0 (Hopper); {gpu.name} has {cc}",
                      unsupported=True)
    batches = [batch_size] if batch_size != "auto" else [
        b for b in BATCH_CANDIDATES if max_batch_size is None or b <= max(1, max_batch_size)]
    checkpointing_options = [gradient_checkpointing] if gradient_checkpointing != "auto" else [False, True]
    precision_options = [precision] if precision != "auto" else list(supported_precisions(gpu, backend))
    limit = gpu.memory_gib * (1 - headroom)
    candidates = []
    for p in precision_options:
        for ckpt in checkpointing_options:
            if p == "fp8" and precision == "auto" and (ckpt or not arch.fp8_compatible):
                continue  # see the note at FP8_MIN_CAPABILITY
            for b in batches:
                common = dict(precision=p, lora_r=lora_r, target_modules=target_modules, batch_size=b, seq_len=seq_len,
                              checkpointing=ckpt, backend=backend, method=method)
                memory = estimate_memory(arch, optim=optim, **common)
                speed = estimate_throughput(arch, gpu, packed=packed, **common)
                candidates.append((memory, speed, b, ckpt, p))
    fitting = [c for c in candidates if c[0].total <= limit]
    if not fitting:
        memory, speed, b, ckpt, p = min(candidates, key=lambda c: c[0].total)
        reason = (f"does not fit: needs {memory.total:.1f} GiB at best (batch {b}, checkpointing {'on' if ckpt else 'off'}, "
                  f"{p}); {gpu.name} has {gpu.memory_gib:.0f} GiB and {headroom:.0%} is kept free")
        return Choice(b, ckpt, p, False, memory, speed.tokens_per_second, reason)
    # fastest; within 2% prefer the more precise base, then less memory
    best_rate = max(c[1].tokens_per_second for c in fitting)
    near = [c for c in fitting if c[1].tokens_per_second >= 0.98 * best_rate]
    memory, speed, b, ckpt, p = min(near, key=lambda c: (PRECISION_ORDER.index(c[4]), -c[1].tokens_per_second))
    picked = [name for name, value in (("batch_size", batch_size), ("gradient_checkpointing", gradient_checkpointing),
                                       ("precision", precision)) if value == "auto"]
    reason = (f"{memory.total:.1f} of {gpu.memory_gib:.0f} GiB predicted ({limit:.0f} usable with {headroom:.0%} headroom)")
    if picked:
        reason = f"fastest predicted to fit ({', '.join(picked)} auto): " + reason
    return Choice(b, ckpt, p, True, memory, speed.tokens_per_second, reason)


def expected_batch_length(lengths: list[int], batch_size: int) -> float:
    """Mean padded length of a micro-batch of `batch_size` rows drawn at random: the expected longest row.
    (Rows are padded to the longest in their batch; order statistic of sampling with replacement.)"""
    ordered = sorted(lengths)
    n = len(ordered)
    return sum(length * ((k / n) ** batch_size - ((k - 1) / n) ** batch_size) for k, length in enumerate(ordered, 1))


def micro_batches(rows: int, tokens: int, *, batch_size: int, accumulation: int, epochs: float, max_steps: int,
                  packing: bool, seq_len: int) -> int:
    """Forward/backward passes the run makes: max_steps when set, else epochs over the rows (or packed sequences)."""
    if max_steps > 0:
        return max_steps * accumulation
    units = math.ceil(tokens / seq_len) if packing else rows
    steps_per_epoch = math.ceil(units / (batch_size * accumulation))
    return math.ceil(steps_per_epoch * epochs) * accumulation


def spec_backend(spec) -> Backend:
    """On a GPU, `training.backend: auto` is unsloth (job/backends/__init__.py)."""
    return "hf" if spec.training.backend == "hf" else "unsloth"


def choose_for_spec(spec, arch: Arch, card: Gpu, *, longest: int | None = None, rows: int | None = None,
                    headroom: float = 0.10, all_auto: bool = False) -> Choice:
    """`choose` with the spec's own fields: what `job run` resolves `auto` to on `card`. `longest` is the longest
    tokenized row (default: training.max_seq_length), `rows` the dataset's row count (caps the batch size);
    `all_auto` ignores the spec's fixed batch size, checkpointing and precision."""
    training = spec.training
    # Memory is decided by the longest micro-batch the run will see.
    seq_len = training.max_seq_length if training.packing or longest is None else min(longest, training.max_seq_length)
    fixed = {} if all_auto else dict(batch_size=training.batch_size, gradient_checkpointing=training.gradient_checkpointing,
                                     precision=spec.model.precision)
    return choose(arch, card, lora_r=spec.lora.r, target_modules=tuple(spec.lora.target_modules), seq_len=seq_len,
                  backend=spec_backend(spec), optim=training.optim, headroom=headroom, max_batch_size=rows,
                  packed=training.packing, method=training.method, **fixed)
