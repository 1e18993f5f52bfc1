"""The four recipe examples: each validates unchanged, and each runs on the CPU through the CLI with only the model,
the step count and (where CPU time demands it) the batch size overridden, on a small data file in the recipe's own
format (examples/data/). Each run is then checked for the feature its recipe relies on, in what the run left behind:
the published files, the manifest, metrics.jsonl and the rows as the trainer received them (the work dir's
data/tokenized-sample.jsonl)."""

import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from job.chat_templates import ALPACA_PREAMBLE
from job.data import IGNORE, SAMPLE_FILE
from tests.conftest import REPO, SMOKE_GGUF

EXAMPLES = REPO / "examples"
DATA = EXAMPLES / "data"
RECIPES = {  # spec file → the data file its CPU run trains on
    "alpaca-llama31-8b.yaml": "alpaca-en.jsonl",
    "finetome-llama31-8b-chatml.yaml": "finetome-sharegpt.jsonl",
    "llama32-3b-conversational.yaml": "llama32-conversations.jsonl",
    "llama31-8b-instruct-modelscope-zh.yaml": "roleplay-zh-alpaca.json",
    "dpo-orpo-mix-llama31-8b.yaml": "preference-ahoy.jsonl",
}
# Fake credentials in the environment (and one in the spec): none may reach a log line or a published file.
HF_TOKEN = "hf_recipetesttoken0123456789abcdef"
MODELSCOPE_TOKEN = "ms-recipe-test-token-0123456789abcdef"
SPEC_TOKEN = "hf_spectoken0123456789abcdefghij"


@pytest.mark.parametrize("spec_file", sorted(RECIPES))
def test_example_validates_unchanged(spec_file):
    from job.cli.main import main

    result = CliRunner().invoke(main, ["validate", "--spec", str(EXAMPLES / spec_file)])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(result.stdout)["run"]["id"]


def test_every_recipe_is_listed_in_the_docs():
    listed = (REPO / "docs" / "recipes.md").read_text()
    for spec_file, data_file in RECIPES.items():
        assert f"examples/{spec_file}" in listed and data_file in listed


@dataclass
class Run:
    spec: dict
    run_dir: Path
    work_dir: Path
    manifest: dict
    events: list[dict]

    def sample(self) -> list[tuple[list[int], list[int]]]:
        lines = (self.work_dir / "data" / SAMPLE_FILE).read_text().splitlines()
        return [(row["input_ids"], row["labels"]) for row in map(json.loads, lines)]

    def metrics(self) -> list[dict]:
        return [json.loads(line) for line in (self.run_dir / "metrics.jsonl").read_text().splitlines()]

    def adapter_config(self) -> dict:
        return json.loads((self.run_dir / "adapter" / "adapter_config.json").read_text())


def run_recipe(tmp_path: Path, spec_file: str, *sets: str) -> Run:
    overrides = [f"model.name={SMOKE_GGUF}", "training.max_steps=2", f"data.source={DATA / RECIPES[spec_file]}",
                 f"run.output={tmp_path / 'runs'}", *sets]
    env = {**os.environ, "JOB_WORK_DIR": str(tmp_path / "work"), "HF_TOKEN": HF_TOKEN,
           "MODELSCOPE_API_TOKEN": MODELSCOPE_TOKEN, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "job.cli", "run", "--spec", str(EXAMPLES / spec_file)]
    command += [arg for item in overrides for arg in ("--set", item)]
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    spec = yaml.safe_load((EXAMPLES / spec_file).read_text())
    run_id = spec["run"]["id"]
    run_dir = tmp_path / "runs" / run_id
    manifest = json.loads((run_dir / "manifest.json").read_text())
    events = [json.loads(line) for line in proc.stdout.splitlines()]  # every stdout line is a JSON event
    assert manifest["training"]["steps"] == 2 and all(v["verdict"] == "pass" for v in manifest["verification"]["artifacts"])
    for secret in (HF_TOKEN, MODELSCOPE_TOKEN, SPEC_TOKEN):
        assert secret not in proc.stdout + proc.stderr
        for path in run_dir.rglob("*"):
            if path.is_file() and path.stat().st_size < 5_000_000:  # manifest, model card, spec, configs, metrics
                assert secret.encode() not in path.read_bytes(), path
    return Run(spec, run_dir, tmp_path / "work" / run_id, manifest, events)


def trained_runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    """The maximal stretches of tokens that carry loss."""
    runs: list[list[int]] = []
    previous = False
    for token, label in zip(ids, labels):
        if label != IGNORE:
            if not previous:
                runs.append([])
            runs[-1].append(token)
        previous = label != IGNORE
    return runs


def data_rows(spec_file: str) -> list[dict]:
    path = DATA / RECIPES[spec_file]
    if path.suffix == ".json":
        return json.loads(path.read_text())
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.smoke
def test_alpaca_recipe_trains_on_the_classic_prompt_with_eos(tmp_path, smoke_tokenizer):
    spec_file = "alpaca-llama31-8b.yaml"
    run = run_recipe(tmp_path, spec_file)
    assert run.manifest["data"]["format"] == "alpaca" and run.manifest["data"]["chat_template"] == "alpaca"
    eos = smoke_tokenizer.eos_token_id
    for (ids, labels), row in zip(run.sample(), data_rows(spec_file)):
        prompt = (f"{ALPACA_PREAMBLE}\n\n### Instruction:\n{row['instruction']}\n\n### Input:\n{row['input']}"
                  f"\n\n### Response:\n{row['output']}")
        assert smoke_tokenizer.decode(ids[:-1]) == prompt
        assert ids[-1] == eos and ids.count(eos) == 1  # EOS appended once, after the response
        assert labels == ids  # loss on the whole text, as the notebook's dataset_text_field="text" trains
    paths = {f["path"] for f in run.manifest["files"]}
    assert "adapter/adapter_model.safetensors" in paths
    assert not any(p.startswith(("merged/", "gguf/")) for p in paths)  # the recipe saves the LoRA adapter only


@pytest.mark.slow
@pytest.mark.smoke
def test_finetome_recipe_packs_full_sequences_with_rslora_and_six_ggufs(tmp_path, smoke_tokenizer):
    spec_file = "finetome-llama31-8b-chatml.yaml"
    batch = 1  # the recipe's 8 × 2048-token sequences would take many minutes per step on two cores
    run = run_recipe(tmp_path, spec_file, f"training.batch_size={batch}")
    data, training = run.manifest["data"], run.spec["training"]
    assert data["format"] == "sharegpt" and data["chat_template"] == "chatml"
    ids, labels = run.sample()[0]
    first = data_rows(spec_file)[0]["conversations"]
    assert smoke_tokenizer.decode(ids).startswith(f"<|im_start|>user\n{first[0]['value']}<|im_end|>\n<|im_start|>assistant\n")
    assert labels == ids  # the post trains on the whole text

    # Packing: the trainer counts epochs in sequences, so the first step (a full accumulation) tells how many
    # sequences one epoch holds. 16 rows went into the fewest 2048-token sequences that can hold their tokens.
    first_step, last_step = run.metrics()[0], run.metrics()[-1]
    sequences = round(batch * training["gradient_accumulation_steps"] * first_step["step"] / first_step["epoch"])
    assert sequences < data["rows_used"] == 16
    assert sequences == math.ceil(data["tokens"] / training["max_seq_length"])
    assert last_step["epoch"] == 1.0 and last_step["tokens"] > 0.95 * data["tokens"]  # every row seen in 2 steps

    # rsLoRA: the adapter says so, and peft scales by alpha / sqrt(r) = 4 (plain LoRA: alpha / r = 1).
    config = run.adapter_config()
    assert config["use_rslora"] is True and config["r"] == 16 and config["lora_alpha"] == 16
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run.run_dir / "merged"), run.run_dir / "adapter")
    assert {m.scaling["default"] for m in model.modules() if isinstance(m, LoraLayer)} == {16 / math.sqrt(16)}

    quants = ["q2_k", "q3_k_m", "q4_k_m", "q5_k_m", "q6_k", "q8_0"]
    assert run.manifest["export"]["gguf_types"] == quants
    paths = {f["path"] for f in run.manifest["files"]}
    assert "merged/model.safetensors" in paths
    assert {f"gguf/{run.spec['run']['id']}-{q}.gguf" for q in quants} <= paths
    assert {v["artifact"] for v in run.manifest["verification"]["artifacts"]} == {"merged"} | {f"gguf/{q}" for q in quants}

    # The DPO recipe, the second half of this one, chains from this run: its adapter, on the same base and lora.
    dpo = run_recipe(tmp_path, "dpo-orpo-mix-llama31-8b.yaml", f"model.adapter={run.run_dir}", "training.batch_size=2")
    assert dpo.manifest["lineage"]["parent"]["run_id"] == run.spec["run"]["id"]
    assert dpo.manifest["training"]["method"] == "dpo" and dpo.manifest["training"]["steps"] == 2
    assert dpo.manifest["data"]["format"] == "preference_messages" and dpo.manifest["data"]["chat_template"] == "chatml"
    assert set(dpo.manifest["training"]["preference"]) >= {"rewards/margins", "rewards/accuracies"}
    assert dpo.adapter_config()["use_rslora"] is True
    assert all(v["verdict"] == "pass" for v in dpo.manifest["verification"]["artifacts"])


@pytest.mark.slow
@pytest.mark.smoke
def test_conversational_recipe_trains_only_assistant_turns_in_the_models_template(tmp_path, smoke_tokenizer):
    spec_file = "llama32-3b-conversational.yaml"
    run = run_recipe(tmp_path, spec_file, f"model.token={SPEC_TOKEN}")
    data = run.manifest["data"]
    assert data["chat_template"] == "model" and data["rows_used"] == data["rows_read"]
    assert data["trained_tokens"] < data["tokens"]
    for (ids, labels), row in zip(run.sample(), data_rows(spec_file)):
        turns = row["conversations"]
        answers = [t["value"] for t in turns if t["from"] == "gpt"]
        prompts = [t["value"] for t in turns if t["from"] != "gpt"]
        trained = [smoke_tokenizer.decode(stretch) for stretch in trained_runs(ids, labels)]
        assert len(trained) == len(answers)  # one stretch of loss per assistant turn, nothing else
        for text, answer in zip(trained, answers):
            assert text.strip().startswith(answer) and text.rstrip().endswith(smoke_tokenizer.eos_token)
            assert not any(prompt in text for prompt in prompts)
    assert run.manifest["spec"]["model"]["token"] == "**********"


@pytest.mark.slow
@pytest.mark.smoke
def test_roleplay_recipe_truncates_at_384_counted_on_the_16bit_path_with_dropout(tmp_path, smoke_tokenizer):
    spec_file = "llama31-8b-instruct-modelscope-zh.yaml"
    run = run_recipe(tmp_path, spec_file, "training.batch_size=1")  # 4 × 4 rows of 384 tokens per step is slow here
    data, training = run.manifest["data"], run.manifest["training"]
    logged = next(e for e in run.events if e["event"] == "data.load.finished")
    assert data["rows_truncated"] >= 1 and logged["rows_truncated"] == data["rows_truncated"]
    sample = run.sample()
    assert max(len(ids) for ids, _ in sample) == 384 and all(len(ids) <= 384 for ids, _ in sample)

    # The tutorial's hand-written Llama 3 prompt: its system message, the user turn, the response alone trained.
    ids, labels = sample[0]
    row = data_rows(spec_file)[0]
    system = run.spec["data"]["system_prompt"]
    assert (f"<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|><|start_header_id|>user<|end_header_id|>"
            f"\n\n{row['instruction']}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n") in smoke_tokenizer.decode(ids)
    (answer,) = [smoke_tokenizer.decode(stretch) for stretch in trained_runs(ids, labels)]
    assert answer.startswith(row["output"] + "<|eot_id|>")

    assert training["backend"] == "hf" and training["precision"] == "16bit"
    config = run.adapter_config()
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (8, 32, 0.1)
    assert run.manifest["spec"]["training"]["checkpoint_every"] == 100
