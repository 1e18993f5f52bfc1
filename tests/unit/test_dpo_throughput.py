"""bench/dpo_throughput.py on the CPU: its pure parts (the rows, the rates, the summary), the bare loop's DPOConfig
against job's trainer_config, and both variants end to end on a tiny model with transformers + peft
(`--backend hf`), so a GPU call never finds the script broken. The figures mean nothing here."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.conftest import REPO

SCRIPT = REPO / "bench" / "dpo_throughput.py"


def _module():
    spec = importlib.util.spec_from_file_location("dpo_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


dt = _module()


def bench(*args, cwd):
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("dpo-tiny") / "tiny"
    made = bench("make-tiny", "--dir", str(folder), cwd=folder.parent)
    assert made.returncode == 0, made.stderr[-3000:]
    return folder


def test_rows_are_jobs_preference_messages_of_the_asked_lengths_and_the_same_for_a_seed(tiny, tmp_path):
    from job.preference import detect_format, normalize_row

    out = tmp_path / "rows.jsonl"
    stats = dt.make_rows(str(out), 60, str(tiny), seed=3, prompt_tokens=(20, 50), answer_tokens=(30, 80), seq=256)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 60 and detect_format(rows) == "preference_messages"
    for number, row in enumerate(rows, start=1):
        assert isinstance(row["prompt"], str) and [m["role"] for m in row["chosen"]] == ["user", "assistant"]
        assert row["chosen"][0] == row["rejected"][0] == {"role": "user", "content": row["prompt"]}
        answers = normalize_row(row, "preference_messages", f"row {number}")  # as job reads it: nothing dropped
        assert answers.prompt == [row["chosen"][0]] and answers.chosen != answers.rejected
    # the tiny tokenizer is one token a word; the template adds its tags around the prompt
    assert stats["tokens_per_word"] == 1.0
    assert 20 <= stats["prompt"]["p10"] and stats["prompt"]["max"] <= 50 + 8, stats["prompt"]
    assert 30 <= stats["chosen"]["p10"] and stats["chosen"]["max"] <= 80 + 4, stats["chosen"]
    assert stats["sequence"]["rows"] == 120 and stats["sequence"]["over_seq"] == 0 and "over_seq" not in stats["pair"]
    assert json.loads((tmp_path / "rows.jsonl.stats.json").read_text()) == stats

    again = tmp_path / "again.jsonl"
    dt.make_rows(str(again), 60, str(tiny), seed=3, prompt_tokens=(20, 50), answer_tokens=(30, 80))
    assert again.read_text() == out.read_text()
    other = tmp_path / "other.jsonl"
    dt.make_rows(str(other), 60, str(tiny), seed=4, prompt_tokens=(20, 50), answer_tokens=(30, 80))
    assert other.read_text() != out.read_text()


def test_rates_time_each_step_from_the_previous_end_and_count_real_tokens_and_pairs():
    ends = {0: 0.0, 1: 1.0, 2: 1.5, 3: 2.5}
    tokens = {0: 100, 1: 1000, 2: 1000, 3: 2000}
    padded = {1: 1200, 2: 1250, 3: 2550}
    pairs = {1: 2, 2: 2, 3: 2}
    got = dt.rate_figures(ends, tokens, padded, pairs, warmup=1, steps=4)
    assert got["steps_measured"] == 3 and got["step_ms"] == [1000, 500, 1000] and got["step_ms_median"] == 1000.0
    assert got["tokens_per_second"] == 2000.0 and got["tokens_per_second_overall"] == 1600.0
    assert got["rows_per_second"] == 2.0 and got["rows_per_second_overall"] == 2.4
    assert got["tokens_per_step"] == [1000, 1000, 2000] and got["padding_fraction"] == 0.2
    assert dt.rate_figures({}, {}, {}, {}, 1, 4) == {"steps_measured": 0}


def test_without_a_forward_seen_the_tokens_come_from_the_trainers_own_count():
    # each trainer has counted a step's tokens by the next step's start (job's lean trainer at the step's log line)
    probe = dt.DpoProbe(warmup=1, steps=3)
    probe.seen_at_begin, probe.seen_at_end, probe.pairs_per_step = {0: 0, 1: 400, 2: 850}, 1300, 2
    probe.ends = {0: 1.0, 1: 2.0, 2: 2.5}
    got = probe.report()
    assert got["tokens_source"] == "trainer count" and got["tokens_per_step"] == [450, 450]
    assert got["tokens_per_second"] == 675.0 and got["rows_per_second"] == 3.0 and got["tokens_counted"] == 1300


def test_the_summary_compares_jobs_median_to_the_bare_loops_and_says_what_differs(tmp_path):
    def row(kind, n, rate, digest="d1", tokens=(10, 20)):
        return {"variant": f"{kind}-{n}", "kind": kind, "steps_measured": 2, "tokens_per_second": rate,
                "rows_per_second": rate / 1000, "peak_gpu_memory_gib": 30.0, "trainer_args_digest": digest,
                "tokens_per_step": list(tokens)}

    path = tmp_path / "dpo.jsonl"
    lines = [row("bare", 1, 1000.0), row("job", 1, 980.0), row("bare", 2, 1010.0), row("job", 2, 970.0),
             {"variant": "bare-3", "kind": "bare", "exit": 124, "timed_out": True},
             {"variant": "job-3", "kind": "job", "skipped": "time budget"}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    got = dt.summary(str(path))
    assert got["median_tokens_per_second"] == {"bare": 1005.0, "job": 975.0}
    assert got["job_over_bare"] == round(975 / 1005, 4) and got["meets_floor"]
    assert got["same_trainer_args"] and got["same_batches"]
    assert got["failed"] == ["bare-3"] and got["skipped"] == ["job-3"]

    lines = [row("bare", 1, 1000.0), row("job", 1, 960.0, "d2", (10, 21))]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    got = dt.summary(str(path))
    assert not got["meets_floor"] and not got["same_trainer_args"] and not got["same_batches"]


@pytest.mark.parametrize("gpu", [False, True], ids=["cpu", "gpu"])
def test_the_bare_loops_dpo_config_is_jobs_trainer_config_field_for_field(gpu, monkeypatch):
    """The arguments each passes to DPOConfig, on the GPU's settings too (a DPOConfig with bf16 cannot be made
    without a GPU, so the arguments are compared, not the objects)."""
    import trl

    from job.spec import Spec
    from job.train import trainer_config

    given = []
    monkeypatch.setattr(trl, "DPOConfig", lambda **kwargs: given.append(kwargs))
    monkeypatch.setattr(dt, "cuda", lambda: gpu)
    args = SimpleNamespace(batch=2, seq=2048, steps=15, work="/w", model_dir="/m", rows="/r.jsonl", precision="4bit",
                           backend="unsloth" if gpu else "hf", checkpointing=0)
    dt.bare_config(args)
    spec = Spec.model_validate(dt.job_spec(args))
    trainer_config(spec.training, Path("/elsewhere"), dtype_name="bfloat16" if gpu else "float32", use_cpu=not gpu,
                   backend=args.backend)
    bare, job = ({k: v for k, v in kwargs.items() if k != "output_dir"} for kwargs in given)
    assert bare == job
    assert job["bf16"] is gpu and job["dataloader_num_workers"] == (2 if gpu else 0) and job["max_length"] == 2048
    assert job["beta"] == 0.1 and job["loss_type"] == ["sigmoid"] and job["per_device_train_batch_size"] == 2
    assert job["optim"] == ("adamw_8bit" if gpu else "adamw_torch") and job["gradient_accumulation_steps"] == 1


def test_both_variants_run_on_a_tiny_model_on_the_cpu(tiny, tmp_path):
    rows = tmp_path / "rows.jsonl"
    made = bench("make-rows", "--out", str(rows), "--rows", "40", "--tokenizer", str(tiny), "--prompt-tokens", "20,50",
                 "--answer-tokens", "30,80", "--seq", "256", cwd=tmp_path)
    assert made.returncode == 0, made.stderr[-3000:]

    out = tmp_path / "dpo.jsonl"
    for variant in dt.VARIANTS:
        ran = bench("run", "--variant", variant, "--backend", "hf", "--precision", "16bit", "--model-dir", str(tiny),
                    "--rows", str(rows), "--seq", "256", "--batch", "2", "--steps", "3", "--warmup", "1",
                    "--work", str(tmp_path / variant), "--out", str(out), cwd=tmp_path)
        assert ran.returncode == 0, ran.stderr[-3000:]
    got = {r["variant"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert list(got) == list(dt.VARIANTS)
    for name, row in got.items():
        assert row["steps_measured"] == 2 and len(row["step_ms"]) == 2, row
        assert row["tokens_per_second"] > 0 and row["rows_per_second"] > 0 and 0 <= row["padding_fraction"] < 1, row
        assert row["tokens_source"] == "forward hook" and row["policy_forwards_per_step"] == 1, row
        # the hook's count (policy forwards only) is the trainer's own count of non-padding tokens
        assert row["tokens_counted"] == row["tokens_seen_by_trainer"] > 0, row
        assert len(row["losses"]) == 3 and row["rows_trained_on"] == 40 and row["peak_gpu_memory_gib"] is None, row
        assert row["trainer_args"]["max_length"] == 256 and row["trainer_args"]["loss_type"] == ["sigmoid"], row
    bare, job = got["bare"], got["job"]
    assert bare["trainer"] == "DPOTrainer"
    # the same TrainingArguments, the same batches in the same order, the same start: the same training
    assert bare["trainer_args_digest"] == job["trainer_args_digest"]
    assert (tmp_path / "bare" / "trainer_args.json").read_text() == (tmp_path / "job" / "trainer_args.json").read_text()
    assert bare["tokens_per_step"] == job["tokens_per_step"]
    assert job["losses"] == pytest.approx(bare["losses"], rel=1e-3)
    # job's side went through job.train.run: its TrainResult and its metrics file, one line a step
    assert job["job_train_run"] and job["job_result"]["steps"] == 3 and job["job_metrics_steps"] == [1, 2, 3], job
    assert Path(job["job_metrics_path"]).exists() and job["job_result"]["preference"], job
    assert job["job_data"]["format"] == "preference_messages" and job["job_data"]["rows_used"] == 40, job
    assert job["job_info"]["backend"] == "hf"

    summary = bench("summary", "--rows", str(out), cwd=tmp_path)
    assert summary.returncode == 0, summary.stderr[-3000:]
    figures = json.loads(summary.stdout)
    assert figures["job_over_bare"] > 0 and figures["same_trainer_args"] and figures["same_batches"], figures
