"""What `job k8s render` and `job launch` send elsewhere is validated here as the run would validate it, and no
credential travels as a value: each case refused with exit 2 and its field, before anything is printed."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from job import errors
from job.cli.main import main

import fake_apis
from deploy_tools import K8S

SPEC = str(K8S / "base" / "spec.yaml")
SPEC_URI = "s3://bucket/specs/run.yaml"
TOKEN = "hf_" + "k" * 34
SKYPILOT = ["launch", "skypilot", SPEC_URI, "--image", "ghcr.io/acme/job:1", "--accelerators", "H100:1"]
RUNPOD = ["launch", "runpod", SPEC_URI, "--image", "i", "--gpu", "NVIDIA H100 80GB HBM3"]
LAMBDA = ["launch", "lambda", SPEC_URI, "--image", "i", "--instance-type", "gpu_1x_h100_sxm5", "--region", "us-east-1",
          "--ssh-key", "laptop"]
API_KEYS = {"RUNPOD_API_KEY": "rp_" + "x" * 30, "LAMBDA_API_KEY": "secret_" + "y" * 30}


def refused(*args: str, env: dict | None = None):
    result = CliRunner().invoke(main, list(args), env={**API_KEYS, **(env or {})})
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
    [*RUNPOD, "--set", f"model.token={TOKEN}"],
    [*LAMBDA, "--set", f"model.token={TOKEN}"],
], ids=["render-set", "render-set-remote-spec", "render-sweep", "render-env", "skypilot-set", "skypilot-env",
        "runpod-set", "lambda-set"])
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
    (["k8s", "render", SPEC, "--set", "model.adapter=runs/sft-run"], "model.adapter 'runs/sft-run' is a local path"),
    (["launch", "runpod", SPEC_URI, "--image", "i", "--gpu", "NVIDIA H100 80GB HBM3", "--set", "training.learning_rate=-1"],
     "training.learning_rate"),
], ids=["render-sweep-local", "render-sweep-remote", "render-typo-local", "render-typo-remote", "skypilot",
        "render-local-output", "skypilot-local-output", "render-local-adapter", "runpod"])
def test_a_bad_override_is_refused_with_its_field_before_anything_is_sent(args, named):
    output = refused(*args)
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


def test_no_target_writes_the_token_of_the_launching_shell_into_what_it_renders_or_sends(tmp_path):
    """With HF_TOKEN set in the shell, every rendering and every request body is searched for its value: SkyPilot
    gets a secret reference, Kubernetes the hf-token Secret's mount, RunPod and Lambda nothing unless --pass-env."""
    shell = {**API_KEYS, "HF_TOKEN": TOKEN}
    written: list[str] = []
    for args in (["k8s", "render", SPEC, "--sweep", "lora.r=8,16"],
                 ["k8s", "render", SPEC, "--nodes", "2", "--gpus-per-node", "2"],
                 ["k8s", "render", SPEC, "--format", "trainjob", "--nodes", "2"],
                 ["k8s", "render", SPEC_URI, "--set", "lora.r=8"],
                 [*SKYPILOT, "--pass-env", "HF_TOKEN", "-o", str(tmp_path / "task.yaml")]):
        result = CliRunner().invoke(main, args, env=shell)
        assert result.exit_code == 0, result.output
        written.append(result.output)
    written.append((tmp_path / "task.yaml").read_text())
    assert "HF_TOKEN: null" in written[-1]
    with fake_apis.runpod(API_KEYS["RUNPOD_API_KEY"]) as api:
        result = CliRunner().invoke(main, [*RUNPOD, "--api-url", f"{api.url}/v1"], env=shell)
        assert result.exit_code == 0, result.output
        written += [result.output, str(api.requests)]
    with fake_apis.lambda_cloud(API_KEYS["LAMBDA_API_KEY"]) as api:
        result = CliRunner().invoke(main, [*LAMBDA, "--api-url", f"{api.url}/api/v1"], env=shell)
        assert result.exit_code == 0, result.output
        written += [result.output, str(api.requests)]
    assert all(TOKEN not in text for text in written)


def _volumes(rendered: str) -> tuple[dict, dict]:
    import yaml

    job = next(d for d in yaml.safe_load_all(rendered) if d and d["kind"] == "Job")
    pod = job["spec"]["template"]["spec"]
    sizes = {v["name"]: v["emptyDir"]["sizeLimit"] for v in pod["volumes"] if "emptyDir" in v}
    return sizes, pod["containers"][0]["resources"]


def test_render_sizes_the_volumes_from_the_predicted_disk_and_says_so():
    from job.plan.estimate import arch_from_table, estimate_disk

    recipe = str(K8S.parent / "examples" / "finetome-llama31-8b-chatml.yaml")
    result = CliRunner().invoke(main, ["k8s", "render", recipe, "--set", "run.output=s3://bucket/runs"])
    assert result.exit_code == 0, result.output
    assert "disk sized for a predicted peak of 90.7 GiB" in result.stderr
    sizes, resources = _volumes(result.stdout)
    disk = estimate_disk(arch_from_table("unsloth/Meta-Llama-3.1-8B"), merged=True,
                         gguf_types=["q4_k_m", "q5_k_m", "q8_0", "q2_k", "q3_k_m", "q6_k"], base_gguf=True)
    gib = {name: int(size.removesuffix("Gi")) for name, size in sizes.items()}
    assert disk.scratch < gib["scratch"] < disk.scratch * 1.3 + 5  # six quants: above the base's 50Gi
    assert disk.cache < gib["cache"] < disk.cache * 1.3 + 2  # the base and its own GGUF
    requested = int(resources["requests"]["ephemeral-storage"].removesuffix("Gi"))
    assert requested == gib["cache"] + gib["scratch"] + gib["tmp"]
    assert int(resources["limits"]["ephemeral-storage"].removesuffix("Gi")) > requested

    remote = CliRunner().invoke(main, ["k8s", "render", SPEC_URI])
    assert remote.exit_code == 0 and "keeps k8s/base/job.yaml's sizes" in remote.stderr
    assert _volumes(remote.stdout)[0]["scratch"] == "50Gi"


@pytest.fixture
def served(tmp_path):
    """A folder served over http://127.0.0.1, as a spec URI the launching machine can read."""
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield tmp_path, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_launch_reads_a_spec_it_can_reach_validates_it_whole_and_sizes_the_disk(served):
    import yaml

    from job.deploy import launch
    from job.plan.estimate import arch_from_table, estimate_disk

    folder, url = served
    recipe = yaml.safe_load((K8S.parent / "examples" / "finetome-llama31-8b-chatml.yaml").read_text())
    recipe["run"]["output"] = "s3://bucket/runs"
    (folder / "spec.yaml").write_text(yaml.safe_dump(recipe))
    (folder / "bad.yaml").write_text(yaml.safe_dump({**recipe, "lora": {**recipe["lora"], "r": "sixteen"}}))
    disk = estimate_disk(arch_from_table("llama-3.1-8b"), merged=True, gguf_types=recipe["export"]["gguf"],
                         base_gguf=True)  # the recipe's GGUFs come from the base's cached GGUF
    with fake_apis.runpod(API_KEYS["RUNPOD_API_KEY"]) as api:
        runpod = ["launch", "runpod", "--image", "i", "--gpu", "NVIDIA H100 80GB HBM3", "--api-url", f"{api.url}/v1"]
        sized = CliRunner().invoke(main, [*runpod, f"{url}/spec.yaml"], env=API_KEYS)
        given = CliRunner().invoke(main, [*runpod, f"{url}/spec.yaml", "--disk-gb", "300"], env=API_KEYS)
        bad = CliRunner().invoke(main, [*runpod, f"{url}/bad.yaml"], env=API_KEYS)
        assert sized.exit_code == 0 and given.exit_code == 0, sized.output + given.output
        assert bad.exit_code == errors.EXIT_USER and "lora.r" in bad.output and len(api.requests) == 2
        assert [body["containerDiskInGb"] for _, _, body in api.requests] == [launch.runpod_disk_gb(disk), 300]
    assert disk.total * 1.07 < launch.runpod_disk_gb(disk) < disk.total * 1.07 * 1.2 + 10  # GiB → GB, headroom
    task = CliRunner().invoke(main, ["launch", "skypilot", f"{url}/spec.yaml", "--image", "i", "--accelerators", "H100"])
    assert task.exit_code == 0 and yaml.safe_load(task.stdout)["resources"]["disk_size"] == launch.skypilot_disk_gb(disk)
    unreadable = CliRunner().invoke(main, ["launch", "skypilot", f"{url}/missing.yaml", "--image", "i",
                                           "--accelerators", "H100"])
    assert unreadable.exit_code == 0 and "cannot read" in unreadable.stderr
    assert "disk_size" not in yaml.safe_load(unreadable.stdout)["resources"]
