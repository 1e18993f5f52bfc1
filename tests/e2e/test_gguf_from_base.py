"""The GGUFs made from the base's cached GGUF (llama.cpp's LoRA converter and llama-export-lora) hold the same model
as those converted from the merged weights: every tensor within 16-bit rounding, the same tokenizer, and a second
run on the same base finds the cached file."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
import structlog

from job import export, llamacpp, log
from job.cli.common import paths_from_env
from job.model import load_tokenizer
from job.spec import ModelSection

pytestmark = [pytest.mark.smoke, pytest.mark.slow]


def _random_adapter(base, folder, tokenizer) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=sorted(export.PROJECTIONS),
                                             use_rslora=True, task_type="CAUSAL_LM"))  # alpha / sqrt(r), as recipes use
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)  # a fresh adapter's B is zero: nothing would be merged
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)  # as job saves the run's tokenizer beside its adapter


def _tensors(path) -> dict[str, np.ndarray]:
    from gguf import GGUFReader
    from gguf.quants import dequantize

    return {t.name: dequantize(t.data, t.tensor_type).astype(np.float32) for t in GGUFReader(path).tensors}


def test_the_base_route_makes_the_gguf_the_merged_weights_make(smoke_model_dir, tmp_path):
    tools = llamacpp.locate(paths_from_env(dict(os.environ)).llama_cpp_dir)
    tokenizer = load_tokenizer(smoke_model_dir)
    tokenizer.chat_template = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    adapter = tmp_path / "adapter"
    _random_adapter(smoke_model_dir, adapter, tokenizer)
    cache = tmp_path / "cache"

    base_gguf = export.BaseGguf(tools, smoke_model_dir, tokenizer, cache, tmp_path / "work").start()
    cached = base_gguf.wait()
    assert cached is not None and cached.parent == cache / "gguf", base_gguf.error
    from_base = tmp_path / "from-base.gguf"
    export.gguf_from_base(tools, cached, base_gguf.source, adapter, from_base)

    merged_dir, _ = export.merge(smoke_model_dir, adapter, tmp_path, ModelSection(name=str(smoke_model_dir)))
    from_merged = tmp_path / "from-merged.gguf"
    export.gguf_from_merged(tools, merged_dir, from_merged)

    # the same tokenizer, chat template included, and the same architecture keys
    assert llamacpp.tokenizer_digest(from_base) == llamacpp.tokenizer_digest(from_merged)
    meta_base, meta_merged = llamacpp.gguf_metadata(from_base), llamacpp.gguf_metadata(from_merged)
    assert meta_base["tokenizer.chat_template"] == tokenizer.chat_template
    for key in (k for k in meta_merged if k.startswith("llama.")):
        assert meta_base[key] == meta_merged[key], key

    # every tensor: the base plus the adapter's update, within what 16-bit storage rounds away
    a, b = _tensors(from_merged), _tensors(from_base)
    assert a.keys() == b.keys()
    adapted = 0
    for name, merged in a.items():
        assert merged.shape == b[name].shape, name
        error = np.abs(merged - b[name])
        assert (error <= np.abs(merged) * 2.0**-7 + 1e-6).all(), (name, float(error.max()))
        adapted += name.endswith(("attn_q.weight", "ffn_down.weight"))
    assert adapted == 2 * llamacpp.gguf_metadata(from_merged)["llama.block_count"]

    # a second run on this base and tokenizer converts nothing
    events = io.StringIO()
    log.setup(json_logs=True, stream=events)
    with structlog.contextvars.bound_contextvars(run_id="second"):
        again = export.BaseGguf(tools, smoke_model_dir, tokenizer, cache, tmp_path / "work-2").start()
    with structlog.contextvars.bound_contextvars(run_id="second-waits"):
        assert again.wait() == cached
    lines = [json.loads(line) for line in events.getvalue().splitlines()]
    by_thread = [e for e in lines if e["event"] == "export.base_gguf.cached"]
    assert by_thread and all(e.get("run_id") == "second" for e in by_thread)  # the run's fields in the thread too
    names = [e["event"] for e in lines]
    assert "export.base_gguf.cached" in names and "export.base_gguf.convert.started" not in names


def test_a_base_gguf_that_cannot_be_made_leaves_the_merged_route_and_says_why(smoke_model_dir, tmp_path):
    tools = llamacpp.locate(paths_from_env(dict(os.environ)).llama_cpp_dir)
    (tmp_path / "cache").write_text("a file where the cache folder should be")
    events = io.StringIO()
    log.setup(json_logs=True, stream=events)
    base_gguf = export.BaseGguf(tools, smoke_model_dir, load_tokenizer(smoke_model_dir), tmp_path / "cache",
                                tmp_path / "work").start()
    assert base_gguf.wait() is None
    warning = next(json.loads(line) for line in events.getvalue().splitlines()
                   if json.loads(line)["event"] == "export.base_gguf.unavailable")
    assert "cache" in warning["reason"] and "merged weights" in warning["fallback"]
