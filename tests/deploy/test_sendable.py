"""What `job k8s render` and `job launch` send elsewhere is validated here as the run would validate it, and no
credential travels as a value: each case refused with exit 2 and its field, before anything is printed."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from job import errors
from job.cli.main import main

from deploy_tools import K8S

SPEC = str(K8S / "base" / "spec.yaml")
SPEC_URI = "s3://bucket/specs/run.yaml"
TOKEN = "hf_" + "k" * 34
SKYPILOT = ["launch", "skypilot", SPEC_URI, "--image", "ghcr.io/acme/job:1", "--accelerators", "H100:1"]


def refused(*args: str, env: dict | None = None):
    result = CliRunner().invoke(main, list(args), env=env)
    assert result.exit_code == errors.EXIT_USER, result.output
    assert "apiVersion" not in result.output and "resources:" not in result.output, "nothing is rendered"
    return result.output


@pytest.mark.parametrize("args", [
    ["k8s", "render", SPEC, "--set", f"model.token={TOKEN}"],
    ["k8s", "render", SPEC_URI, "--set", f"model.token={TOKEN}"],
    ["k8s", "render", SPEC, "--sweep", f"model.token={TOKEN},hf_other_token_value"],
    ["k8s", "render", SPEC, "--env", f"HF_TOKEN={TOKEN}"],
    [*SKYPILOT, "--set", f"model.token={TOKEN}"],
    [*SKYPILOT, "--env", f"HF_TOKEN={TOKEN}"],
], ids=["render-set", "render-set-remote-spec", "render-sweep", "render-env", "skypilot-set", "skypilot-env"])
def test_a_token_is_refused_and_never_printed(args):
    output = refused(*args)
    assert TOKEN not in output and ("model.token" in output or "HF_TOKEN" in output)


@pytest.mark.parametrize(("args", "named"), [
    (["k8s", "render", SPEC, "--sweep", "lora.r=8,sixteen"], "lora.r"),
    (["k8s", "render", SPEC_URI, "--sweep", "lora.r=8,sixteen"], "lora.r"),
    (["k8s", "render", SPEC, "--set", "training.lr=1e-4"], "training.lr: unknown field"),
    (["k8s", "render", SPEC_URI, "--set", "training.lr=1e-4"], "training.lr: unknown field"),
    ([*SKYPILOT, "--set", "lora.r=sixteen"], "lora.r"),
    (["k8s", "render", SPEC, "--set", "run.output=runs"], "run.output 'runs' is a local path"),
    ([*SKYPILOT, "--set", "run.output=runs"], "run.output 'runs' is a local path"),
    (["launch", "runpod", SPEC_URI, "--image", "i", "--gpu", "NVIDIA H100 80GB HBM3", "--set", "training.learning_rate=-1"],
     "training.learning_rate"),
], ids=["render-sweep-local", "render-sweep-remote", "render-typo-local", "render-typo-remote", "skypilot",
        "render-local-output", "skypilot-local-output", "runpod"])
def test_a_bad_override_is_refused_with_its_field_before_anything_is_sent(args, named):
    output = refused(*args, env={"RUNPOD_API_KEY": "rp_" + "x" * 30})
    assert named in output


def test_valid_overrides_still_render():
    result = CliRunner().invoke(main, ["k8s", "render", SPEC, "--sweep", "lora.r=8,16", "--set", "training.max_steps=30"])
    assert result.exit_code == 0, result.output
    assert "JOB__LORA__R" in result.output


def test_the_spec_may_be_named_with_spec_and_a_task_file_needs_an_existing_folder(tmp_path):
    assert "JOB__LORA__R" in CliRunner().invoke(main, ["k8s", "render", "--spec", SPEC, "--set", "lora.r=8"]).output
    output = refused(*SKYPILOT, "-o", str(tmp_path / "missing" / "task.yaml"))
    assert "cannot write the task there" in output
    written = CliRunner().invoke(main, [*SKYPILOT, "-o", str(tmp_path / "task.yaml")])
    assert written.exit_code == 0 and SPEC_URI in (tmp_path / "task.yaml").read_text()
