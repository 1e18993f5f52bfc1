"""Data parallel on the CPU: JOB_NPROC=2 starts two processes through torchrun (gloo), each with batch 2; the
losses match one process with batch 4 (the same global batch), and only rank 0 logs, checkpoints and publishes.
A SIGTERM that reaches one rank alone (its node is preempted, the other's is not) stops both after the same step."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.smoke, pytest.mark.slow]
STEPS = 6
COMMON = [f"training.max_steps={STEPS}", "training.checkpoint_every=3", "export.merged=false", "export.gguf=[]",
          "export.probes=[]"]


def run(tmp_path, name, batch, env_extra):
    args = [sys.executable, "-m", "job.cli", "run", "--spec", str(REPO / "examples" / "smoke.yaml"),
            "--set", f"run.output={tmp_path / name}", "--set", f"training.batch_size={batch}"]
    for item in COMMON:
        args += ["--set", item]
    env = {**os.environ, **env_extra, "JOB_WORK_DIR": str(tmp_path / f"work-{name}"), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    manifest = json.loads((tmp_path / name / "smoke" / "manifest.json").read_text())
    return events, manifest


def losses(events):
    return [e["loss"] for e in events if e["event"] == "train.step"]


def test_two_processes_match_one_with_the_same_global_batch_and_only_rank_0_publishes(tmp_path):
    single_events, single = run(tmp_path, "single", 4, {})
    ddp_events, ddp = run(tmp_path, "ddp", 2, {"JOB_NPROC": "2"})

    assert ddp["training"]["world_size"] == 2 and single["training"]["world_size"] == 1
    # accelerate hands consecutive per-process batches of one seeded order to the ranks, so each global batch holds
    # the same rows as the single process's; only the order of float additions differs.
    assert len(losses(ddp_events)) == STEPS
    assert losses(ddp_events) == pytest.approx(losses(single_events), rel=1e-4)
    assert ddp["training"]["final_loss"] == pytest.approx(single["training"]["final_loss"], rel=1e-4)

    # Rank 0 is the log of record: the other rank logs warnings and errors only.
    assert {e.get("rank") for e in ddp_events if e["level"] == "info"} == {0}
    assert sum(e["event"] == "publish.finished" for e in ddp_events) == 1
    assert [e["step"] for e in ddp_events if e["event"] == "checkpoint.saved"] == [3]
    assert not (tmp_path / "ddp" / "smoke" / "checkpoints").exists() or not any(
        p.is_file() for p in (tmp_path / "ddp" / "smoke" / "checkpoints").rglob("*"))


def worker_pids(parent: int) -> dict[int, int]:
    """rank → pid of the torchrun workers started by `parent`."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid != parent:
                continue
            env = dict(item.split("=", 1) for item in (entry / "environ").read_text().split("\0") if "=" in item)
        except (OSError, ValueError, IndexError):
            continue
        if "RANK" in env:
            found[int(env["RANK"])] = int(entry.name)
    return found


def test_sigterm_to_one_rank_stops_every_rank_after_the_same_step_and_the_run_resumes(tmp_path):
    output = tmp_path / "runs"
    args = [sys.executable, "-m", "job.cli", "run", "--spec", str(REPO / "examples" / "smoke.yaml"),
            "--set", f"run.output={output}", "--set", "training.batch_size=2", "--set", "training.max_steps=8",
            "--set", "export.merged=false", "--set", "export.gguf=[]", "--set", "export.probes=[]"]
    env = {**os.environ, "JOB_NPROC": "2", "JOB_WORK_DIR": str(tmp_path / "work"), "PYTHONUNBUFFERED": "1"}

    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = []
    for line in proc.stdout:
        first.append(json.loads(line))
        if first[-1]["event"] == "train.step" and first[-1]["step"] >= 2:
            break
    workers = worker_pids(proc.pid)
    assert set(workers) == {0, 1}
    os.kill(workers[1], signal.SIGTERM)  # rank 1 alone
    first += [json.loads(line) for line in proc.stdout]
    stderr = proc.stderr.read()
    assert proc.wait(timeout=600) == 76, stderr[-3000:]

    stops = [e for e in first if e["event"] == "train.stop_requested"]
    assert {e["rank"] for e in stops} == {0, 1}
    stopped_at = stops[0]["step"]
    assert {e["step"] for e in stops} == {stopped_at}
    assert [e["step"] for e in first if e["event"] == "checkpoint.saved"] == [stopped_at]  # rank 0's, once
    assert not (output / "smoke" / "manifest.json").exists()

    again = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert again.returncode == 0, (again.stdout[-4000:], again.stderr[-3000:])
    second = [json.loads(line) for line in again.stdout.splitlines()]
    assert next(e for e in second if e["event"] == "train.resuming")["step"] == stopped_at
    assert losses(second) and [e["step"] for e in second if e["event"] == "train.step"] == list(range(stopped_at + 1, 9))
    manifest = json.loads((output / "smoke" / "manifest.json").read_text())
    assert manifest["training"]["world_size"] == 2 and manifest["training"]["resumed_from_step"] == stopped_at


def test_a_failure_on_one_rank_ends_the_run_and_its_own_record_says_where(tmp_path):
    output, work = tmp_path / "runs", tmp_path / "work"
    (work / "smoke").mkdir(parents=True)
    (work / "smoke" / "rank-1").write_text("a file where rank 1's work folder goes")  # rank 1 alone cannot start
    args = [sys.executable, "-m", "job.cli", "run", "--spec", str(REPO / "examples" / "smoke.yaml"),
            "--set", f"run.output={output}", "--set", "training.batch_size=2"]
    for item in COMMON:
        args += ["--set", item]
    env = {**os.environ, "JOB_NPROC": "2", "JOB_WORK_DIR": str(work), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 1, proc.stderr[-3000:]  # rank 1's code: a bug (an unexpected exception)
    failure = json.loads((output / "smoke" / "failure.json").read_text())
    assert (failure["rank"], failure["error"], failure["exit_code"]) == (1, "bug", 1), failure
    assert "rank-1" in failure["message"]
    assert not (output / "smoke" / "manifest.json").exists()
