import re

import pytest

from job import card, llamacpp, verify
from job.chat_templates import CHATML, LLAMA_3
from job.errors import VerificationError
from job.spec import Spec


def render_go(template: str, system: str, prompt: str) -> str:
    """Ollama's template for one turn, up to where the model starts answering (the subset our templates use)."""
    template = template.split("{{ .Response }}")[0]
    values = {"System": system, "Prompt": prompt}

    def conditional(match):
        return match.group(2) if values[match.group(1)] else ""

    template = re.sub(r"\{\{ if \.(\w+) \}\}(.*?)\{\{ end \}\}", conditional, template, flags=re.S)
    return re.sub(r"\{\{ \.(\w+) \}\}", lambda m: values[m.group(1)], template)


def modelfile_template_and_system(text: str) -> tuple[str, str]:
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    system = text.split('SYSTEM """', 1)[1].split('"""', 1)[0] if 'SYSTEM """' in text else ""
    return template, system


def test_modelfile_renders_the_prompt_the_smoke_model_was_trained_on(smoke_tokenizer):
    # SmolLM2's own template adds a default system prompt: the Modelfile must carry it.
    family = card.template_family(smoke_tokenizer.chat_template, "model")
    assert family == "chatml"
    text = card.modelfile("m.gguf", family, card.default_system(smoke_tokenizer, family))
    template, system = modelfile_template_and_system(text)
    expected = verify.chat_prompt(smoke_tokenizer, "What is your name?")
    assert render_go(template, system, "What is your name?") == expected
    assert 'PARAMETER stop "<|im_end|>"' in text


@pytest.mark.parametrize("name,jinja", [("chatml", CHATML), ("llama-3", LLAMA_3)])
def test_named_templates_match_their_ollama_twins(smoke_tokenizer, name, jinja):
    tok = type(smoke_tokenizer).from_pretrained(smoke_tokenizer.name_or_path)
    tok.chat_template = jinja
    for messages, system in (([{"role": "user", "content": "Hi"}], ""),
                             ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], "Be brief.")):
        expected = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if verify.template_emits_bos(tok) and expected.startswith(tok.bos_token):
            expected = expected[len(tok.bos_token):]  # Ollama/llama.cpp add BOS themselves
        assert render_go(card.OLLAMA_TEMPLATES[name], system, "Hi") == expected


@pytest.mark.slow
def test_corrupt_gguf_is_caught_by_verification(tmp_path, smoke_tokenizer):
    import os
    from pathlib import Path

    tools = llamacpp.locate(Path(os.environ.get("JOB_LLAMA_CPP_DIR") or Path.home() / ".cache/job/llama.cpp-0.3.36"))
    corrupt = tmp_path / "model-q8_0.gguf"
    corrupt.write_bytes(b"GGUF" + os.urandom(4096))
    with pytest.raises(VerificationError) as err:
        verify.answer_with_gguf(tools, corrupt, smoke_tokenizer, ["What is your name?"], 8)
    assert "llama-completion" in str(err.value)


def test_greedy_answers_are_recorded_per_artifact_with_whether_each_ended():
    """A sample for people to read (the manifest's probes, the model card); the gates are the distributions."""
    report = verify.ProbeReport(["Q?", "R?"], max_new_tokens=8)
    report.put("adapter", ["My name is Quill.", "Northwind."], [True, True])
    report.put("gguf_q8_0", ["My name is Quill.", "Northwind Labs made"], [True, False])
    rows = report.as_dict()
    assert rows[0] == {"prompt": "Q?", "adapter": "My name is Quill.", "gguf_q8_0": "My name is Quill.",
                       "stopped": {"adapter": True, "gguf_q8_0": True}}
    assert rows[1]["stopped"] == {"adapter": True, "gguf_q8_0": False}


def test_llama_cpp_threads_follow_the_cgroup_quota_not_the_node(tmp_path):
    import os

    mine = len(os.sched_getaffinity(0))
    (tmp_path / "quota").write_text("150000 100000\n")  # limits.cpu: 1.5
    (tmp_path / "unlimited").write_text("max 100000\n")
    assert llamacpp.cpu_threads(tmp_path / "quota") == min(mine, 2)
    assert llamacpp.cpu_threads(tmp_path / "unlimited") == mine
    assert llamacpp.cpu_threads(tmp_path / "no-cgroup-v2") == mine


def test_tool_output_cut_inside_a_character_or_a_hung_tool_is_a_result_not_a_crash():
    import sys

    cut = llamacpp.run_tool([sys.executable, "-c", "import sys; sys.stdout.buffer.write('名前'.encode()[:4])"], "cut")
    assert cut.stdout == "名\ufffd"
    with pytest.raises(VerificationError, match="did not finish within 1 s"):
        llamacpp.run_tool([sys.executable, "-c", "import time; time.sleep(30)"], "hung", timeout=1)


def test_a_tool_killed_at_the_memory_limit_or_out_of_disk_is_the_pods_size_not_a_bad_artifact():
    import sys

    from job.errors import EXIT_NOT_FOUND, OutOfResources

    with pytest.raises(OutOfResources, match="killed \\(SIGKILL\\)") as killed:  # what the kernel's OOM killer sends
        llamacpp.run_tool([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"], "llama-quantize")
    assert killed.value.exit_code == EXIT_NOT_FOUND and "resources.limits.memory" in killed.value.hint
    # /dev/full answers every write with ENOSPC, as a full scratch volume does
    with pytest.raises(OutOfResources, match="ran out of disk space") as full:
        llamacpp.run_tool([sys.executable, "-c", "open('/dev/full', 'wb', buffering=0).write(b'GGUF')"], "convert_hf_to_gguf.py")
    assert full.value.exit_code == EXIT_NOT_FOUND and "scratch volume" in full.value.hint
    with pytest.raises(VerificationError, match="failed with exit code 3: broken"):  # anything else: the artifact's
        llamacpp.run_tool([sys.executable, "-c", "import sys; print('broken', file=sys.stderr); sys.exit(3)"], "llama-quantize")


@pytest.mark.parametrize("declared", ["float16", "bfloat16"])
def test_merged_weights_keep_the_base_checkpoints_16_bit_dtype(tmp_path, smoke_tokenizer, declared):
    import json

    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors import safe_open
    from transformers import LlamaConfig, LlamaForCausalLM

    from job import export
    from job.spec import ModelSection

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(smoke_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    LlamaForCausalLM(config).to(getattr(torch, declared)).save_pretrained(tmp_path / "base")
    assert json.loads((tmp_path / "base" / "config.json").read_text())["dtype"] == declared
    adapter = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, target_modules=["q_proj"]))
    export.save_adapter(adapter, smoke_tokenizer, tmp_path / "out")

    merged_dir, method = export.merge(tmp_path / "base", tmp_path / "out" / "adapter", tmp_path / "out", ModelSection(name="x"))
    assert json.loads((merged_dir / "config.json").read_text())["dtype"] == declared and method.endswith(f"saved as {declared})")
    with safe_open(merged_dir / "model.safetensors", "pt") as weights:
        assert {weights.get_tensor(k).dtype for k in weights.keys()} == {getattr(torch, declared)}


def card_body(**extra) -> dict:
    spec = Spec.model_validate({"model": {"name": "HuggingFaceTB/SmolLM2-135M-Instruct"},
                                "data": {"source": "pairs.jsonl"}}).masked()
    body = {"run_id": "dpo-1", "spec": spec, "data": {}, "probes": [],
            "training": {"steps": 4, "first_loss": 0.6931, "final_loss": 0.41, "backend": "hf", "precision": "16bit"}}
    for key, value in extra.items():
        body[key] = {**body[key], **value} if isinstance(body.get(key), dict) else value
    return body


def test_the_card_names_the_method_the_parent_and_the_preference_metrics():
    parent = {"run_id": "sft-1", "uri": "s3://b/runs/sft-1", "manifest": "s3://b/runs/sft-1/manifest.json",
              "manifest_sha256": "ab" * 32, "method": "sft"}
    preference = {"rewards/chosen": 0.42, "rewards/rejected": -0.39, "rewards/accuracies": 0.875,
                  "rewards/margins": 0.8123, "logps/chosen": -85.3125, "logps/rejected": -97.25}
    text = card.model_card(card_body(training={"method": "dpo", "preference": preference},
                                     lineage={"parent": parent}), ["adapter/adapter_model.safetensors"])
    assert "| method | dpo |" in text
    lineage = next(line for line in text.splitlines() if line.startswith("**Lineage:**"))
    assert "`sft-1` (sft)" in lineage and "`s3://b/runs/sft-1/manifest.json`" in lineage and "ab" * 32 in lineage
    assert "## Preference metrics (dpo, last logged step)" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "`" in line]
    # The margin, accuracy and log-probabilities first, then the rewards themselves.
    assert rows[:4] == ["| reward margin (chosen - rejected) | `rewards/margins` | 0.8123 |",
                        "| reward accuracy (share of pairs with chosen above rejected) | `rewards/accuracies` "
                        "| 0.875 |",
                        "| log-probability of the chosen answers | `logps/chosen` | -85.31 |",
                        "| log-probability of the rejected answers | `logps/rejected` | -97.25 |"]
    assert len(rows) == len(preference)


def test_a_card_without_method_lineage_or_preference_metrics_is_as_before():
    text = card.model_card(card_body(), ["adapter/adapter_model.safetensors"])
    assert "| method |" not in text and "Lineage" not in text and "Preference" not in text
    # An sft run of today records its method but no preference metrics and no parent.
    text = card.model_card(card_body(training={"method": "sft", "preference": None}, lineage=None),
                           ["adapter/adapter_model.safetensors"])
    assert "| method | sft |" in text and "Lineage" not in text and "Preference" not in text
