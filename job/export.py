"""Export: the LoRA adapter, merged 16-bit weights (merged into the 16-bit base), and GGUF files."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from job import llamacpp, log
from job.errors import OutOfResources, SpecError
from job.model import read_config
from job.spec import ExportSection, ModelSection


@dataclass
class Exported:
    adapter_dir: Path
    merged_dir: Path | None = None
    gguf: dict[str, Path] = field(default_factory=dict)
    merge_method: str | None = None
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


def to_gguf(tools: llamacpp.Tools, merged_dir: Path, out_dir: Path, types: list[str], stem: str,
            on_made: Callable[[Path], None] | None = None) -> dict[str, Path]:
    """Convert the merged checkpoint once to a bf16 GGUF, then quantize to each requested type; `on_made` is handed
    each finished file (the bf16 one once the last quant that reads it is done)."""
    events = log.get()
    gguf_dir = out_dir / "gguf"
    gguf_dir.mkdir(parents=True, exist_ok=True)
    threads = llamacpp.cpu_threads()
    intermediate = gguf_dir / f"{stem}-bf16.gguf"
    events.info("export.gguf.convert.started", outtype="bf16")
    started = time.monotonic()
    llamacpp.convert(tools, merged_dir, intermediate, "bf16")
    events.info("export.gguf.convert.finished", outtype="bf16", bytes=intermediate.stat().st_size,
                seconds=round(time.monotonic() - started, 2))
    made: dict[str, Path] = {}
    for qtype in types:
        target = gguf_dir / f"{stem}-{qtype}.gguf"
        if qtype == "bf16":
            made[qtype] = intermediate
            continue
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
