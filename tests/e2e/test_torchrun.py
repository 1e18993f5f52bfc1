"""Data parallel on the CPU: JOB_NPROC=2 starts two processes through torchrun (gloo), each with batch 2; the
losses match one process with batch 4 (the same global batch), and only rank 0 logs, checkpoints and publishes."""

import json
import os
import subprocess
import sys

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
