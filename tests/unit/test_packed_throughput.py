"""bench/packed_throughput.py on the CPU: its pure parts (row lengths, statistics, the profile's reduction, the rates,
job's events) and every variant end to end on a tiny model with transformers + peft (`--backend hf`), so a GPU call
never finds the script broken. The figures mean nothing here."""

import importlib.util
import io
import json
import os
import random
import subprocess
import sys

import pytest

from tests.conftest import REPO

SCRIPT = REPO / "bench" / "packed_throughput.py"


def _module():
    spec = importlib.util.spec_from_file_location("packed_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pt = _module()


def test_row_lengths_look_like_finetome_and_rows_render_as_jobs_chatml_template():
    lengths = pt.target_lengths(5000, random.Random(0))
    stats = pt.length_stats(lengths)
    assert 280 <= stats["median"] <= 380 and stats["p90"] > 2 * stats["median"], stats
    assert stats["max"] <= 2200 and 0 < stats["over_seq"] < 0.03 * len(lengths), stats

    words = pt.corpus_words()
    assert len(words) > 1000 and all(w.isascii() for w in words)
    rows = [{"conversations": pt.conversation(random.Random(i), words, 300, 1.3)} for i in range(200)]
    assert all(r["conversations"][0]["from"] == "human" and r["conversations"][-1]["from"] == "gpt" for r in rows)
    assert any(len(r["conversations"]) > 2 for r in rows)  # some multi-turn

    import jinja2

    from job.chat_templates import NAMED

    template = jinja2.Environment().from_string(NAMED["chatml"])
    for row in rows[:5]:
        assert pt.chatml(row) == template.render(messages=pt.messages(row), add_generation_prompt=False)


def test_the_profile_reduction_names_attention_kernels_sdpa_ops_and_syncs():
    records = [
        {"name": "sm90_xmma_gemm_bf16bf16", "cuda": True, "self_us": 9000.0, "count": 448},
        {"name": "cudnn_generated_fort_native_sdpa_sm90_flash_fprop", "cuda": True, "self_us": 3000.0, "count": 32},
        {"name": "void at::native::vectorized_elementwise_kernel", "cuda": True, "self_us": 500.0, "count": 900},
        {"name": "aten::_scaled_dot_product_cudnn_attention", "cuda": False, "self_us": 100.0, "count": 32},
        {"name": "aten::scaled_dot_product_attention", "cuda": False, "self_us": 50.0, "count": 32},
        {"name": "cudaStreamSynchronize", "cuda": False, "self_us": 10.0, "count": 3},
        {"name": "Torch-Compiled Region: 0/1", "cuda": False, "self_us": 10.0, "count": 64},
        {"name": "aten::mm", "cuda": False, "self_us": 10.0, "count": 448},
    ]
    spans = [(0, 10_000), (5_000, 12_000), (20_000, 21_000)]  # 13 ms covered
    got = pt.summarize_profile(records, spans, wall_ms=26.0, top=2)
    assert got["gpu_busy_ms"] == 13.0 and got["gpu_busy_fraction"] == 0.5
    assert [k["name"] for k in got["top_kernels"]] == ["sm90_xmma_gemm_bf16bf16", "cudnn_generated_fort_native_sdpa_sm90_flash_fprop"]
    assert got["kernel_launches"] == 448 + 32 + 900 and got["gpu_kernel_ms"] == 12.5
    assert got["attention_kernel_found"] and got["attention_kernel_ms"] == 3.0
    assert set(got["attention_kernel_marks"]) == {"cudnn", "sdpa", "flash"}
    assert got["sdpa_ops"] == {"aten::_scaled_dot_product_cudnn_attention": 32, "aten::scaled_dot_product_attention": 32}
    assert got["sync_calls"] == {"cudaStreamSynchronize": 3} and got["compiled_region_calls"] == 64
    json.dumps(got)  # one JSON line

    none = pt.summarize_profile([r for r in records if not r["cuda"]], [], wall_ms=5.0)
    assert not none["attention_kernel_found"] and none["gpu_busy_fraction"] is None and none["top_kernels"] == []


def test_step_figures_time_each_step_from_the_previous_end_and_count_real_tokens():
    ends = {0: 0.0, 1: 1.0, 2: 1.5, 3: 2.5}
    begins = {0: -0.5, 1: 0.1, 2: 1.05, 3: 1.6}
    tokens = {0: 100, 1: 1000, 2: 1000, 3: 2000}
    docs = {1: 6, 2: 8, 3: 10}
    got = pt.step_figures(begins, ends, tokens, docs, warmup=1, steps=4, rows_per_step=2, seq=1000)
    assert got["steps_measured"] == 3 and got["step_ms"] == [1000, 500, 1000]
    assert got["tokens_per_second"] == 2000.0  # median of 1000, 2000, 2000
    assert got["tokens_per_second_overall"] == 1600.0 and got["fill_fraction"] == round(4000 / 6000, 4)
    assert got["docs_per_sequence"] == 4.0 and got["host_gap_ms_median"] == 100.0
    assert pt.step_figures({}, {}, {}, {}, 1, 4, 2, 1000) == {"steps_measured": 0}


def test_the_profiled_step_is_left_out_past_its_deadline():
    probe = pt.StepProbe(warmup=1, steps=3, deadline_s=1e-6)
    probe.begin(3)
    assert probe.prof is None and "skipped" in probe.profile and 3 in probe.begins


def test_jobs_events_are_kept_from_its_stdout_and_its_arguments_fix_the_settings():
    real = io.StringIO()
    tee = pt.EventTee(real)
    with pytest.raises(io.UnsupportedOperation):
        tee.fileno()  # so job writes its events here, not to a copy of descriptor 1
    lines = [{"event": "train.started", "backend": "unsloth", "batch_size": 4, "precision": "fp8"}] + \
        [{"event": "train.step", "step": s, "tokens_per_second": 1000.0 * s} for s in range(1, 6)] + \
        [{"event": "train.finished", "tokens_per_second": 3000.0, "steps": 5}]
    text = "".join(json.dumps(line) + "\n" for line in lines) + "not json\n"
    tee.write(text[:17])
    tee.write(text[17:])
    assert real.getvalue() == text and len(tee.events) == len(lines)
    got = pt.job_events(tee.events, warmup=2, steps=4)
    assert got["job_step_rates"] == [3000, 4000] and got["job_tokens_per_second_logged"] == 3500.0
    assert got["job_train_started"]["precision"] == "fp8" and got["job_failed"] is None

    class Args:
        model_dir, rows, work, steps, seq, grad_accum = "/m", "/r.jsonl", "/w", 20, 2048, 1
        precision, batch, checkpointing, job_auto, backend = "fp8", 4, 0, False, "unsloth"

    argv = pt.job_arguments(Args, "run-1")
    sets = dict(argv[i + 1].split("=", 1) for i, a in enumerate(argv) if a == "--set")
    assert argv[:3] == ["run", "--spec", str(REPO / "examples" / "finetome-llama31-8b-chatml.yaml")]
    assert sets["training.max_steps"] == "21" and sets["model.precision"] == "fp8" and sets["export.gguf"] == "[]"
    assert sets["training.gradient_checkpointing"] == "false" and sets["training.batch_size"] == "4"


def bench(*args, cwd):
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"})


def test_every_variant_runs_on_a_tiny_model_on_the_cpu(tmp_path):
    made = bench("make-tiny", "--dir", str(tmp_path / "tiny"), cwd=tmp_path)
    assert made.returncode == 0, made.stderr[-3000:]
    rows = tmp_path / "rows.jsonl"
    made = bench("make-rows", "--out", str(rows), "--rows", "200", "--tokenizer", str(tmp_path / "tiny"),
                 "--median-tokens", "60", cwd=tmp_path)
    assert made.returncode == 0, made.stderr[-3000:]
    stats = json.loads((tmp_path / "rows.jsonl.stats.json").read_text())
    assert stats["rows"] == 200 and stats["median"] > 40 and stats["multi_turn_rows"] > 0, stats

    out = tmp_path / "packed.jsonl"
    for variant in pt.VARIANTS:
        ran = bench("run", "--variant", variant, "--backend", "hf", "--precision", "16bit", "--model-dir",
                    str(tmp_path / "tiny"), "--rows", str(rows), "--seq", "256", "--batch", "2", "--steps", "3",
                    "--warmup", "1", "--work", str(tmp_path / variant), "--profile-table", str(tmp_path / f"{variant}.txt"),
                    "--out", str(out), cwd=tmp_path)
        assert ran.returncode == 0, ran.stderr[-3000:]
    got = {r["variant"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert list(got) == list(pt.VARIANTS)
    for name, row in got.items():
        assert row["steps_measured"] == 2 and row["tokens_per_second"] > 0 and len(row["step_ms"]) == 2, row
        assert 0 < row["fill_fraction"] <= 1 and row["attn_implementation"] == "sdpa", row
        profile = row["profile"]  # the step after the measured ones; no GPU, so no kernels
        assert profile["host_ops"] > 0 and profile["kernel_launches"] == 0 and profile["sdpa_ops"], profile
        assert (tmp_path / f"{name}.txt").read_text().startswith("{")
    for name in ("bare-packed", "job-packed"):  # rows of ~60 tokens, several to a 256-token sequence
        row = got[name]
        assert row["packing"] and row["padding_free"] and row["packing_strategy"] == "bfd", row
        assert row["docs_per_sequence"] > 1.5 and row["dataset_docs_per_sequence"] > 1.5 and row["fill_fraction"] > 0.5, row
    assert got["bare-fixed"]["fill_fraction"] == 1.0 and got["bare-fixed"]["docs_per_sequence"] == 1.0
    assert not got["bare-fixed"]["packing"] and not got["bare-fixed"]["padding_free"]
    job = got["job-packed"]
    assert job["job_exit"] == 0 and job["job_failed"] is None and len(job["job_step_rates"]) == 2, job
    assert job["job_train_started"]["batch_size"] == 2 and job["job_data"]["rows_used"] == 200, job
    # the same rows packed alike by the bare trainer and by job's
    assert job["packed_rows"] == got["bare-packed"]["packed_rows"]
