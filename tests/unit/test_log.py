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
