"""Evaluation and trackers for real: a held-out split evaluated every 4 steps and at the last (6), TensorBoard files
published with the run, MLflow writing to a local file store, wandb in offline mode; the loss curve carries the eval
points. The last evaluation, off the every-4 grid, must reach every tracker in the same run as the others."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.smoke, pytest.mark.slow]


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tracked")
    args = [sys.executable, "-m", "job.cli", "run", "--spec", str(REPO / "examples" / "smoke.yaml")]
    for item in (f"run.output={tmp / 'runs'}", "training.max_steps=6", "training.batch_size=4", "data.eval_split=0.25",
                 "training.eval_every=4", "logging.report_to=[tensorboard, mlflow, wandb]", "export.merged=false",
                 "export.gguf=[]", "export.probes=[]"):
        args += ["--set", item]
    env = {**os.environ, "JOB_WORK_DIR": str(tmp / "work"), "PYTHONUNBUFFERED": "1",
           # the trackers' own settings, as a user sets them in the pod's env
           "MLFLOW_TRACKING_URI": (tmp / "mlruns").as_uri(), "MLFLOW_EXPERIMENT_NAME": "job-test",
           "MLFLOW_ALLOW_FILE_STORE": "true",
           "WANDB_MODE": "offline", "WANDB_DIR": str(tmp / "wandb"), "WANDB_PROJECT": "job-test"}
    proc = subprocess.run(args, cwd=tmp, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    return tmp, events, json.loads((tmp / "runs" / "smoke" / "manifest.json").read_text())


def test_eval_loss_every_four_steps_and_at_the_last_and_in_the_manifest(tracked_run):
    _, events, manifest = tracked_run
    evals = [e for e in events if e["event"] == "train.eval"]
    assert [e["step"] for e in evals] == [4, 6]
    assert manifest["training"]["final_eval_loss"] == evals[-1]["eval_loss"]
    assert manifest["data"]["eval"]["rows"] == 6  # 25% of the 24 identity rows held out
    assert manifest["data"]["rows_used"] == 24 and evals[-1]["eval_loss"] < evals[0]["eval_loss"]


def test_tensorboard_event_files_are_published_with_the_scalars(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tmp, _, manifest = tracked_run
    published = [f["path"] for f in manifest["files"] if f["path"].startswith("tensorboard/")]
    assert published
    scalars = EventAccumulator(str(tmp / "runs" / "smoke" / "tensorboard")).Reload()
    tags = scalars.Tags()["scalars"]
    assert "train/loss" in tags and "eval/loss" in tags
    assert len(scalars.Scalars("train/loss")) == 6
    assert [s.step for s in scalars.Scalars("eval/loss")] == [4, 6]


def test_mlflow_file_store_has_the_run_with_its_metrics(tracked_run, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    tmp, _, _ = tracked_run
    client = MlflowClient(tracking_uri=(tmp / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("job-test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert {"loss", "eval_loss"} <= set(run.data.metrics)
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 6
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval_loss")] == [4, 6]


def test_wandb_offline_run_is_written(tracked_run):
    tmp, _, _ = tracked_run
    runs = list((tmp / "wandb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_loss_curve_png_is_published_and_in_the_model_card(tracked_run):
    tmp, _, manifest = tracked_run
    assert "loss.png" in {f["path"] for f in manifest["files"]}
    assert (tmp / "runs" / "smoke" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![loss](loss.png)" in (tmp / "runs" / "smoke" / "README.md").read_text()
