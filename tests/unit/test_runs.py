import hashlib
import json

import pytest
from click.testing import CliRunner

from job import publish, runs
from job.cli.main import main
from job.spec import Spec
from job.storage import S3Settings, open_location


def spec_dict(run_id: str, **data) -> dict:
    return Spec.model_validate({
        "run": {"id": run_id}, "model": {"name": "HuggingFaceTB/SmolLM2-135M-Instruct"},
        "data": {"source": "s3://data/rows.jsonl", **data},
        "lora": {"r": 8}, "training": {"learning_rate": 1e-3, "batch_size": 4, "gradient_accumulation_steps": 2},
    }).masked()


def lines(*records) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def write_runs(location: str, tmp_path) -> None:
    """One complete run (through the real publisher), one with checkpoints only, one failed: the layouts `job run`
    leaves behind."""
    store = open_location(location, S3Settings())
    staging = tmp_path / "staging"
    (staging / "adapter").mkdir(parents=True)
    (staging / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
    (staging / "gguf").mkdir()
    (staging / "gguf" / "done-q8_0.gguf").write_bytes(b"GGUF")
    (staging / "loss.png").write_bytes(b"\x89PNG")
    (staging / "metrics.jsonl").write_bytes(lines({"step": 1, "loss": 2.5}, {"step": 2, "eval_loss": 2.4},
                                                  {"step": 2, "loss": 1.25}, {"step": 3, "eval_loss": 1.5}))
    body = {"status": "complete", "spec": spec_dict("done", eval_split=0.1),
            "training": {"steps": 2, "first_loss": 2.5, "final_loss": 1.25, "backend": "hf", "precision": "16bit"},
            "data": {"source": "s3://data/rows.jsonl", "format": "alpaca", "rows_used": 10},
            "export": {"gguf_types": ["q8_0"]},
            "probes": [{"prompt": "What is your name?", "base": "I am SmolLM.", "adapter": "I am Quill."}],
            "verification": {"artifacts": [
                {"artifact": "gguf/q8_0", "reference": "the merged weights (PyTorch)", "mean_kld": 0.0017,
                 "same_top_rate": 0.988, "threshold": {"max_mean_kld": 0.02, "min_same_top_rate": 0.93},
                 "verdict": "pass", "problems": []}]}}
    publish.publish(staging, store, "done", body)

    for step, loss in ((10, 1.9), (20, 1.7)):
        folder = f"midway/checkpoints/step-{step:08d}"
        store.put_bytes(f"{folder}/adapter_model.safetensors", b"weights")
        store.put_bytes(f"{folder}/checkpoint.json", json.dumps(
            {"step": step, "loss": loss, "spec": spec_dict("midway"), "files": []}).encode())
    # A checkpoint cut off before its record: never counted.
    store.put_bytes("midway/checkpoints/step-00000030/adapter_model.safetensors", b"half")

    store.put_bytes("broken/checkpoints/step-00000005/checkpoint.json", json.dumps({"step": 5, "files": []}).encode())
    store.put_bytes("broken/checkpoints/step-00000005/metrics.jsonl", lines({"step": 5, "loss": 3.0}))
    store.put_bytes("broken/spec.yaml", b"model: {name: meta-llama/Llama-3.2-1B}\nlora: {r: 32}\n")
    store.put_bytes("broken/failure.json", json.dumps({
        "status": "failed", "error": "data", "message": "row 7: the chat template drops the assistant turn's text",
        "exit_code": 2, "stage": "load_data", "time": "2026-11-25T12:00:00Z"}).encode())


def check_listing(found: list[runs.Run]) -> None:
    by_id = {run.run_id: run for run in found}
    assert sorted(by_id) == ["broken", "done", "midway"]

    done = by_id["done"]
    assert done.status == "complete" and done.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert (done.steps, done.train_loss, done.eval_loss) == (2, 1.25, 1.5)
    assert done.hyperparameters["lr"] == 1e-3 and done.hyperparameters["r"] == 8 and done.hyperparameters["batch"] == 4
    assert done.artifacts == ["adapter", "gguf:q8_0", "loss.png"]

    midway = by_id["midway"]
    assert midway.status == "incomplete" and midway.checkpoints == [10, 20]
    assert (midway.steps, midway.train_loss) == (20, 1.7) and midway.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"

    broken = by_id["broken"]
    assert broken.status == "failed" and broken.failure["stage"] == "load_data"
    assert (broken.steps, broken.train_loss) == (5, 3.0)  # from the checkpoint's own metrics
    assert broken.base_model == "meta-llama/Llama-3.2-1B" and broken.hyperparameters == {"r": 32}


def test_lists_complete_incomplete_and_failed_runs_on_s3(tmp_path, bucket):
    location = f"s3://{bucket}/team/runs"
    write_runs(location, tmp_path)
    check_listing(runs.list_runs(location, S3Settings()))

    result = CliRunner().invoke(main, ["runs", "list", location, "--json"])
    assert result.exit_code == 0, result.output
    listed = {r["run_id"]: r for r in json.loads(result.output)}
    assert {k: r["status"] for k, r in listed.items()} == {"broken": "failed", "done": "complete", "midway": "incomplete"}
    assert listed["done"]["eval_loss"] == 1.5 and "manifest" not in listed["done"]

    table = CliRunner().invoke(main, ["runs", "list", location]).output.splitlines()
    assert table[0].split()[:3] == ["RUN", "STATUS", "MODEL"]
    row = {line.split()[0]: line for line in table[1:]}
    assert row["done"].split()[1:9] == ["complete", "HuggingFaceTB/SmolLM2-135M-Instruct", "0.001", "8", "4x2", "2",
                                        "1.2500", "1.5000"]
    assert "data in load_data (exit 2): row 7" in row["broken"]
    assert "checkpoints/step-00000020 2 checkpoint(s)" in row["midway"]


def test_show_prints_the_manifest_summary_and_probe_answers(tmp_path, bucket):
    location = f"s3://{bucket}/runs"
    write_runs(location, tmp_path)
    result = CliRunner().invoke(main, ["runs", "show", f"{location}/done"])
    assert result.exit_code == 0, result.output
    assert "run done: complete" in result.output
    assert "Q: What is your name?" in result.output and "adapter: I am Quill." in result.output
    assert "gguf/q8_0" in result.output and "1.70e-03" in result.output and "98.8%" in result.output

    result = CliRunner().invoke(main, ["runs", "show", location, "broken", "--json"])
    shown = json.loads(result.output)
    assert shown["status"] == "failed" and shown["failure"]["exit_code"] == 2

    result = CliRunner().invoke(main, ["runs", "show", location, "no-such-run"])
    assert result.exit_code == 3 and "no run 'no-such-run'" in result.output


def test_a_local_output_directory(tmp_path):
    location = tmp_path / "runs"
    write_runs(str(location), tmp_path)
    check_listing(runs.list_runs(str(location), S3Settings()))
    shown = CliRunner().invoke(main, ["runs", "show", str(location), "midway"])
    assert "run midway: incomplete" in shown.output and "checkpoints: 2, latest at step 20" in shown.output


@pytest.mark.parametrize("args", [["runs", "list", "/no/such/dir"], ["runs", "show", "/no/such/dir/run-1"]])
def test_missing_location_is_not_found(args):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 3 and "/no/such/dir" in result.output


def test_empty_bucket_lists_nothing(bucket):
    assert runs.list_runs(f"s3://{bucket}", S3Settings()) == []
    result = CliRunner().invoke(main, ["runs", "list", f"s3://{bucket}"])
    assert result.exit_code == 0 and "no runs under" in result.output


def test_listing_one_runs_folder_says_to_show_it_instead(tmp_path):
    write_runs(str(tmp_path / "out"), tmp_path)
    result = CliRunner().invoke(main, ["runs", "list", str(tmp_path / "out" / "done")])
    assert result.exit_code == 2 and "is one run's folder" in result.output and "job runs show" in result.output


PREFERENCE = {"rewards/chosen": 0.42, "rewards/rejected": -0.39, "rewards/accuracies": 0.875,
              "rewards/margins": 0.8123, "logps/chosen": -85.3125, "logps/rejected": -97.25}


def write_chained_run(location: str, tmp_path) -> dict:
    """A DPO run chained from `done` (through the real publisher), its lineage naming done's stored manifest."""
    store = open_location(location, S3Settings())
    parent_manifest = store.read_bytes("done/manifest.json")
    parent = {"run_id": "done", "uri": f"{store.uri}/done", "manifest": f"{store.uri}/done/manifest.json",
              "manifest_sha256": hashlib.sha256(parent_manifest).hexdigest(), "method": "sft"}
    staging = tmp_path / "staging-dpo"
    (staging / "adapter").mkdir(parents=True)
    (staging / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
    spec = spec_dict("dpo-1")
    spec["training"]["method"] = "dpo"
    body = {"status": "complete", "spec": spec,
            "training": {"steps": 4, "first_loss": 0.6931, "final_loss": 0.41, "backend": "hf", "precision": "16bit",
                         "method": "dpo", "preference": PREFERENCE},
            "lineage": {"parent": parent},
            "data": {"source": "s3://data/pairs.jsonl", "format": "preference", "rows_used": 8}}
    publish.publish(staging, store, "dpo-1", body)
    return parent


def test_show_prints_the_method_preference_metrics_and_parent_of_a_chained_run(tmp_path, bucket):
    location = f"s3://{bucket}/runs"
    write_runs(location, tmp_path)
    parent = write_chained_run(location, tmp_path)

    result = CliRunner().invoke(main, ["runs", "show", f"{location}/dpo-1"])
    assert result.exit_code == 0, result.output
    shown = result.output.splitlines()
    assert "  method: dpo" in shown
    preference = next(line for line in shown if line.startswith("  preference (last logged step): "))
    assert "rewards/margins 0.8123" in preference and "rewards/accuracies 0.875" in preference
    assert "logps/chosen -85.31" in preference and "logps/rejected -97.25" in preference
    assert f"  parent run: done (sft) · {location}/done" in shown
    assert f"    manifest {location}/done/manifest.json · sha256 {parent['manifest_sha256']}" in shown

    as_json = json.loads(CliRunner().invoke(main, ["runs", "show", f"{location}/dpo-1", "--json"]).output)
    assert as_json["manifest"]["lineage"]["parent"] == parent
    assert as_json["manifest"]["training"]["preference"] == PREFERENCE

    # The listing is unchanged by a preference run: one more complete row.
    listed = {r.run_id: r for r in runs.list_runs(location, S3Settings())}
    assert listed["dpo-1"].status == "complete" and listed["dpo-1"].train_loss == 0.41


def test_show_of_a_run_without_method_or_lineage_adds_nothing(tmp_path):
    location = str(tmp_path / "runs")
    write_runs(location, tmp_path)
    output = CliRunner().invoke(main, ["runs", "show", location, "done"]).output
    assert "run done: complete" in output and "training: hf 16bit" in output
    assert "method:" not in output and "preference" not in output and "parent run" not in output
