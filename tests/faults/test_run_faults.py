"""One real short `job run` through the CLI, publishing to S3 through the fault proxy.

It either publishes a complete, correct manifest (exit 0) or fails with exit 75 and no manifest; nothing else.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.faults.conftest import assert_complete_and_correct, stored
from tests.faults.proxy import Fault

pytestmark = [pytest.mark.smoke, pytest.mark.slow]


def test_short_run_publishes_correctly_or_exits_75_with_no_manifest(tmp_path, bucket, proxy, direct):
    proxy.add(Fault.SLOW_DOWN, method="PUT", times=1)
    proxy.add(Fault.DROP_MID_BODY, method="GET", every=3)
    proxy.add(Fault.DROP_REQUEST, every=5)
    proxy.add(Fault.HTTP_503, every=4)
    proxy.add(Fault.DROP_RESPONSE, every=7)
    proxy.add(Fault.DELAY, every=6, seconds=0.3)
    env = {**os.environ, "JOB_WORK_DIR": str(tmp_path / "work"), "JOB__RUN__OUTPUT": f"s3://{bucket}/runs",
           "PYTHONUNBUFFERED": "1"}  # AWS_ENDPOINT_URL_S3 is the proxy (fixture)
    proc = subprocess.run(
        [sys.executable, "-m", "job.cli", "run", "--spec", str(REPO / "examples" / "smoke.yaml"),
         "--set", "training.max_steps=2", "--set", "export.merged=false", "--set", "export.gguf=[]"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )

    faulted_writes = [target for method, target, fault in proxy.history if fault and method == "PUT"]
    assert faulted_writes, proxy.injected  # the publish itself went through faults
    if proc.returncode == 0:
        staged = tmp_path / "work" / "smoke" / "out"
        expected = {p.relative_to(staged).as_posix(): p.read_bytes() for p in staged.rglob("*") if p.is_file()}
        assert_complete_and_correct(direct, bucket, "runs/smoke", expected)
        assert "adapter/adapter_model.safetensors" in expected
    else:
        assert proc.returncode == 75, proc.stderr[-3000:]
        assert stored(direct, bucket, "runs/smoke/manifest.json") is None
    print(f"exit {proc.returncode}; faults injected: {dict(proxy.injected)} in {len(proxy.history)} requests")
