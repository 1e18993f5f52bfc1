"""Preemption: kill a real training run at a random step (SIGTERM, then SIGKILL), restart it with the same run id,
and check it resumes from its last complete checkpoint and ends with the adapter an uninterrupted run makes."""

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.smoke, pytest.mark.slow]
STEPS, EVERY = 8, 2
SHORT_RUN = [
    f"training.max_steps={STEPS}", f"training.checkpoint_every={EVERY}", "training.batch_size=4",
    "export.merged=false", "export.gguf=[]", "export.probes=[]",
]


def start(tmp_path: Path, output: str, env_extra: dict | None = None, extra: tuple[str, ...] = ()) -> subprocess.Popen:
    args = [sys.executable, "-m", "job.cli", "run", "--spec", str(REPO / "examples" / "smoke.yaml"),
            "--set", f"run.output={output}"]
    for item in [*SHORT_RUN, *extra]:
        args += ["--set", item]
    env = {**os.environ, **(env_extra or {}), "JOB_WORK_DIR": str(tmp_path / "work"), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def events_until(proc: subprocess.Popen, step: int | None = None) -> list[dict]:
    """Read events; with `step`, stop reading (leaving the process running) once that step has been logged."""
    seen = []
    for line in proc.stdout:
        event = json.loads(line)
        seen.append(event)
        if step is not None and event["event"] == "train.step" and event["step"] >= step:
            return seen
    return seen


def finish(proc: subprocess.Popen, seen: list[dict]) -> tuple[int, list[dict], str]:
    seen = seen + events_until(proc)
    stderr = proc.stderr.read()
    return proc.wait(timeout=600), seen, stderr


def adapter_tensors(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def steps_trained(events: list[dict]) -> list[int]:
    return [e["step"] for e in events if e["event"] == "train.step"]


def assert_same_adapter(got: dict, want: dict) -> None:
    import torch

    assert got.keys() == want.keys()
    for name in want:
        # Same seed, same data order, RNG states restored: only float reassociation may differ.
        assert torch.allclose(got[name], want[name], rtol=1e-3, atol=1e-5), name


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uninterrupted")
    code, events, stderr = finish(proc := start(tmp, str(tmp / "runs")), [])
    assert code == 0, stderr[-3000:]
    assert steps_trained(events) == list(range(1, STEPS + 1))
    return adapter_tensors(tmp / "runs" / "smoke"), json.loads((tmp / "runs" / "smoke" / "manifest.json").read_text())


# dataloader_workers=2 is what a GPU run uses (collation in worker processes): the interrupted run then collates in
# workers, the resumed one inline (how many processes collate may change between attempts), and the two must still
# end with the uninterrupted run's adapter.
@pytest.mark.parametrize("workers", ["auto", "2"])
def test_sigterm_checkpoints_exits_76_and_resumes_to_the_same_adapter(tmp_path, uninterrupted, workers):
    want, _ = uninterrupted
    kill_at = random.Random().randint(1, STEPS - 2)
    print(f"SIGTERM after step {kill_at}")
    output = tmp_path / "runs"
    extra = (f"training.dataloader_workers={workers}",)
    proc = start(tmp_path, str(output), extra=extra)
    seen = events_until(proc, kill_at)
    proc.send_signal(signal.SIGTERM)
    code, first, stderr = finish(proc, seen)
    assert code == 76, stderr[-3000:]
    stopped_at = steps_trained(first)[-1]
    assert stopped_at in (kill_at, kill_at + 1)  # the step under way is finished, not abandoned
    assert any(e["event"] == "train.stop_requested" for e in first)
    saved = [e for e in first if e["event"] == "checkpoint.saved"]
    assert saved[-1]["step"] == stopped_at  # SIGTERM's own checkpoint
    assert not (output / "smoke" / "manifest.json").exists()
    # The `auto` fields a run resolved are kept by its checkpoint and reused on resume, never resolved again (another
    # card could pick another batch size mid-run). Marked here, so the resumed manifest shows where they came from.
    record_path = output / "smoke" / "checkpoints" / f"step-{stopped_at:08d}" / "checkpoint.json"
    record = json.loads(record_path.read_text())
    assert record["resolved"] == uninterrupted[1]["training"]["resolved"]
    record["resolved"]["reason"] = "kept by the checkpoint"
    record_path.write_text(json.dumps(record))

    code, second, stderr = finish(start(tmp_path, str(output)), [])
    assert code == 0, stderr[-3000:]
    resumed = next(e for e in second if e["event"] == "train.resuming")
    assert resumed["step"] == stopped_at
    assert steps_trained(second) == list(range(stopped_at + 1, STEPS + 1))  # no step repeated
    # The token count goes on from the checkpoint's, and the first rate counts only this attempt's tokens.
    first_resumed = next(e for e in second if e["event"] == "train.step")
    this_attempt = first_resumed["tokens"] - next(e["tokens"] for e in first if e["event"] == "train.step" and e["step"] == stopped_at)
    assert 0 < this_attempt < first_resumed["tokens"]
    assert abs(first_resumed["tokens_per_second"] * first_resumed["elapsed_seconds"] - this_attempt) <= 0.02 * this_attempt + 1
    run_dir = output / "smoke"
    assert_same_adapter(adapter_tensors(run_dir), want)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["training"]["resumed_from_step"] == stopped_at
    assert manifest["training"]["resolved"]["reason"] == "kept by the checkpoint"
    assert not any(e["event"] == "train.auto_resolved" for e in second)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))  # the run's record has every step once
    assert not [p for p in run_dir.rglob("*") if "checkpoints" in p.parts and p.is_file()]  # cleaned up when complete


def test_a_checkpoint_that_records_a_halved_batch_resumes_with_it_and_ends_with_the_same_adapter(tmp_path, uninterrupted):
    """What a checkpoint holds after a resumed run halved its auto batch to fit a smaller card (4 x 1 became 2 x 2):
    a later resume trains on with that record, and the global batch, so the adapter, stays the uninterrupted run's."""
    want, _ = uninterrupted
    output = tmp_path / "runs"
    proc = start(tmp_path, str(output))
    seen = events_until(proc, EVERY + 1)
    proc.send_signal(signal.SIGTERM)
    code, first, stderr = finish(proc, seen)
    assert code == 76, stderr[-3000:]
    stopped_at = steps_trained(first)[-1]
    record_path = output / "smoke" / "checkpoints" / f"step-{stopped_at:08d}" / "checkpoint.json"
    record = json.loads(record_path.read_text())
    assert (record["resolved"]["batch_size"], "gradient_accumulation_steps" in record["resolved"]) == (4, False)
    record["resolved"].update(batch_size=2, gradient_accumulation_steps=2)
    record_path.write_text(json.dumps(record))

    code, second, stderr = finish(start(tmp_path, str(output)), [])
    assert code == 0, stderr[-3000:]
    started = next(e for e in second if e["event"] == "train.started")
    assert (started["batch_size"], started["gradient_accumulation_steps"]) == (2, 2)
    assert steps_trained(second) == list(range(stopped_at + 1, STEPS + 1))
    manifest = json.loads((output / "smoke" / "manifest.json").read_text())
    assert manifest["training"]["resolved"]["gradient_accumulation_steps"] == 2
    # Batches of 2 pad less than batches of 4: the same sums in another float order, which Adam's first steps
    # (updates near lr x sign) magnify in the weights (seen: at most 3.8e-5 apart), while the loss stays equal.
    import torch

    got = adapter_tensors(output / "smoke")
    assert all(torch.allclose(got[name], want[name], rtol=1e-3, atol=1e-4) for name in want)
    assert manifest["training"]["final_loss"] == pytest.approx(uninterrupted[1]["training"]["final_loss"], rel=1e-5)


def test_sigkill_resumes_from_the_last_complete_checkpoint_in_s3(tmp_path, s3_env, bucket, uninterrupted):
    want, _ = uninterrupted
    kill_at = random.Random().randint(EVERY + 1, STEPS - 1)
    print(f"SIGKILL after step {kill_at}")
    output = f"s3://{bucket}/runs"
    proc = start(tmp_path, output)
    seen = events_until(proc, kill_at)
    proc.kill()
    code, first, _ = finish(proc, seen)
    assert code == -signal.SIGKILL
    last_saved = max(e["step"] for e in first if e["event"] == "checkpoint.saved")

    code, second, stderr = finish(start(tmp_path, output), [])
    assert code == 0, stderr[-3000:]
    resumed = next(e for e in second if e["event"] == "train.resuming")
    assert resumed["step"] >= last_saved  # the newest complete checkpoint, or one that finished uploading after
    repeated = steps_trained(first)[-1] - resumed["step"]
    assert 0 <= repeated <= EVERY
    import boto3

    client = boto3.client("s3")
    body = client.get_object(Bucket=bucket, Key="runs/smoke/adapter/adapter_model.safetensors")["Body"].read()
    (tmp_path / "got" / "adapter").mkdir(parents=True)
    (tmp_path / "got" / "adapter" / "adapter_model.safetensors").write_bytes(body)
    assert_same_adapter(adapter_tensors(tmp_path / "got"), want)
    left = client.list_objects_v2(Bucket=bucket, Prefix="runs/smoke/checkpoints/").get("KeyCount", 0)
    assert left == 0


def test_a_restart_of_a_complete_run_publishes_nothing_new(tmp_path, uninterrupted):
    _, manifest = uninterrupted
    output = tmp_path / "runs"
    (output / "smoke").mkdir(parents=True)
    manifest["spec"]["run"]["output"] = str(output)  # the same spec, pointed at this test's output
    (output / "smoke" / "manifest.json").write_text(json.dumps(manifest))
    code, events, stderr = finish(start(tmp_path, str(output)), [])
    assert code == 0, stderr[-3000:]
    assert any(e["event"] == "run.already_complete" for e in events)
    assert not steps_trained(events)


def test_sigterm_before_training_exits_75_and_is_no_failure(tmp_path):
    """Outside the training loop there is nothing to checkpoint: the run ends at once with 75 (Kubernetes retries
    it), whatever retry loop or error wrapper it is in; like a preemption in the loop, it is recorded as no failure."""
    output = tmp_path / "runs"
    proc = start(tmp_path, str(output))
    seen = []
    for line in proc.stdout:
        seen.append(json.loads(line))
        if seen[-1]["event"] == "stage.started" and seen[-1].get("stage") == "fetch_model":
            break
    proc.send_signal(signal.SIGTERM)
    code, seen, stderr = finish(proc, seen)
    assert code == 75, stderr[-3000:]
    assert "stopped by SIGTERM outside the training loop" in stderr
    assert not any(e["event"] == "train.started" for e in seen)
    assert not (output / "smoke" / "manifest.json").exists() and not (output / "smoke" / "failure.json").exists()


def test_sigterm_in_the_last_step_resumes_to_the_end_without_a_step_past_it(tmp_path, uninterrupted):
    """A checkpoint of the last step, resumed: transformers would train one step past max_steps (it checks the limit
    only after a step); the rerun must take the checkpoint's adapter as the trained one and publish it."""
    want, _ = uninterrupted
    output = tmp_path / "runs"
    proc = start(tmp_path, str(output))
    seen = events_until(proc, STEPS - 1)  # logged after step 7's end: the signal lands in step 8, the last
    proc.send_signal(signal.SIGTERM)
    code, first, stderr = finish(proc, seen)
    assert code == 76, stderr[-3000:]
    assert steps_trained(first)[-1] == STEPS
    assert [e for e in first if e["event"] == "checkpoint.saved"][-1]["step"] == STEPS

    code, second, stderr = finish(start(tmp_path, str(output)), [])
    assert code == 0, stderr[-3000:]
    assert steps_trained(second) == []
    manifest = json.loads((output / "smoke" / "manifest.json").read_text())
    assert manifest["training"]["steps"] == STEPS and manifest["training"]["resumed_from_step"] == STEPS
    assert_same_adapter(adapter_tensors(output / "smoke"), want)


def test_a_resumed_run_may_turn_gradient_checkpointing_on_and_ends_with_the_same_adapter(tmp_path, uninterrupted):
    """A run preempted on one card and resumed on another with less memory: checkpointing trades memory for
    recomputation, not the math, so the checkpoint resumes with it turned on."""
    want, _ = uninterrupted
    output = tmp_path / "runs"
    proc = start(tmp_path, str(output), extra=("training.gradient_checkpointing=false",))
    seen = events_until(proc, 2)
    proc.send_signal(signal.SIGTERM)
    code, first, stderr = finish(proc, seen)
    assert code == 76, stderr[-3000:]

    code, second, stderr = finish(start(tmp_path, str(output), extra=("training.gradient_checkpointing=true",)), [])
    assert code == 0, stderr[-3000:]
    changed = next(e for e in second if e["event"] == "train.resume_changed")
    assert (changed["field"], changed["was"], changed["now"]) == ("training.gradient_checkpointing", False, True)
    assert next(e for e in second if e["event"] == "train.resuming")["step"] == steps_trained(first)[-1]
    manifest = json.loads((output / "smoke" / "manifest.json").read_text())
    assert manifest["training"]["resolved"]["gradient_checkpointing"] is True
    assert_same_adapter(adapter_tensors(output / "smoke"), want)
