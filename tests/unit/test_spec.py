import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from job.cli.main import main
from job.errors import EXIT_USER, SpecError
from job.spec import Spec, env_overrides, parse_set, resolve

MINIMAL = {"model": {"name": "some/model"}, "data": {"source": "rows.jsonl"}}


def test_defaults_reproduce_the_unsloth_recipe():
    spec = Spec.model_validate(MINIMAL)
    assert (spec.lora.r, spec.lora.alpha, spec.lora.dropout, spec.lora.bias) == (16, 16, 0.0, "none")
    assert spec.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    t = spec.training
    assert (t.optim, t.learning_rate, t.warmup_steps, t.lr_scheduler, t.weight_decay, t.seed, t.max_seq_length) == (
        "adamw_8bit", 2e-4, 5, "linear", 0.01, 3407, 2048)
    assert spec.export.gguf == ["q4_k_m", "q8_0"]


def test_unknown_key_is_an_error_with_its_path():
    with pytest.raises(SpecError) as err:
        resolve({**MINIMAL, "training": {"learnin_rate": 1e-4}}, "spec.yaml", [])
    assert "training.learnin_rate: unknown field" in str(err.value)


def test_every_invalid_field_is_reported_at_once():
    bad = {"model": {}, "data": {"source": "x"}, "lora": {"r": 0, "dropout": 2}, "export": {"gguf": ["q4_k_m", "q9_z"]}}
    with pytest.raises(SpecError) as err:
        resolve(bad, "spec.yaml", [])
    text = str(err.value)
    for path in ("model.name: required field is missing", "lora.r:", "lora.dropout:", "export.gguf:"):
        assert path in text, text
    assert "q9_z" in text and text.startswith("spec.yaml:")


def test_overrides_env_then_set_win_in_that_order():
    env = {"JOB__TRAINING__LEARNING_RATE": "1e-4", "JOB__LORA__R": "8", "UNRELATED": "x"}
    overrides = env_overrides(env) + [parse_set("lora.r=32"), parse_set("export.gguf=[q8_0]")]
    spec = resolve(MINIMAL, "spec.yaml", overrides)
    assert spec.training.learning_rate == 1e-4
    assert spec.lora.r == 32
    assert spec.export.gguf == ["q8_0"]


def test_bad_override_names_its_origin():
    with pytest.raises(SpecError) as err:
        resolve(MINIMAL, "spec.yaml", env_overrides({"JOB__LORA__R": "many"}))
    assert "lora.r" in str(err.value)


def test_run_id_is_stable_and_changes_with_the_spec():
    a = resolve(MINIMAL, "s", [])
    b = resolve(MINIMAL, "s", [])
    c = resolve(MINIMAL, "s", [parse_set("training.learning_rate=1e-5")])
    assert a.run_id == b.run_id != c.run_id
    assert a.run_id.startswith("run-")


def test_validate_prints_resolved_spec_with_secret_masked(tmp_path, monkeypatch):
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump({**MINIMAL, "model": {"name": "m/x", "token": "hf_supersecrettoken123"}}))
    result = CliRunner().invoke(main, ["validate", "--spec", str(spec_file), "--set", "lora.r=8"])
    assert result.exit_code == 0, result.output
    assert "hf_supersecrettoken123" not in result.output
    printed = yaml.safe_load(result.output)
    assert printed["lora"]["r"] == 8 and printed["model"]["token"] == "**********"


def test_validate_reads_inline_env_spec(monkeypatch):
    monkeypatch.setenv("JOB_SPEC", json.dumps(MINIMAL))
    monkeypatch.setenv("JOB__TRAINING__MAX_STEPS", "7")
    result = CliRunner().invoke(main, ["validate"])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(result.output)["training"]["max_steps"] == 7


def test_invalid_spec_exits_2_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump({**MINIMAL, "run": {"output": str(out)}, "lora": {"r": -1}}))
    result = CliRunner().invoke(main, ["run", "--spec", str(spec_file)])
    assert result.exit_code == EXIT_USER
    assert "lora.r" in result.output
    assert not out.exists()


def test_missing_spec_is_a_user_error(monkeypatch):
    monkeypatch.delenv("JOB_SPEC", raising=False)
    monkeypatch.delenv("JOB_SPEC_URI", raising=False)
    result = CliRunner().invoke(main, ["validate"])
    assert result.exit_code == EXIT_USER and "no run spec" in result.output


def test_spec_from_s3(s3_env, bucket):
    import boto3

    boto3.client("s3").put_object(Bucket=bucket, Key="specs/a.yaml", Body=yaml.safe_dump(MINIMAL).encode())
    result = CliRunner().invoke(main, ["validate", "--spec", f"s3://{bucket}/specs/a.yaml"])
    assert result.exit_code == 0, result.output
    missing = CliRunner().invoke(main, ["validate", "--spec", f"s3://{bucket}/specs/nope.yaml"])
    assert missing.exit_code == 3


def test_schema_lists_every_section():
    result = CliRunner().invoke(main, ["schema"])
    schema = json.loads(result.output)
    assert set(schema["properties"]) == {"run", "model", "lora", "data", "training", "export", "logging"}


def test_every_example_spec_validates():
    from pathlib import Path

    examples = sorted((Path(__file__).parents[2] / "examples").glob("*.yaml"))
    assert examples
    for path in examples:
        result = CliRunner().invoke(main, ["validate", "--spec", str(path)])
        assert result.exit_code == 0, (path, result.output)


def test_fsdp_sharding_is_refused_not_ignored():
    with pytest.raises(SpecError) as err:
        resolve({**MINIMAL, "training": {"sharding": "fsdp"}}, "spec.yaml", [])
    assert "training.sharding: fsdp is not built yet" in str(err.value) and "use ddp" in str(err.value)
    assert resolve({**MINIMAL, "training": {"sharding": "ddp"}}, "spec.yaml", []).training.sharding == "ddp"


def test_a_home_relative_output_is_expanded():
    spec = resolve({"model": {"name": "m"}, "data": {"source": "d"}}, "test", [("run.output", "~/runs", "--set run.output")])
    assert not spec.run.output.startswith("~") and spec.run.output.endswith("/runs")


def test_the_spec_is_taken_as_the_first_argument_or_as_spec_but_not_two_different_ones(tmp_path):
    smoke = str(Path(__file__).resolve().parents[2] / "examples" / "smoke.yaml")
    positional, option = (CliRunner().invoke(main, ["validate", *args]) for args in ([smoke], ["--spec", smoke]))
    assert positional.exit_code == option.exit_code == 0 and positional.output == option.output
    other = tmp_path / "other.yaml"
    other.write_text("model: {name: m}\ndata: {source: d}\n")
    both = CliRunner().invoke(main, ["validate", smoke, "--spec", str(other)])
    assert both.exit_code == EXIT_USER and "two specs given" in both.output
