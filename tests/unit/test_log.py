import io
import json

from job import log

STEP = {"step": 5, "max_steps": 20, "loss": 1.23456, "tokens_per_second": 1234.5, "eta_seconds": 95.0, "epoch": 0.5}


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_terminal_gets_a_progress_line_with_eta():
    stream = Terminal()
    log.setup(stream=stream)
    log.get().info("train.step", **STEP)
    line = stream.getvalue()
    for part in ("step 5/20", "loss 1.2346", "1,234 tok/s", "ETA 1:35"):
        assert part in line, line
    assert "epoch" not in line


def test_json_logs_keep_the_whole_event():
    stream = io.StringIO()
    log.setup(stream=stream)
    log.get().info("train.step", **STEP)
    event = json.loads(stream.getvalue())
    assert event["event"] == "train.step"
    assert {k: event[k] for k in STEP} == STEP


def test_unknown_eta_and_hours():
    assert log.progress_line(None, "info", {"event": "train.step", "step": 1, "max_steps": -1})["event"] == "step 1  ETA -"
    assert "ETA 1:01:05" in log.progress_line(None, "info", {"event": "train.step", "step": 1, "eta_seconds": 3665})["event"]


def test_a_terminal_gets_one_line_per_artifact_made_checked_or_sent():
    line = lambda **event: log.progress_line(None, "info", event)["event"]  # noqa: E731
    assert line(event="export.gguf.quantize.finished", type="q4_k_m", bytes=4_920_734_144, seconds=42.85) == \
        "made     gguf/q4_k_m  4.9 GB  43 s"
    assert line(event="verify.artifact.checked", artifact="merged", seconds=8.77, parts={}) == "checked  merged  9 s"
    assert line(event="publish.early_upload", path="adapter/adapter_model.safetensors", bytes=2_500_000, seconds=0.4) \
        == "sent     adapter/adapter_model.safetensors  2.5 MB  0 s"
    assert line(event="stage.started") == "stage.started"
