"""Several GPUs and several hosts: Indexed Jobs, Kubeflow Trainer TrainJobs and SkyPilot tasks.

The manifests are checked with the same tools as the single-node ones (kubernetes-validate strict,
checkov; the TrainJob and the runtime against Kubeflow Trainer's CRDs, the SkyPilot task with
SkyPilot's own loader), and the commands they start are run here: two torchrun agents on 127.0.0.1
form one group from exactly the rendered arguments, and the runner's exit code 2 (no spec) comes
out of each "pod" as 2, which is what podFailurePolicy and SkyPilot's recovery look at.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest
import yaml
from click.testing import CliRunner

from job import errors
from job.deploy import k8s
from job.cli.k8s import k8s as k8s_group
from job.cli.launch import launch as launch_group

from deploy_tools import (K8S, ROOT, require, run_checkov, sky_python, validate_crd, validate_k8s,
                          write_docs)

SPEC = K8S / "base" / "spec.yaml"
SPEC_URI = "s3://my-artifacts/specs/qwen-lora.yaml"
IMAGE = "ghcr.io/example/job:0.1.0"
LAYOUTS = [(2, 8), (4, 8)]
TRAINJOB_CRD = "trainer.kubeflow.org_trainjobs.yaml"
RUNTIME_CRD = "trainer.kubeflow.org_clustertrainingruntimes.yaml"


def render_cli(*args: str) -> list[dict]:
    result = CliRunner().invoke(k8s_group, ["render", *args])
    assert result.exit_code == 0, result.output
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def pod_spec(job: dict) -> dict:
    return job["spec"]["template"]["spec"]


def container(job: dict) -> dict:
    return pod_spec(job)["containers"][0]


def placement(pod: dict) -> dict:
    return {k: pod.get(k) for k in ("nodeSelector", "tolerations", "securityContext", "serviceAccountName",
                                    "terminationGracePeriodSeconds")}


def selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# --- Kubernetes Indexed Jobs ------------------------------------------------------------------


@pytest.mark.parametrize("overlay", [None, "gke", "eks"])
@pytest.mark.parametrize("nodes,gpus", LAYOUTS)
def test_indexed_job_layouts_are_valid(nodes, gpus, overlay):
    args = [str(SPEC), "--nodes", str(nodes), "--gpus-per-node", str(gpus), "--namespace", "team-a"]
    docs = render_cli(*args, *(["--overlay", overlay] if overlay else []))
    assert [d["kind"] for d in docs] == ["NetworkPolicy", "ConfigMap", "NetworkPolicy", "Service", "Job"]
    for doc in docs:
        validate_k8s(doc)
    _, _, peers, service, job = docs
    single = of_kind(render_cli(*args[:1], "--namespace", "team-a",
                                *(["--overlay", overlay] if overlay else [])), "Job")[0]
    name = job["metadata"]["name"]
    spec, pod = job["spec"], pod_spec(job)

    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == nodes
    assert spec["podFailurePolicy"] == single["spec"]["podFailurePolicy"]
    assert spec["podReplacementPolicy"] == "Failed"
    # Same placement, identity and hardening as the single-node Job.
    assert placement(pod) == placement(pod_spec(single))
    assert container(job)["securityContext"] == container(single)["securityContext"]
    shutdown = {"name": "TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "value": str(pod["terminationGracePeriodSeconds"] - 30)}
    assert container(job)["env"] == container(single)["env"] + [shutdown]
    gpu = container(job)["resources"]["limits"]["nvidia.com/gpu"]
    assert gpu == container(job)["resources"]["requests"]["nvidia.com/gpu"] == str(gpus)

    # Pod i is <job>-i under the Service's subdomain; the rendezvous is pod 0 through that Service.
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"]
    assert pod["subdomain"] == service["metadata"]["name"] == name
    assert selects(service["spec"]["selector"], job["spec"]["template"]["metadata"]["labels"])
    assert all(len(f"{name}-{i}") <= 63 for i in range(nodes))
    args = container(job)["args"]
    assert args[:2] == ["launch", "torchrun"] and args[-3:] == ["-m", "job.cli", "run"]
    flag = dict(zip(args[2:-3:2], args[3:-3:2]))
    assert flag["--nnodes"] == str(nodes) and flag["--nproc-per-node"] == str(gpus)
    assert flag["--rdzv-backend"] == "c10d" and flag["--rdzv-id"] == name
    assert flag["--rdzv-endpoint"] == f"{name}-0.{name}.team-a.svc.cluster.local:{k8s.RDZV_PORT}"
    assert any(p["port"] == k8s.RDZV_PORT for p in service["spec"]["ports"])

    # The base policy denies all ingress; the run's own pods may reach each other, nothing else.
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert selects(peers["spec"]["podSelector"]["matchLabels"], labels)
    (rule,) = peers["spec"]["ingress"]
    (source,) = rule["from"]
    assert selects(source["podSelector"]["matchLabels"], labels)
    assert source["podSelector"]["matchLabels"]["app.kubernetes.io/instance"] == name


@pytest.mark.parametrize("nodes,gpus", LAYOUTS)
def test_indexed_jobs_are_checkov_clean(nodes, gpus, tmp_path):
    docs = render_cli(SPEC_URI, "--overlay", "eks", "--nodes", str(nodes), "--gpus-per-node", str(gpus),
                      "--sweep", "lora.r=8,16")
    assert [d["kind"] for d in docs] == ["NetworkPolicy"] + ["NetworkPolicy", "Service", "Job"] * 2
    write_docs(tmp_path, docs)
    report = run_checkov(tmp_path, "kubernetes")
    assert report["failed"] == [] and report["parsing_errors"] == 0 and report["passed"] > 0


def test_one_host_several_gpus_is_a_plain_job_under_torchrun():
    docs = render_cli(SPEC_URI, "--gpus-per-node", "4")
    assert [d["kind"] for d in docs] == ["NetworkPolicy", "Job"]
    job = docs[1]
    validate_k8s(job)
    assert "completionMode" not in job["spec"] and "subdomain" not in pod_spec(job)
    assert container(job)["args"] == ["launch", "torchrun", "--nnodes", "1", "--nproc-per-node", "4",
                                      "--standalone", "-m", "job.cli", "run"]
    resources = container(job)["resources"]
    base = container(k8s.base_job())["resources"]
    assert resources["requests"]["cpu"] == str(4 * int(base["requests"]["cpu"]))
    assert resources["limits"]["memory"] == f"{4 * int(base['limits']['memory'][:-2])}Gi"


def test_one_gpu_stays_the_single_node_job():
    assert render_cli(str(SPEC), "--nodes", "1", "--gpus-per-node", "1") == render_cli(str(SPEC))


def test_long_run_ids_leave_room_for_the_pod_index():
    docs = render_cli(SPEC_URI, "--run-id", "a" * 80, "--nodes", "16", "--sweep", "lora.r=8,16")
    for job in of_kind(docs, "Job"):
        validate_k8s(job)
        assert len(f"{job['metadata']['name']}-15") <= 63


@pytest.mark.parametrize("bad", [["--nodes", "0"], ["--gpus-per-node", "0"], ["--format", "pytorchjob"]])
def test_bad_layouts_are_usage_errors(bad):
    assert CliRunner().invoke(k8s_group, ["render", SPEC_URI, *bad]).exit_code == errors.EXIT_USER


# --- Kubeflow Trainer -------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", [None, "gke"])
@pytest.mark.parametrize("nodes,gpus", LAYOUTS)
def test_trainjob_layouts_validate_against_the_crd(nodes, gpus, overlay):
    args = [str(SPEC), "--nodes", str(nodes), "--gpus-per-node", str(gpus),
            *(["--overlay", overlay] if overlay else [])]
    docs = render_cli(*args, "--format", "trainjob")
    assert [d["kind"] for d in docs] == ["NetworkPolicy", "ConfigMap", "NetworkPolicy", "TrainJob"]
    for doc in docs[:3]:
        validate_k8s(doc)
    trainjob = docs[3]
    validate_crd(trainjob, TRAINJOB_CRD)
    job = of_kind(render_cli(*args), "Job")[0]  # the Job format of the same run

    trainer = trainjob["spec"]["trainer"]
    assert trainjob["spec"]["runtimeRef"] == {"name": k8s.TRAINER_RUNTIME}
    assert trainer["numNodes"] == nodes and trainer["numProcPerNode"] == gpus >= 1
    assert trainer["resourcesPerNode"] == container(job)["resources"]
    assert trainer["env"] == container(job)["env"] and trainer["image"] == container(job)["image"]
    assert {"name": "TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "value": "570"} in trainer["env"]
    assert trainer["command"] == ["job", "launch", "torchrun", "-m", "job.cli", "run"]
    (patch,) = trainjob["spec"]["runtimePatches"]
    (node,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert node["name"] == k8s.TRAINER_CONTAINER
    pod = node["template"]["spec"]["template"]
    assert placement(pod["spec"]) == placement(pod_spec(job))
    assert pod["spec"]["volumes"] == pod_spec(job)["volumes"]
    (patched,) = pod["spec"]["containers"]
    assert patched["name"] == k8s.TRAINER_CONTAINER
    assert patched["securityContext"] == container(job)["securityContext"]
    assert patched["volumeMounts"] == container(job)["volumeMounts"]
    # Its pods carry the run's labels, so the peers policy (and only it) opens ingress between them.
    assert selects(docs[2]["spec"]["podSelector"]["matchLabels"], pod["metadata"]["labels"])


def test_trainjob_catches_what_the_crd_rejects():
    trainjob = k8s.render(SPEC_URI, layout=k8s.Layout(2, 8), fmt="trainjob")[-1]
    trainjob["spec"]["trainer"]["numNode"] = 2  # a typo the API server would drop without strict validation
    with pytest.raises(Exception, match="numNode"):
        validate_crd(trainjob, TRAINJOB_CRD)
    result = CliRunner().invoke(k8s_group, ["render", SPEC_URI, "--format", "trainjob", "--run-id", "7b-lora"])
    assert result.exit_code == errors.EXIT_USER and "start with a letter" in result.output


def test_job_torch_runtime_matches_the_crd_and_the_exit_codes():
    runtime = yaml.safe_load((K8S / "trainer" / "clustertrainingruntime.yaml").read_text())
    validate_crd(runtime, RUNTIME_CRD)
    (node,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    assert node["name"] == k8s.TRAINER_CONTAINER
    # The Job template inside is a batch/v1 Job's spec: the Kubernetes schema checks it too.
    validate_k8s({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "node"}, **node["template"]})
    rules = node["template"]["spec"]["podFailurePolicy"]["rules"]
    fail_codes = next(r for r in rules if "onExitCodes" in r)["onExitCodes"]
    assert fail_codes["containerName"] == k8s.TRAINER_CONTAINER
    assert set(fail_codes["values"]) == {errors.EXIT_USER, errors.EXIT_NOT_FOUND, errors.EXIT_VERIFICATION}
    # A disruption restarts the group without counting; the first matching JobSet rule wins.
    set_rules = runtime["spec"]["template"]["spec"]["failurePolicy"]["rules"]
    assert [r["action"] for r in set_rules] == ["RestartJobSetAndIgnoreMaxRestarts", "FailJobSet"]
    assert any(c["type"] == "DisruptionTarget" for r in rules for c in r.get("onPodConditions", []))


# --- SkyPilot ---------------------------------------------------------------------------------


def skypilot_cli(*args: str) -> dict:
    result = CliRunner().invoke(launch_group, ["skypilot", SPEC_URI, "--image", IMAGE, *args])
    assert result.exit_code == 0, result.output
    return yaml.safe_load(result.stdout)


_SKY_LOAD = textwrap.dedent("""
    import json, sys
    import sky
    from sky.utils import schemas
    recovery = schemas.get_resources_schema()["properties"]["job_recovery"]["anyOf"][1]["properties"]
    out = []
    for path in sys.argv[1:]:
        task = sky.Task.from_yaml(path)
        (res,) = task.resources
        out.append({"nodes": task.num_nodes, "accelerators": res.accelerators, "image": res.extract_docker_image(),
                    "spot": res.use_spot, "recovery": res.job_recovery, "envs": task.envs,
                    "secrets": sorted(task.secrets) + sorted(ref.name for ref in task.managed_secret_refs),
                    "run": task.run, "known_recovery_keys": sorted(recovery)})
    print(json.dumps(out, default=str))
""")


def test_skypilot_tasks_load_in_skypilot(tmp_path):
    python = require(sky_python(), "SkyPilot (.venv-sky)")
    layouts = [(1, 1), *LAYOUTS]
    paths = []
    for nodes, gpus in layouts:
        path = tmp_path / f"{nodes}x{gpus}.yaml"
        result = CliRunner().invoke(launch_group, [
            "skypilot", SPEC_URI, "--image", IMAGE, "--accelerators", f"H100:{gpus}", "--nodes", str(nodes),
            "--spot", "--set", "lora.r=16", "--env", "AWS_REGION=us-east-1", "--pass-env", "AWS_ACCESS_KEY_ID",
            "--output", str(path)])
        assert result.exit_code == 0 and result.stdout == "", result.output
        paths.append(str(path))
    proc = subprocess.run([python, "-c", _SKY_LOAD, *paths], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    for (nodes, gpus), task in zip(layouts, json.loads(proc.stdout)):
        assert task["nodes"] == nodes and task["accelerators"] == {"H100": gpus}
        assert task["image"] == IMAGE  # SkyPilot reads it as a container image
        assert task["spot"] is True
        recovery = task["recovery"]
        assert set(recovery) <= set(task["known_recovery_keys"])  # the client loader lets unknown keys pass
        assert recovery["max_restarts_on_errors"] == 0
        assert recovery["recover_on_exit_codes"] == [errors.EXIT_TRANSIENT, errors.EXIT_PREEMPTED]
        assert task["envs"]["JOB_SPEC_URI"] == SPEC_URI and task["envs"]["JOB__LORA__R"] == "16"
        assert task["envs"]["AWS_REGION"] == "us-east-1"
        assert "AWS_ACCESS_KEY_ID" in str(task["secrets"]) and "AWS_ACCESS_KEY_ID" not in task["envs"]


def test_skypilot_writes_no_secret_value(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret-value-123")
    result = CliRunner().invoke(launch_group, ["skypilot", SPEC_URI, "--image", IMAGE, "--accelerators", "A100:8",
                                               "--accelerators", "H100:8", "--pass-env", "AWS_SECRET_ACCESS_KEY"])
    assert result.exit_code == 0
    task = yaml.safe_load(result.stdout)
    assert "aws-secret-value-123" not in result.output
    assert task["secrets"] == {"AWS_SECRET_ACCESS_KEY": None}
    assert task["resources"]["accelerators"] == ["A100:8", "H100:8"]


@pytest.mark.parametrize("bad", [["--accelerators", "H100:0"], ["--accelerators", ":8"],
                                 ["--accelerators", "H100:8", "--nodes", "0"], ["--accelerators", "H100",
                                                                                "--pass-env", "BAD-NAME"]])
def test_skypilot_bad_arguments_are_usage_errors(bad):
    result = CliRunner().invoke(launch_group, ["skypilot", SPEC_URI, "--image", IMAGE, *bad])
    assert result.exit_code == errors.EXIT_USER, result.output


# --- The commands the manifests start, run on 127.0.0.1 ---------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def node_env(tmp_path, **extra: str) -> dict[str, str]:
    """A pod's environment without a spec: the runner exits 2 (invalid usage) in every worker."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JOB_SPEC", "JOB__", "PET_", "SKYPILOT_"))}
    env.update(extra)
    # The image's paths (/scratch, /cache) do not exist here.
    env.update(JOB_WORK_DIR=str(tmp_path / "work"), HF_HOME=str(tmp_path / "hf"), OMP_NUM_THREADS="1")
    env["PATH"] = f"{os.path.dirname(sys.executable)}{os.pathsep}{env.get('PATH', '')}"
    return env


def run_hosts(commands: list[list[str]], envs: list[dict[str, str]]) -> list[subprocess.CompletedProcess]:
    """Start every host's command at once (as pods start) and wait for all of them."""
    procs = [subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for cmd, env in zip(commands, envs)]
    try:
        return [subprocess.CompletedProcess(p.args, p.wait(timeout=180), p.communicate()[0]) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def test_indexed_job_pods_meet_and_report_the_runners_exit_code(tmp_path):
    job = of_kind(render_cli(SPEC_URI, "--nodes", "2", "--gpus-per-node", "1"), "Job")[0]
    args = container(job)["args"]
    endpoint = args.index("--rdzv-endpoint") + 1
    args[endpoint] = f"127.0.0.1:{free_port()}"  # pod 0's name, as this machine can reach it
    command = [sys.executable, "-m", "job.cli", *args]  # the image's entrypoint is `job`
    results = run_hosts([command, command], [node_env(tmp_path)] * 2)
    for result in results:
        # Each worker started (so both agents formed one group) and exited 2: no spec.
        assert "no run spec given" in result.stdout, result.stdout[-3000:]
        assert result.returncode == errors.EXIT_USER, result.stdout[-3000:]


def test_trainjob_command_reads_the_trainers_env(tmp_path):
    command = of_kind(render_cli(SPEC_URI, "--format", "trainjob"), "TrainJob")[0]["spec"]["trainer"]["command"]
    assert command[0] == "job"
    pet = {"PET_NNODES": "1", "PET_NPROC_PER_NODE": "1", "PET_NODE_RANK": "0",
           "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(free_port())}
    (result,) = run_hosts([[sys.executable, "-m", "job.cli", *command[1:]]], [node_env(tmp_path, **pet)])
    assert "no run spec given" in result.stdout and result.returncode == errors.EXIT_USER, result.stdout[-3000:]


def test_skypilot_run_script_forms_a_group_and_reports_the_runners_exit_code(tmp_path):
    task = skypilot_cli("--accelerators", "H100:1", "--nodes", "2")
    script = task["run"].replace("--master-port 29500", f"--master-port {free_port()}")
    sky = {"SKYPILOT_NUM_NODES": "2", "SKYPILOT_NUM_GPUS_PER_NODE": "1", "SKYPILOT_NODE_IPS": "127.0.0.1\n127.0.0.1"}
    envs = [node_env(tmp_path, **task["envs"], **sky, SKYPILOT_NODE_RANK=str(rank)) for rank in (0, 1)]
    for env in envs:
        del env["JOB_SPEC_URI"]  # no bucket here: without a spec every worker exits 2
    results = run_hosts([["bash", "-c", script]] * 2, envs)
    for result in results:
        assert "no run spec given" in result.stdout, result.stdout[-3000:]
        assert result.returncode == errors.EXIT_USER


_WORKER = textwrap.dedent("""
    import os, signal, sys, time
    rank = int(os.environ["RANK"])
    if rank == 1:
        if sys.argv[1] == "signal":
            os.kill(os.getpid(), signal.SIGKILL)
        sys.exit(int(sys.argv[1]))
    time.sleep(30)  # rank 0 is stopped by torchrun once rank 1 has failed
""")


@pytest.mark.parametrize("outcome,expected", [(str(errors.EXIT_TRANSIENT), errors.EXIT_TRANSIENT),
                                              ("signal", 128 + 9), ("0", 0)])
def test_torchrun_exits_with_the_failed_workers_code(outcome, expected, tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(_WORKER if outcome != "0" else "import sys; sys.exit(0)\n")
    (result,) = run_hosts([[sys.executable, "-m", "job.cli", "launch", "torchrun", "--standalone",
                            "--nproc-per-node", "2", str(worker), outcome]], [node_env(tmp_path)])
    assert result.returncode == expected, result.stdout[-3000:]


_CHECKPOINTING_WORKER = textwrap.dedent("""
    import signal, sys, time
    def preempted(*_):
        time.sleep(2)  # writing it takes a while: torchrun must wait, not kill
        print("checkpoint written", flush=True)
        sys.exit(76)
    signal.signal(signal.SIGTERM, preempted)
    print("training", flush=True)
    time.sleep(60)
""")


def test_sigterm_reaches_the_workers_and_reads_as_preempted(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(_CHECKPOINTING_WORKER)
    env = node_env(tmp_path, TORCH_ELASTIC_SHUTDOWN_TIMEOUT="20")
    proc = subprocess.Popen([sys.executable, "-m", "job.cli", "launch", "torchrun", "--standalone",
                             "--nproc-per-node", "1", str(worker)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:  # wait until the worker runs
            if "training" in line:
                break
        proc.send_signal(signal.SIGTERM)  # what the kubelet sends the container's PID 1
        out = proc.communicate(timeout=60)[0]
    finally:
        proc.kill()
    assert "checkpoint written" in out, out[-3000:]
    assert proc.returncode == errors.EXIT_PREEMPTED
