"""Export: the LoRA adapter, merged 16-bit weights (merged into the 16-bit base), and GGUF files."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from job import llamacpp, log
from job.errors import OutOfResources, SpecError
from job.model import read_config
from job.spec import ExportSection, LoraSection, ModelSection

# The modules whose LoRA pairs llama.cpp's LoRA converter and llama-export-lora merge: the attention and MLP
# projections (an adapted embedding or output head, or a trained bias, is not carried over).
PROJECTIONS = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})


@dataclass
class Exported:
    adapter_dir: Path
    merged_dir: Path | None = None
    gguf: dict[str, Path] = field(default_factory=dict)
    merge_method: str | None = None
    gguf_method: str | None = None
    llama_cpp: dict | None = None


def check_disk(export: ExportSection, config: dict, work_dir: Path) -> None:
    """Refuse, before training, a run whose merged weights and GGUF files cannot fit the working folder's free space
    (job.plan.estimate.estimate_disk: the peak while the last quant is made)."""
    from job.plan.estimate import arch_from_config, estimate_disk

    try:
        arch = arch_from_config(config)
    except (KeyError, TypeError, ValueError, SpecError):
        log.get().info("export.disk_check_skipped", reason="the model's config gives no size")
        return
    needed = estimate_disk(arch, merged=export.merged, gguf_types=export.gguf).scratch
    work_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(work_dir).free / 2**30
    log.get().info("export.disk_checked", needed_gib=round(needed, 2), free_gib=round(free, 2))
    if needed > free:
        raise OutOfResources(
            f"the export needs about {needed:.1f} GiB of scratch disk (merged weights, the bf16 GGUF and the quants) "
            f"and {work_dir} has {free:.1f} GiB free", where="export",
            hint="give the pod a larger scratch volume (ephemeral-storage / JOB_WORK_DIR), or publish fewer GGUF types "
                 "(export.gguf); `job plan` shows the prediction")


def save_adapter(model, tokenizer, out_dir: Path) -> Path:
    adapter_dir = out_dir / "adapter"
    model.save_pretrained(adapter_dir, safe_serialization=True)
    tokenizer.save_pretrained(adapter_dir)
    log.get().info("export.adapter.saved", path=str(adapter_dir))
    return adapter_dir


def merge(base_path: Path, adapter_dir: Path, out_dir: Path, model: ModelSection,
          before_merge: Callable | None = None) -> tuple[Path, str]:
    """Merge the adapter into the 16-bit base weights (never into a dequantized 4-bit copy). `before_merge` sees the
    adapter on the 16-bit base, unmerged: verification's references come from it without a second load of the base."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged_dir = out_dir / "merged"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # Merge in float32 on CPU (exact), bfloat16 on GPU; save in the base's 16-bit dtype.
    work_dtype = torch.float32 if device == "cpu" else torch.bfloat16
    base = AutoModelForCausalLM.from_pretrained(
        base_path, dtype=work_dtype, trust_remote_code=model.trust_remote_code, use_safetensors=True, device_map=device
    )
    unmerged = PeftModel.from_pretrained(base, adapter_dir)
    if before_merge is not None:
        before_merge(unmerged)
    merged = unmerged.merge_and_unload()
    # The dtype the checkpoint declares: the loaded model's config says work_dtype by now. float32 bases save as bf16.
    config = read_config(base_path)
    save_dtype = torch.float16 if (config.get("dtype") or config.get("torch_dtype")) == "float16" else torch.bfloat16
    merged = merged.to(save_dtype)
    merged.config.dtype = save_dtype
    merged.save_pretrained(merged_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(adapter_dir).save_pretrained(merged_dir)
    del merged, base
    method = f"adapter merged into the 16-bit base ({str(work_dtype).removeprefix('torch.')} math, saved as {str(save_dtype).removeprefix('torch.')})"
    log.get().info("export.merged.saved", path=str(merged_dir), method=method)
    return merged_dir, method


def check_convertible(tools: llamacpp.Tools, config: dict) -> None:
    """Refuse, before anything trains, a model whose architecture the pinned converter cannot turn into a GGUF."""
    architecture = (config.get("architectures") or [None])[0]
    if architecture and architecture not in llamacpp.text_architectures(tools):
        raise SpecError(f"export.gguf: llama.cpp's converter (commit {tools.commit[:12]}) cannot convert the "
                        f"architecture {architecture!r} of model.name",
                        hint="set export.gguf: [] (the adapter and merged weights are still published), or train a "
                             "model llama.cpp supports")


def base_gguf_refusal(lora: LoraSection, export_section: ExportSection) -> str | None:
    """Why the GGUFs cannot be made from the base's cached GGUF with the adapter merged in by llama.cpp's own
    llama-export-lora, or None when they can. That merge writes the adapted tensors in f16 (a 16-bit GGUF published as
    such comes from the merged weights), and the LoRA converter carries the projections' pairs alone."""
    if not export_section.gguf:
        return "no GGUF is published"
    if sixteen_bit := sorted(set(export_section.gguf) & {"bf16", "f16", "f32"}):
        return f"export.gguf publishes {', '.join(sixteen_bit)}, which llama-export-lora would write as f16"
    if lora.bias != "none":
        return "lora.bias: the LoRA converter carries no trained biases"
    if lora.loftq_config:
        return "lora.loftq_config: LoftQ changes the base weights the adapter belongs to"
    if other := sorted(set(lora.target_modules) - PROJECTIONS):
        return f"lora.target_modules has {', '.join(other)}: only the attention and MLP projections are merged"
    return None


class BaseGguf:
    """The base model as a bf16 GGUF with this run's tokenizer, converted by llama.cpp's converter in a background
    thread while the adapter trains (the converter is one Python process on one core; training leaves the others
    idle), and kept in the model cache for the next experiment on the same base. After training, llama-export-lora
    merges the adapter into it: the converter's minute at 8B leaves the path from the last step to the manifest."""

    def __init__(self, tools: llamacpp.Tools, base_path: Path, tokenizer, cache_dir: Path, work: Path):
        self.tools = tools
        self.source = work / "base-for-gguf"  # the base's config and weights with this run's tokenizer
        clean(self.source)
        self.source.mkdir(parents=True)
        tokenizer.save_pretrained(self.source)
        weights = sorted(p for p in base_path.iterdir() if p.name in ("config.json", "generation_config.json")
                         or p.name.endswith((".safetensors", ".safetensors.index.json")))
        for file in weights:
            (self.source / file.name).symlink_to(file.resolve())
        self.path = cache_dir / "gguf" / f"base-{self._key(weights)}-bf16.gguf"
        self.error: str | None = None
        self._context = structlog.contextvars.get_contextvars()  # the run's fields, for the thread's events
        self._thread = threading.Thread(target=self._convert, name="base-gguf", daemon=True)

    def _key(self, weights: list[Path]) -> str:
        """Changes with the converter, the base's config and weights (names and sizes) and the tokenizer files."""
        digest = hashlib.sha256(self.tools.commit.encode())
        for file in weights:
            digest.update(f"{file.name}:{file.stat().st_size}".encode())
            if file.suffix == ".json":
                digest.update(file.read_bytes())
        for file in sorted(p for p in self.source.iterdir() if not p.is_symlink()):
            digest.update(file.name.encode() + file.read_bytes())
        return digest.hexdigest()[:16]

    def start(self) -> BaseGguf:
        self._thread.start()
        return self

    def _convert(self) -> None:
        partial = self.path.with_name(f"{self.path.name}.{os.getpid()}.partial")
        with structlog.contextvars.bound_contextvars(**self._context):
            try:
                self._convert_once(partial)
            except Exception as exc:  # noqa: BLE001 - the merged weights' own conversion stands in for it
                self.error = str(exc)
                partial.unlink(missing_ok=True)

    def _convert_once(self, partial: Path) -> None:
        events = log.get()
        if self.path.exists():
            events.info("export.base_gguf.cached", path=str(self.path))
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        needed = sum(p.stat().st_size for p in self.source.glob("*.safetensors"))  # bf16: at most the checkpoint's size
        if shutil.disk_usage(self.path.parent).free < needed * 1.05:
            raise OutOfResources(f"{self.path.parent} has less free space than the base's {needed / 2**30:.1f} GiB")
        events.info("export.base_gguf.convert.started", outtype="bf16")
        started = time.monotonic()
        llamacpp.convert(self.tools, self.source, partial, "bf16")
        os.replace(partial, self.path)  # whole or absent: another run on this cache may read it next
        events.info("export.base_gguf.convert.finished", outtype="bf16", bytes=self.path.stat().st_size,
                    seconds=round(time.monotonic() - started, 2))

    def wait(self) -> Path | None:
        """The cached GGUF once converted; None (and why, logged) if it could not be made."""
        started = time.monotonic()
        self._thread.join()
        if self.error is not None:
            log.get().warning("export.base_gguf.unavailable", reason=self.error[-500:],
                              fallback="the merged weights are converted instead")
            return None
        log.get().info("export.base_gguf.ready", waited_seconds=round(time.monotonic() - started, 2))
        return self.path


def gguf_from_base(tools: llamacpp.Tools, base_gguf: Path, base_dir: Path, adapter_dir: Path, target: Path) -> None:
    """The base's GGUF with the adapter merged in: llama.cpp's LoRA converter, then llama-export-lora (the merge in
    f32, the adapted tensors written as f16, the others copied)."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    # llama.cpp scales by alpha / r; rsLoRA trained with alpha / sqrt(r)
    scale = math.sqrt(config["r"]) if config.get("use_rslora") else 1.0
    events = log.get()
    lora = target.with_name(f"{target.stem}-lora.gguf")
    events.info("export.gguf.merge.started", source=base_gguf.name)
    started = time.monotonic()
    try:
        llamacpp.convert_lora(tools, adapter_dir, base_dir, lora)
        llamacpp.export_lora(tools, base_gguf, lora, target, llamacpp.cpu_threads(), scale)
    finally:
        lora.unlink(missing_ok=True)
    events.info("export.gguf.merge.finished", bytes=target.stat().st_size, seconds=round(time.monotonic() - started, 2))


def gguf_from_merged(tools: llamacpp.Tools, merged_dir: Path, target: Path) -> None:
    events = log.get()
    events.info("export.gguf.convert.started", outtype="bf16")
    started = time.monotonic()
    llamacpp.convert(tools, merged_dir, target, "bf16")
    events.info("export.gguf.convert.finished", outtype="bf16", bytes=target.stat().st_size,
                seconds=round(time.monotonic() - started, 2))


def to_gguf(tools: llamacpp.Tools, merged_dir: Path, out_dir: Path, types: list[str], stem: str,
            on_made: Callable[[Path], None] | None = None) -> dict[str, Path]:
    """The merged checkpoint converted once to a bf16 GGUF, then quantized to each requested type."""
    intermediate = out_dir / "gguf" / f"{stem}-bf16.gguf"
    intermediate.parent.mkdir(parents=True, exist_ok=True)
    gguf_from_merged(tools, merged_dir, intermediate)
    return quantize_all(tools, intermediate, types, stem, on_made)


def to_gguf_from_base(tools: llamacpp.Tools, base_gguf: Path, base_dir: Path, adapter_dir: Path, out_dir: Path,
                      types: list[str], stem: str, on_made: Callable[[Path], None] | None = None) -> dict[str, Path]:
    """The adapter merged into the base's GGUF once, then quantized to each requested type."""
    intermediate = out_dir / "gguf" / f"{stem}-f16.gguf"
    intermediate.parent.mkdir(parents=True, exist_ok=True)
    gguf_from_base(tools, base_gguf, base_dir, adapter_dir, intermediate)
    return quantize_all(tools, intermediate, types, stem, on_made)


def quantize_all(tools: llamacpp.Tools, intermediate: Path, types: list[str], stem: str,
                 on_made: Callable[[Path], None] | None = None) -> dict[str, Path]:
    """Each requested type quantized from the 16-bit GGUF `intermediate` (itself published as bf16 when asked for,
    else deleted after the last quant); `on_made` is handed each finished file."""
    events = log.get()
    threads = llamacpp.cpu_threads()
    made: dict[str, Path] = {}
    for qtype in types:
        if qtype == "bf16":
            made[qtype] = intermediate
            continue
        target = intermediate.parent / f"{stem}-{qtype}.gguf"
        events.info("export.gguf.quantize.started", type=qtype, threads=threads)
        started = time.monotonic()
        llamacpp.quantize(tools, intermediate, target, qtype, threads)
        made[qtype] = target
        events.info("export.gguf.quantize.finished", type=qtype, bytes=target.stat().st_size,
                    seconds=round(time.monotonic() - started, 2))
        if on_made:
            on_made(target)
    if "bf16" not in types:
        intermediate.unlink()
    elif on_made:
        on_made(intermediate)
    return made


def clean(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
