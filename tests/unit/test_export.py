"""The export's scratch disk: predicted from the model's config, and refused before training when it cannot fit."""

import pytest

from job import export
from job.errors import OutOfResources
from job.plan.estimate import arch_from_config, estimate_disk
from job.spec import ExportSection, LoraSection

LLAMA_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
            "tie_word_embeddings": False}


def test_the_8b_recipe_peaks_near_the_60_gib_it_was_seen_to_take():
    disk = estimate_disk(arch_from_config(LLAMA_8B), merged=True, gguf_types=["q4_k_m", "q8_0"])
    assert 55 < disk.total < 62 and disk.model_cache == disk.merged == disk.gguf_intermediate
    assert 12 < disk.gguf < 14  # Llama-3.1-8B's published q4_k_m and q8_0 files: 4.9 + 8.5 GB
    assert estimate_disk(arch_from_config(LLAMA_8B), merged=False, gguf_types=[]).scratch == 0
    cached = estimate_disk(arch_from_config(LLAMA_8B), merged=True, gguf_types=["q4_k_m"], base_gguf=True)
    assert cached.cache == 2 * cached.model_cache  # the base's own GGUF beside it in the model cache


def test_a_run_whose_export_cannot_fit_the_scratch_disk_is_refused_before_training(tmp_path):
    huge = {**LLAMA_8B, "num_hidden_layers": 32_000}  # about 7 PiB of merged weights
    with pytest.raises(OutOfResources, match=r"needs about .* GiB of scratch disk .* GiB free") as refused:
        export.check_disk(ExportSection(), huge, tmp_path)
    assert refused.value.exit_code == 3 and "export.gguf" in refused.value.hint
    export.check_disk(ExportSection(), {**LLAMA_8B, "num_hidden_layers": 1, "hidden_size": 64,
                                        "intermediate_size": 128, "vocab_size": 256}, tmp_path)


@pytest.mark.parametrize(("lora", "gguf", "why"), [
    ({}, ["q4_k_m", "bf16"], "bf16"),
    ({"bias": "all"}, ["q8_0"], "lora.bias"),
    ({"target_modules": ["q_proj", "embed_tokens"]}, ["q8_0"], "embed_tokens"),
    ({}, [], "no GGUF"),
])
def test_the_base_route_is_refused_where_llama_export_lora_would_change_the_model(lora, gguf, why):
    assert why in export.base_gguf_refusal(LoraSection(**lora), ExportSection(gguf=gguf))
    assert export.base_gguf_refusal(LoraSection(), ExportSection(gguf=["q4_k_m", "q8_0"])) is None
