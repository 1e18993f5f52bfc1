"""`job launch runpod|lambda` against local servers that check the documented request shapes."""

from __future__ import annotations

import subprocess

import pytest
import yaml
from click.testing import CliRunner

from job import errors
from job.deploy import launch
from job.cli.launch import launch as launch_group

import fake_apis

KEY = "rpa_SECRET0123456789abcdef"
SPEC = "s3://my-artifacts/specs/qwen-lora.yaml"
IMAGE = "ghcr.io/example/job:0.1.0"


def invoke(args, env):
    return CliRunner().invoke(launch_group, args, env=env, catch_exceptions=False)


def runpod_args(api, *extra):
    return ["runpod", SPEC, "--image", IMAGE, "--gpu", "NVIDIA L40S", "--api-url", f"{api.url}/v1",
            "--set", "training.learning_rate=1e-4", "--env", "AWS_REGION=us-east-1", *extra]


def lambda_args(api, *extra):
    return ["lambda", SPEC, "--image", IMAGE, "--instance-type", "gpu_1x_a100_sxm4",
            "--region", "us-east-1", "--ssh-key", "laptop", "--api-url", f"{api.url}/api/v1",
            "--set", "lora.r=16", *extra]


def test_runpod_creates_the_pod_and_prints_only_its_id():
    with fake_apis.runpod(KEY) as api:
        result = invoke(runpod_args(api, "--spot"), {"RUNPOD_API_KEY": KEY})
    assert result.exit_code == 0, result.output
    assert result.stdout == "xedezhzb9la3ye\n"
    assert KEY not in result.output
    (path, headers, body), = api.requests
    assert headers["Authorization"] == f"Bearer {KEY}"
    assert body["imageName"] == IMAGE and body["gpuTypeIds"] == ["NVIDIA L40S"] and body["interruptible"]
    assert body["dockerStartCmd"] == ["run"]
    assert body["env"] == {"JOB_SPEC_URI": SPEC, "HF_HOME": "/cache/hf", "JOB_WORK_DIR": "/scratch",
                           "JOB__TRAINING__LEARNING_RATE": "1e-4", "AWS_REGION": "us-east-1"}
    assert body["name"] == "job-qwen-lora"


def test_runpod_pass_env_copies_from_the_shell_without_printing(monkeypatch):
    env = {"RUNPOD_API_KEY": KEY, "AWS_SECRET_ACCESS_KEY": "aws-secret-value"}
    with fake_apis.runpod(KEY) as api:
        result = invoke(runpod_args(api, "--pass-env", "AWS_SECRET_ACCESS_KEY"), env)
    assert result.exit_code == 0
    assert api.requests[0][2]["env"]["AWS_SECRET_ACCESS_KEY"] == "aws-secret-value"
    assert "aws-secret-value" not in result.output


def test_runpod_bad_key_is_denied_and_not_echoed():
    with fake_apis.runpod(KEY) as api:
        result = invoke(runpod_args(api), {"RUNPOD_API_KEY": "rpa_WRONGKEY"})
    assert result.exit_code == errors.EXIT_NOT_FOUND
    assert "HTTP 401" in result.output and "Unauthorized" in result.output
    assert "rpa_WRONGKEY" not in result.output


def test_runpod_no_capacity_is_transient():
    with fake_apis.runpod(KEY, unavailable_gpus=frozenset({"NVIDIA L40S"})) as api:
        result = invoke(runpod_args(api), {"RUNPOD_API_KEY": KEY})
    assert result.exit_code == errors.EXIT_TRANSIENT
    assert "no longer any instances available" in result.output


def test_runpod_invalid_request_is_the_users_to_fix():
    body = launch.runpod_request(name="x", image=IMAGE, gpu_type_ids=["NVIDIA L40S"], env={})
    body["gpuCount"] = 0  # the documented minimum is 1
    with fake_apis.runpod(KEY) as api:
        with pytest.raises(launch.LaunchError) as e:
            launch.launch_runpod(KEY, body, api_url=f"{api.url}/v1")
    assert e.value.status == 400 and "Invalid input" in str(e.value)


def test_missing_api_key_is_a_usage_error():
    result = CliRunner().invoke(launch_group, ["runpod", SPEC, "--image", IMAGE, "--gpu", "x"], env={"RUNPOD_API_KEY": ""})
    assert result.exit_code == 2 and "RUNPOD_API_KEY" in result.output


def test_local_spec_is_refused_for_remote_machines():
    result = CliRunner().invoke(launch_group, ["runpod", "spec.yaml", "--image", IMAGE, "--gpu", "x"],
                                env={"RUNPOD_API_KEY": KEY})
    assert result.exit_code == 2 and "s3://" in result.output


def test_unreachable_api_is_transient_and_keyless():
    result = CliRunner().invoke(launch_group, ["runpod", SPEC, "--image", IMAGE, "--gpu", "x",
                                               "--api-url", "http://127.0.0.1:9/v1"], env={"RUNPOD_API_KEY": KEY})
    assert result.exit_code == errors.EXIT_TRANSIENT and KEY not in result.output


def test_lambda_launches_with_cloud_init_and_prints_only_the_id():
    with fake_apis.lambda_cloud(KEY) as api:
        result = invoke(lambda_args(api, "--pass-env", "HF_TOKEN"), {"LAMBDA_API_KEY": KEY, "HF_TOKEN": "hf_tokenvalue"})
    assert result.exit_code == 0, result.output
    assert result.stdout == "0920582c7ff041399e34823a0be62549\n"
    assert KEY not in result.output and "hf_tokenvalue" not in result.output
    (path, headers, body), = api.requests
    assert headers["Authorization"] == f"Bearer {KEY}"
    assert body["region_name"] == "us-east-1" and body["instance_type_name"] == "gpu_1x_a100_sxm4"
    assert body["ssh_key_names"] == ["laptop"] and body["quantity"] == 1
    assert body["user_data"].startswith("#cloud-config\n")
    config = yaml.safe_load(body["user_data"])
    files = {f["path"]: f for f in config["write_files"]}
    env_file = files["/etc/job/env"]
    assert env_file["permissions"] == "0600"
    assert f"JOB_SPEC_URI={SPEC}\n" in env_file["content"] and "JOB__LORA__R=16\n" in env_file["content"]
    assert "HF_TOKEN=hf_tokenvalue\n" in env_file["content"]
    script = files["/usr/local/bin/job-once"]["content"]
    assert "docker run --rm --name job --gpus all" in script and f"{IMAGE} run" in script
    assert "--env-file /etc/job/env" in script and "--read-only" in script
    assert script.rstrip().endswith("shutdown -h now")
    assert "hf_tokenvalue" not in script  # secrets stay in the root-only env file
    assert config["runcmd"] == [["/usr/local/bin/job-once"]]


def test_lambda_cloud_init_script_is_valid_bash(tmp_path):
    data = yaml.safe_load(launch.lambda_user_data(IMAGE, {"JOB_SPEC_URI": SPEC}))
    script = tmp_path / "job-once"
    script.write_text(next(f for f in data["write_files"] if f["path"].endswith("job-once"))["content"])
    subprocess.run(["bash", "-n", str(script)], check=True)


def test_lambda_keep_running_skips_the_shutdown():
    data = yaml.safe_load(launch.lambda_user_data(IMAGE, {"JOB_SPEC_URI": SPEC}, shutdown=False))
    assert "shutdown" not in next(f for f in data["write_files"] if f["path"].endswith("job-once"))["content"]


def test_lambda_bad_key_message_is_scrubbed_even_if_the_server_quotes_it():
    with fake_apis.lambda_cloud(KEY, echo_auth=True) as api:
        result = invoke(lambda_args(api), {"LAMBDA_API_KEY": "secret_wrong_key_123"})
    assert result.exit_code == errors.EXIT_NOT_FOUND
    assert "global/invalid-api-key" in result.output
    assert "secret_wrong_key_123" not in result.output and "***" in result.output


def test_lambda_no_capacity_is_transient_with_the_suggestion():
    with fake_apis.lambda_cloud(KEY, no_capacity_types=frozenset({"gpu_1x_a100_sxm4"})) as api:
        result = invoke(lambda_args(api), {"LAMBDA_API_KEY": KEY})
    assert result.exit_code == errors.EXIT_TRANSIENT
    assert "insufficient-capacity" in result.output and "try again later" in result.output


def test_lambda_invalid_parameters_are_the_users_to_fix():
    body = launch.lambda_request(name="x", region="us-east-1", instance_type="gpu_1x_a10", ssh_key="k",
                                 user_data="#cloud-config\n{}")
    body["ssh_key_names"] = ["a", "b"]  # exactly one is allowed
    with fake_apis.lambda_cloud(KEY) as api:
        with pytest.raises(launch.LaunchError) as e:
            launch.launch_lambda(KEY, body, api_url=f"{api.url}/api/v1")
    assert e.value.status == 400 and e.value.code == "global/invalid-parameters"


def test_env_values_with_newlines_cannot_enter_the_env_file():
    with pytest.raises(launch.LaunchError):
        launch.lambda_user_data(IMAGE, {"X": "a\nb"})
