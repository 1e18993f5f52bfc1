"""A run sends nothing to the Hub its user did not ask for: trl's trainer telemetry and huggingface_hub's caller
registry stay off unless HF_HUB_DISABLE_TELEMETRY=0. The Hub is a recording HTTP server on 127.0.0.1 (HF_ENDPOINT);
the smoke model is local, so a request there is one a library made on its own."""

import http.server
import os
import subprocess
import sys
import threading

import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.smoke, pytest.mark.slow]


@pytest.fixture
def hub():
    seen = []

    class Recorder(http.server.BaseHTTPRequestHandler):
        def answer(self):
            seen.append((self.command, self.path))
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_HEAD = do_POST = answer

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", seen
    server.shutdown()


@pytest.mark.parametrize("telemetry", [None, "0"], ids=["default", "allowed"])
def test_a_run_calls_the_hub_only_when_its_user_allows_telemetry(hub, tmp_path, telemetry):
    endpoint, seen = hub
    # trl stays quiet under CI and everything under HF_HUB_OFFLINE: take them away, as in a user's pod
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "HF_HUB_OFFLINE", "HF_HUB_DISABLE_TELEMETRY")}
    env.update(HF_ENDPOINT=endpoint, JOB_WORK_DIR=str(tmp_path / "work"), HF_HOME=str(tmp_path / "hf"),
               **({"HF_HUB_DISABLE_TELEMETRY": telemetry} if telemetry else {}))
    args = [sys.executable, "-m", "job.cli", "run", "--spec", str(REPO / "examples" / "smoke.yaml")]
    for item in (f"run.output={tmp_path / 'runs'}", "training.max_steps=2", "export.merged=false", "export.gguf=[]",
                 "export.probes=[]"):
        args += ["--set", item]
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if telemetry is None:
        assert seen == []
    else:  # the opt-in reaches trl: its report of the run is what the default keeps back
        assert any(path.startswith("/api/telemetry/trl/") for _, path in seen), seen
