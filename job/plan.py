"""Predict a (Q)LoRA run's peak GPU memory, tokens/s, wall time and cost per GPU kind, without a GPU or weights.

Everything here is arithmetic over an architecture (the numbers in a config.json) and the spec's training choices,
so `job plan` runs on a laptop and `job run` can call `choose` to resolve `training.batch_size: auto`,
`training.gradient_checkpointing: auto` and `model.precision: auto` before loading anything. No torch here.

The constants were fitted to measurements on an H100 80GB (docs/benchmarks.md, "Plan vs measured"); docs/plan.md
explains the formulas and their known error. Other cards are predicted by scaling with their published dense bf16
rate and memory bandwidth (job/resources/gpus.yaml).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from functools import cache
from importlib import resources
from typing import Any, Literal

import yaml

from job.errors import NotFoundError, SpecError

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
REFERENCE_GPU = "h100-sxm"  # the card the constants were fitted on

FP8_MIN_CAPABILITY = (9, 0)  # spec: model.precision fp8 needs compute capability >= 9.0
# `precision: auto` picks fp8 only without gradient checkpointing: with unsloth's checkpointing every decoder layer is
# compiled twice, and on the 8B shape the first step had not come after 3 minutes (docs/benchmarks.md). Named in the
# spec (`precision: fp8`), fp8 with checkpointing is still allowed. Nor for a model with a projection that fp8 cannot
# hold (Arch.fp8_compatible): that weight would stay bf16 and need more memory than predicted.
PRECISION_ORDER = ("16bit", "fp8", "4bit")  # ties in speed go to the more precise base


# --- architecture -------------------------------------------------------------------------------------------------


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
def _data(name: str) -> dict[str, Any]:
    return yaml.safe_load(resources.files("job").joinpath("resources", name).read_text())


def known_architectures() -> dict[str, dict[str, Any]]:
    return _data("architectures.yaml")["architectures"]


def arch_from_table(model_id: str) -> Arch | None:
    """The shipped config of a well-known model, matched on its normalized id and the table's aliases."""
    wanted = normalize_model_id(model_id)
    for key, entry in known_architectures().items():
        names = {key, *(normalize_model_id(a) for a in entry.get("aliases", []))}
        if wanted in names:
            return arch_from_config(entry["config"], name=key)
    return None


# --- GPUs and prices ----------------------------------------------------------------------------------------------


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
    for kind, entry in _data("gpus.yaml")["gpus"].items():
        major, minor = (int(x) for x in str(entry["compute_capability"]).split("."))
        out[kind] = Gpu(kind=kind, name=entry["name"], memory_gib=float(entry["memory_gib"]),
                        bf16_tflops=float(entry["bf16_tflops"]), fp32_tflops=float(entry["fp32_tflops"]),
                        bandwidth_gbs=float(entry["bandwidth_gbs"]), compute_capability=(major, minor))
    return out


def gpu(kind: str) -> Gpu:
    table = gpus()
    if kind not in table:
        raise SpecError(f"unknown GPU kind {kind!r}", hint=f"known kinds: {', '.join(table)}")
    return table[kind]


def gpu_for_device(device_name: str, memory_gib: float, capability: tuple[int, int]) -> Gpu:
    """The table's entry for a CUDA device seen at run time (torch.cuda.get_device_name / properties), with the
    memory the device reports. An unknown card gets the reference card's rates: `choose` compares configurations
    on one card, so only the ranking matters there, and memory is what decides."""
    wanted = device_name.lower()
    best = None
    for entry in gpus().values():
        patterns = _data("gpus.yaml")["gpus"][entry.kind].get("device_names", [])
        if any(p.lower() in wanted for p in patterns) and abs(entry.memory_gib - memory_gib) < 0.15 * memory_gib:
            best = entry
            break
    base = best or gpus()[REFERENCE_GPU]
    return Gpu(kind=base.kind if best else "unknown", name=device_name, memory_gib=memory_gib, bf16_tflops=base.bf16_tflops,
               fp32_tflops=base.fp32_tflops, bandwidth_gbs=base.bandwidth_gbs, compute_capability=tuple(capability))


def load_prices(text: str | None = None) -> dict[str, Any]:
    """The price table: job/resources/prices.yaml, or the YAML text of a `--prices FILE`."""
    data = yaml.safe_load(text) if text is not None else _data("prices.yaml")
    if not isinstance(data, dict) or not isinstance(data.get("prices"), dict):
        raise SpecError("a price table must be a mapping with `prices: {KIND: {usd_per_hour: N, source: ...}}`")
    for kind, entry in data["prices"].items():
        value = entry.get("usd_per_hour") if isinstance(entry, dict) else entry
        if not isinstance(value, (int, float)) or value < 0:
            raise SpecError(f"prices.{kind}: usd_per_hour must be a non-negative number (got {value!r})")
    return data


def price_per_hour(prices: dict[str, Any], kind: str) -> float | None:
    entry = prices["prices"].get(kind)
    if entry is None:
        return None
    return float(entry["usd_per_hour"] if isinstance(entry, dict) else entry)


# --- memory -------------------------------------------------------------------------------------------------------


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

    @property
    def peak_allocated(self) -> float:
        return self.base_weights + self.lora_weights + self.gradients_and_optimizer + self.activations

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
) -> Memory:
    """Peak GPU memory of LoRA training at one micro-batch of `batch_size` rows padded to `seq_len` tokens."""
    tokens = batch_size * seq_len
    # transformers' kbit preparation upcasts every non-quantized parameter to fp32; unsloth keeps them in bf16.
    embed_bytes = 4 if backend == "hf" and precision == "4bit" else 2
    base = (arch.linear_params() * BYTES_PER_WEIGHT[precision]
            + (arch.embedding_params + arch.head_params) * embed_bytes) / GIB + BUFFERS_GIB
    lora = arch.lora_params(lora_r, target_modules)
    lora_gib = lora * LORA_WEIGHT_BYTES / GIB
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
    peak = base + lora_gib + states_gib + activations
    return Memory(base_weights=base, lora_weights=lora_gib, gradients_and_optimizer=states_gib, activations=activations,
                  allocator=ALLOCATOR_OVERHEAD * peak, cuda_context=CUDA_CONTEXT_GIB)


# --- speed --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Speed:
    tokens_per_second: float
    step_seconds: float
    gpu_seconds: float  # the GPU's own work per step
    host_seconds: float  # the launch-bound floor per step
    bound: Literal["gpu", "host"]


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
) -> Speed:
    """Training tokens per second (rows x padded length per step / step time) on `gpu`."""
    tokens = batch_size * seq_len
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
    return Speed(tokens_per_second=tokens / step, step_seconds=step, gpu_seconds=gpu_seconds, host_seconds=host,
                 bound="gpu" if gpu_seconds >= host else "host")


# --- choosing a configuration -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Choice:
    batch_size: int
    gradient_checkpointing: bool
    precision: Precision
    fits: bool
    memory: Memory
    tokens_per_second: float
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "gradient_checkpointing": self.gradient_checkpointing,
                "precision": self.precision, "fits": self.fits, "memory_gib": self.memory.as_dict(),
                "tokens_per_second": round(self.tokens_per_second, 1), "reason": self.reason}


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
                                 checkpointing=gradient_checkpointing is not False, backend=backend, optim=optim)
        cc = ".".join(map(str, gpu.compute_capability))
        return Choice(batch_size if batch_size != "auto" else 1, gradient_checkpointing is not False, "fp8", False,
                      memory, 0.0, f"fp8 needs compute capability >= 9.0; {gpu.name} has {cc}")
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
                              checkpointing=ckpt, backend=backend)
                memory = estimate_memory(arch, optim=optim, **common)
                speed = estimate_throughput(arch, gpu, **common)
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


# --- wall time ----------------------------------------------------------------------------------------------------


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


# --- inputs: the model's architecture and the data's token count (I/O at the edges) ------------------------------


@dataclass(frozen=True)
class ResolvedArch:
    arch: Arch
    source: str  # where the numbers came from, said in the output


def _hub_reachable(endpoint: str, timeout: float = 3.0) -> bool:
    import socket
    from urllib.parse import urlparse

    parsed = urlparse(endpoint)
    try:
        with socket.create_connection((parsed.hostname or "huggingface.co", parsed.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def read_gguf_config(path) -> dict[str, Any]:
    """A config.json-like dict from a GGUF file's metadata (the tensors are not read)."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    fields = reader.fields

    def value(key: str) -> Any:
        field = fields.get(key)
        if field is None:
            return None
        raw = field.parts[field.data[0]]
        return bytes(raw).decode() if field.types and field.types[0].name == "STRING" else raw[0].item()

    arch = value("general.architecture") or "llama"
    vocab = value(f"{arch}.vocab_size")
    if vocab is None and "tokenizer.ggml.tokens" in fields:
        vocab = len(fields["tokenizer.ggml.tokens"].data)
    heads = value(f"{arch}.attention.head_count")
    hidden = value(f"{arch}.embedding_length")
    return {
        "model_type": arch,
        "hidden_size": hidden,
        "num_hidden_layers": value(f"{arch}.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": value(f"{arch}.attention.head_count_kv") or heads,
        "head_dim": value(f"{arch}.attention.key_length") or (hidden // heads if hidden and heads else None),
        "intermediate_size": value(f"{arch}.feed_forward_length"),
        "vocab_size": vocab,
        "num_local_experts": value(f"{arch}.expert_count") or 1,
        "num_experts_per_tok": value(f"{arch}.expert_used_count") or 1,
        # llama.cpp writes no output.weight when the head shares the embedding matrix
        "tie_word_embeddings": not any(t.name == "output.weight" for t in reader.tensors),
    }


def resolve_arch(model, *, s3=None, hub_endpoint: str = "https://huggingface.co", hub_offline: bool = False,
                 config_file=None) -> ResolvedArch:
    """The architecture of `model` (the spec's ModelSection) from config only, never weights: an explicit
    config.json, a local checkpoint's config.json, an s3:// checkpoint's config.json, a GGUF's metadata, the hub
    when reachable, else the shipped table of well-known models."""
    import json
    from pathlib import Path

    from job.storage import S3Settings, open_location

    name = model.name
    if config_file is not None:
        return ResolvedArch(arch_from_config(json.loads(Path(config_file).read_text()), name), f"config file {config_file}")
    if name.startswith("pkg://") or name.endswith(".gguf"):
        from job.model import package_file

        path = package_file(name, "model.name") if name.startswith("pkg://") else Path(name).expanduser()
        if not path.is_file():
            raise NotFoundError(f"model.name: no GGUF file at {path}")
        return ResolvedArch(arch_from_config(read_gguf_config(path), normalize_model_id(name)), f"GGUF metadata of {path.name}")
    if name.startswith("s3://"):
        store = open_location(name, s3 or S3Settings())
        return ResolvedArch(arch_from_config(json.loads(store.read_bytes("config.json")), normalize_model_id(name)),
                            f"config.json at {name}")
    local = Path(name).expanduser()
    if (local / "config.json").is_file():
        return ResolvedArch(arch_from_config(json.loads((local / "config.json").read_text()), local.name),
                            f"config.json in {local}")
    why = f"{name.split('://')[0]}:// sources are not read by plan" if "://" in name else "no such local checkpoint"
    if "://" not in name and name.count("/") == 1 and not name.startswith((".", "/", "~")):
        why = _hub_config_unavailable(model, hub_endpoint, hub_offline)
        if isinstance(why, dict):
            return ResolvedArch(arch_from_config(why, normalize_model_id(name)), f"config.json from the hub ({name})")
    table = arch_from_table(name)
    if table is not None:
        return ResolvedArch(table, f"built-in table entry {table.name} ({why})")
    raise NotFoundError(f"model.name: no architecture for {name}: {why}, and it is not in the built-in table",
                        hint="pass --config path/to/config.json (the model's config.json; no weights needed)")


def _hub_config_unavailable(model, endpoint: str, offline: bool) -> dict[str, Any] | str:
    """The hub's config.json for `model` (a dict), or why it could not be had (a string)."""
    import json

    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(model.name, "config.json", revision=model.revision)
    if isinstance(cached, str):
        return json.loads(open(cached).read())
    if offline:
        return "hub offline (HF_HUB_OFFLINE) and not cached"
    if not _hub_reachable(endpoint):
        return f"hub {endpoint} unreachable"
    try:
        path = hf_hub_download(model.name, "config.json", revision=model.revision, endpoint=endpoint,
                               token=model.token.get_secret_value() if model.token else None)
    except Exception as exc:  # noqa: BLE001 - any hub failure falls back to the table, and says why
        return f"hub answered {type(exc).__name__}"
    return json.loads(open(path).read())


@dataclass(frozen=True)
class DataTokens:
    """The rows and tokens one epoch trains on, and how they were counted."""

    rows: int | None
    tokens: int | None
    lengths: tuple[int, ...]  # per row, after truncation to max_seq_length
    method: str

    @property
    def longest(self) -> int | None:
        return max(self.lengths) if self.lengths else None


def count_tokens(spec, *, work_dir, s3=None, tokenizer=None, hub_reachable: bool = False) -> DataTokens:
    """Count the training tokens: with the model's own tokenizer and chat template when one is given (exactly as
    `job run` tokenizes), else estimated from the text's bytes (4 bytes a token, plus a few per message)."""
    from pathlib import Path

    from job import data as datas
    from job.errors import JobError

    source = spec.data.source
    remote_hub = not (source.startswith(("pkg://", "s3://", "https://", "http://")) or Path(source).expanduser().exists())
    if remote_hub and not hub_reachable:
        return DataTokens(None, None, (), f"not counted: {source} is a hub dataset and the hub is unreachable")
    try:
        rows, _ = datas.read_rows(spec.data, Path(work_dir), s3)
        template = datas.choose_template(tokenizer, spec.data.chat_template) if tokenizer is not None else (
            spec.data.chat_template if spec.data.chat_template not in ("auto", "model") else "chatml")
        normalized = datas.normalize(rows, spec.data, template)
        limit = spec.training.max_seq_length
        if tokenizer is not None:
            tokenized = datas.tokenize(tokenizer, normalized, limit, spec.data.train_on_responses_only)
            lengths = tuple(len(ids) for ids in tokenized.input_ids)
            return DataTokens(len(lengths), sum(lengths), lengths, "counted with the model's tokenizer")
    except JobError as exc:
        return DataTokens(None, None, (), f"not counted: {exc}")
    lengths = tuple(min(limit, _estimated_tokens(example)) for _, example in normalized.examples)
    return DataTokens(len(lengths), sum(lengths), lengths, "estimated from bytes (4 bytes a token; no tokenizer at hand)")


def _estimated_tokens(example) -> int:
    texts = [m["content"] for m in example.messages or []] + [example.text or "", example.prompt or "", example.completion or ""]
    per_message = 6  # role markers and separators of a chat template
    return math.ceil(sum(len(t.encode()) for t in texts) / 4) + per_message * len(example.messages or [])


# --- one spec on every kind -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KindPlan:
    gpu: Gpu
    choice: Choice  # the spec as written, its auto fields resolved for this card
    all_auto: Choice  # batch size, checkpointing and precision all left to auto
    padded_length: float  # mean tokens per row after padding to the longest in its micro-batch
    micro_batches: int | None
    seconds: float | None  # training only: model load, export and verification are not counted
    usd_per_hour: float | None
    usd: float | None

    @property
    def usd_per_million_tokens(self) -> float | None:
        if self.usd_per_hour is None or not self.choice.fits or self.choice.tokens_per_second <= 0:
            return None
        return self.usd_per_hour / (self.choice.tokens_per_second * 3600) * 1e6

    def as_dict(self) -> dict[str, Any]:
        per_million = self.usd_per_million_tokens
        return {"kind": self.gpu.kind, "gpu": self.gpu.name, "memory_gib": self.gpu.memory_gib, "fits": self.choice.fits,
                "choice": self.choice.as_dict(), "all_auto": self.all_auto.as_dict(),
                "padded_length": round(self.padded_length, 1), "micro_batches": self.micro_batches,
                "hours": round(self.seconds / 3600, 3) if self.seconds is not None else None,
                "usd_per_hour": self.usd_per_hour, "usd": round(self.usd, 4) if self.usd is not None else None,
                "usd_per_million_tokens": round(per_million, 4) if per_million is not None else None}


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
                  **fixed)


def plan_kind(spec, arch: Arch, tokens: DataTokens, card: Gpu, prices: dict[str, Any], headroom: float = 0.10) -> KindPlan:
    training, backend = spec.training, spec_backend(spec)
    longest = training.max_seq_length if training.packing or tokens.longest is None else min(tokens.longest, training.max_seq_length)
    choice = choose_for_spec(spec, arch, card, longest=tokens.longest, rows=tokens.rows, headroom=headroom)
    all_auto = choose_for_spec(spec, arch, card, longest=tokens.longest, rows=tokens.rows, headroom=headroom, all_auto=True)
    if training.packing or not tokens.lengths:
        padded = float(longest)
    else:
        padded = expected_batch_length(list(tokens.lengths), choice.batch_size)
    count = None
    if training.max_steps > 0 or tokens.rows is not None:
        count = micro_batches(tokens.rows or 0, tokens.tokens or 0, batch_size=choice.batch_size,
                              accumulation=training.gradient_accumulation_steps, epochs=training.num_epochs,
                              max_steps=training.max_steps, packing=training.packing, seq_len=training.max_seq_length)
    seconds = None
    if count is not None and choice.fits:
        speed = estimate_throughput(arch, card, precision=choice.precision, lora_r=spec.lora.r,
                                    target_modules=tuple(spec.lora.target_modules), batch_size=choice.batch_size,
                                    seq_len=max(1, round(padded)), checkpointing=choice.gradient_checkpointing, backend=backend)
        seconds = count * speed.step_seconds
    rate = price_per_hour(prices, card.kind)
    usd = seconds / 3600 * rate if seconds is not None and rate is not None else None
    return KindPlan(card, choice, all_auto, padded, count, seconds, rate, usd)


def recommend(plans: list[KindPlan]) -> KindPlan | None:
    """The cheapest kind predicted to fit the spec as written: by the run's cost, or by the cost of a million
    tokens when the run's length is unknown; the fastest where prices are unknown. Never one predicted to run out
    of memory."""
    fitting = [p for p in plans if p.choice.fits]
    if not fitting:
        return None
    return min(fitting, key=lambda p: (p.usd if p.usd is not None else math.inf,
                                       p.usd_per_million_tokens if p.usd_per_million_tokens is not None else math.inf,
                                       -p.choice.tokens_per_second))


def notes(spec, arch: Arch) -> list[str]:
    """What the estimate does not model for this spec."""
    out = []
    if spec_backend(spec) == "unsloth" and (spec.lora.dropout > 0 or spec.lora.bias != "none"):
        out.append("lora.dropout > 0 or lora.bias != none turns off unsloth's fused LoRA kernels: expect lower "
                   "tokens/s than predicted (not measured)")
    if arch.num_experts > 1:
        out.append("mixture-of-experts model: memory counts every expert, speed the active ones; never measured")
    if spec_backend(spec) == "hf":
        out.append("backend hf: fitted on 1B and checked on 3B and 8B 4-bit shapes only (docs/benchmarks.md); "
                   "hf with a 16-bit base was never measured and is modelled like hf 4-bit (pessimistic)")
    if spec.model.precision == "fp8" and spec_backend(spec) == "hf":
        out.append("model.precision fp8 is an unsloth feature; the hf backend has no fp8 path")
    unknown = [m for m in spec.lora.target_modules if m not in arch.projections()]
    if unknown:
        out.append(f"lora.target_modules {unknown} are not decoder projections the estimate knows: not counted")
    return out
