"""`job run`'s closing summary names only what was published."""

from job.cli.run import summary
from job.pipeline import RunResult


def manifest(files, gguf_types):
    return {"files": [{"path": p, "bytes": 1, "sha256": "0"} for p in files],
            "training": {"first_loss": 2.0, "final_loss": 1.0, "steps": 2, "backend": "hf", "precision": "16bit",
                         "seconds": 1},
            "export": {"gguf_types": gguf_types}, "verification": {}, "probes": []}


def test_the_summary_lists_merged_weights_only_when_they_were_published():
    adapter_only = summary(RunResult("r", "runs/r", manifest(["adapter/adapter_model.safetensors", "README.md"], [])))
    assert "artifacts: adapter/\n" in adapter_only + "\n" and "merged/" not in adapter_only
    everything = summary(RunResult("r", "runs/r", manifest(
        ["adapter/a.safetensors", "merged/model.safetensors", "gguf/r.Q8_0.gguf"], ["q8_0"])))
    assert "artifacts: adapter/, merged/, gguf/ q8_0" in everything
