"""bench/train_throughput.py on the CPU (tiny random model, job's path on the hf backend): every mode a GPU call uses
runs to its rows, so device time is never spent finding the script broken. The figures mean nothing here."""

import json
import os
import subprocess
import sys

from tests.conftest import REPO

SCRIPT = str(REPO / "bench" / "train_throughput.py")


def bench(*args, cwd):
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=cwd, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def test_the_bench_runs_its_compare_sweep_and_profile_modes_on_the_cpu(tmp_path):
    made = bench("make-model", "--shape", "tiny", "--dir", str(tmp_path / "tiny"), cwd=tmp_path)
    assert made.returncode == 0, made.stderr[-3000:]

    rows, profile = tmp_path / "rows.jsonl", tmp_path / "profile.txt"
    variants = ["bare", "default", "inline", "noautocast", "log5", "gcfreeze", "trl"]
    ran = bench("run", "--impl", "job", "--backend", "hf", "--precision", "16bit", "--shape", "tiny",
                "--model-dir", str(tmp_path / "tiny"), "--seq", "32", "--batch", "1,2", "--steps", "6", "--warmup", "1",
                "--compare", ",".join(variants), "--profile", str(profile), "--out", str(rows), cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr[-3000:]

    got = [json.loads(line) for line in rows.read_text().splitlines()]
    assert [(r["batch"], r["variant"]) for r in got] == [(b, v) for v in variants for b in (1, 2)]
    for row in got:
        assert row["tokens_per_second"] > 0 and row["steps_measured"] >= 1, row
        assert len(row["step_rates"]) == row["steps_measured"] and min(row["step_rates"]) > 0, row
        # one loss a step; log5 logs (and so records) one every 5 steps
        assert len(row["losses"]) == (2 if row["variant"] == "log5" else 6) and min(row["losses"]) > 0, row
        assert row["profiled_steps"] == 3 and row["profiled_wall_s"] > 0
        assert row["host_ops_per_step"] > 0 and row["gpu_kernels_per_step"] == 0, row  # no GPU: no kernels
        if row["variant"] != "bare":  # trl's own trainer for `trl`, job's everywhere else
            assert row["trainer"] == ("PlainSFTTrainer" if row["variant"] == "trl" else "LeanSFTTrainer"), row
        assert len(row["gc_collections"]) == 3 and row["gc_ms_per_step"] >= 0 and row["gc_tracked_objects"] > 0, row
        phases = {k for k in row if k.startswith("host_ms_")}
        assert "host_ms_forward_backward" in phases and ("host_ms_optimizer" in phases) == (row["variant"] == "bare")
        # the training thread's CPU time for each of steps 2..6, whatever the logging interval
        assert len(row["cpu_ms_steps"]) == 5 and row["cpu_ms_per_step"] > 0, row
        assert 0 <= row["steal_fraction"] <= 1, row
        walks = row["module_walk_ms"]  # one walk of the module tree, as transformers' loop does three times a step
        assert walks["modules"] > 10 and min(walks["train"], walks["zero_grad"], walks["parameters"]) > 0, walks
        for probe in row["host_probe_before"], row["host_probe_after"]:
            assert probe["python_loop_ms"] > 0 and probe["cpus_allowed"] >= 1 and "launch_us" not in probe, probe
    assert all(r["steps_measured"] == 5 for r in got if r["variant"] != "log5")  # steps 2..6 after 1 warm-up
    assert profile.read_text().count('"profiled_steps": 3') == len(got)


def test_the_bare_loop_may_only_come_first_in_a_comparison(tmp_path):
    refused = bench("run", "--impl", "job", "--backend", "hf", "--precision", "16bit", "--model-dir", str(tmp_path),
                    "--compare", "default,bare", cwd=tmp_path)
    assert refused.returncode != 0 and "'bare' may come only first" in refused.stderr


def test_the_interleaved_comparison_and_the_step_factors_run_on_the_cpu(tmp_path):
    """`--variant interleaved` (bare blocks between job's steps in one process) and bench/step_factors.py, the two
    comparisons inside one process, where a host whose speed drifts slows both paths alike: each row carries both
    paths' figures."""
    made = bench("make-model", "--shape", "tiny", "--dir", str(tmp_path / "tiny"), cwd=tmp_path)
    assert made.returncode == 0, made.stderr[-3000:]
    rows = tmp_path / "rows.jsonl"
    ran = bench("run", "--impl", "job", "--backend", "hf", "--precision", "16bit", "--shape", "tiny",
                "--model-dir", str(tmp_path / "tiny"), "--seq", "32", "--batch", "2", "--steps", "12", "--warmup", "4",
                "--variant", "interleaved", "--out", str(rows), cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr[-3000:]
    row = json.loads(rows.read_text())
    # job's steps 4..11 measured, and a bare block of 4 after each 4 of them (steps 7 and 11)
    assert row["steps_measured"] == 8 and len(row["bare_step_rates"]) == 8, row
    assert row["job_step_ms"] > 0 and row["bare_step_ms"] > 0 and row["bare_tokens_per_second"] > 0, row
    assert row["process_cpu_ms_per_step"] >= row["cpu_ms_per_step"] > 0, row

    factors = tmp_path / "factors.jsonl"
    ran = subprocess.run([sys.executable, str(REPO / "bench" / "step_factors.py"), "--model-dir", str(tmp_path / "tiny"),
                          "--shape", "tiny", "--seq", "32", "--rounds", "2", "--block", "2", "--out", str(factors)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert ran.returncode == 0, ran.stderr[-3000:]
    got = [json.loads(line) for line in factors.read_text().splitlines()]
    assert [r["variant"] for r in got] == ["plain", "autocast", "mask", "pinned", "trainer"]
    assert all(r["steps_measured"] == 2 and r["wall_ms_per_step"] > 0 and r["cpu_ms_per_step"] > 0 for r in got), got
