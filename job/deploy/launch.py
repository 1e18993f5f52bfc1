"""Start the job image on RunPod or Lambda Cloud through their public REST APIs, describe it as a
SkyPilot task, and run it under torchrun on one host of many.

RunPod: `POST https://rest.runpod.io/v1/pods` (REST API v1, "Create a new Pod"; Bearer key).
Lambda Cloud: `POST https://cloud.lambda.ai/api/v1/instance-operations/launch` (Bearer key), with a
cloud-init user_data that runs the container and powers the machine off when the job ends.
SkyPilot: a task YAML for `sky jobs launch` (managed jobs: spot recovery, restarts on exit code 75).
torchrun: torchrun's own launcher, but exiting with the failed worker's exit code instead of 1.

The API key is an argument (the CLI reads it from the environment) and never appears in a request
URL, a message, or an exception: error text from the server is scrubbed of it before it is shown.
"""

from __future__ import annotations

import json
import math
import shlex
import urllib.error
import urllib.request
from typing import Any

from job import errors
from job.errors import LaunchError, ProviderError, network_reason

RUNPOD_API = "https://rest.runpod.io/v1"
LAMBDA_API = "https://cloud.lambda.ai/api/v1"
TIMEOUT_S = 30

# Where the container writes; the image's root filesystem stays read-only, as on Kubernetes.
CACHE_DIR = "/cache"
SCRATCH_DIR = "/scratch"


def job_env(spec_uri: str, *, overrides: dict[str, str] | None = None,
            extra: dict[str, str] | None = None) -> dict[str, str]:
    """The runner's environment: the spec URI, JOB__SECTION__FIELD overrides, the caches, extras."""
    if not spec_uri.startswith(("s3://", "https://", "http://")):
        raise LaunchError(f"the spec must be an s3:// or https:// URI the machine can read, got {spec_uri!r}")
    env = {"JOB_SPEC_URI": spec_uri, "HF_HOME": f"{CACHE_DIR}/hf", "JOB_WORK_DIR": SCRATCH_DIR}
    for key, value in (overrides or {}).items():
        env["JOB__" + "__".join(part.upper() for part in key.split("."))] = str(value)
    env.update(extra or {})
    return env


# --- disk -------------------------------------------------------------------------------------
# Beyond the run's predicted peak (job.plan.estimate.Disk): checkpoints, data and compiled kernels; on a SkyPilot
# node's disk also the OS and the pulled image (about 10 GB compressed, twice that unpacked).
RUNPOD_DEFAULT_DISK_GB = 100
RUNPOD_DISK_OVERHEAD_GB = 10
SKYPILOT_DISK_OVERHEAD_GB = 40
SKYPILOT_MIN_DISK_GB = 50
GIB_PER_GB = 2**30 / 1e9  # providers count disks in GB, the prediction is in GiB


def runpod_disk_gb(disk) -> int:
    """RunPod's container disk (the image lives apart from it) for a run with predicted peak `disk`."""
    return math.ceil(disk.total * GIB_PER_GB * 1.1 + RUNPOD_DISK_OVERHEAD_GB)


def skypilot_disk_gb(disk) -> int:
    return max(SKYPILOT_MIN_DISK_GB, math.ceil(disk.total * GIB_PER_GB * 1.1 + SKYPILOT_DISK_OVERHEAD_GB))


# --- RunPod ---------------------------------------------------------------------------------


def runpod_request(*, name: str, image: str, gpu_type_ids: list[str], env: dict[str, str],
                   gpu_count: int = 1, container_disk_gb: int = RUNPOD_DEFAULT_DISK_GB, cloud_type: str = "SECURE",
                   interruptible: bool = False) -> dict[str, Any]:
    """Body of RunPod's Create Pod call. The image's own entrypoint (`job`) runs `run`."""
    if cloud_type not in ("SECURE", "COMMUNITY"):
        raise LaunchError("cloud type must be SECURE or COMMUNITY")
    if gpu_count < 1:
        raise LaunchError("gpu count must be at least 1")
    return {
        "name": name,
        "imageName": image,
        "computeType": "GPU",
        "cloudType": cloud_type,
        "gpuTypeIds": list(gpu_type_ids),
        "gpuCount": gpu_count,
        "interruptible": interruptible,
        "containerDiskInGb": container_disk_gb,
        "volumeInGb": 0,
        "dockerStartCmd": ["run"],
        "env": dict(env),
        "ports": [],
        "supportPublicIp": False,
    }


def launch_runpod(api_key: str, body: dict[str, Any], *, api_url: str = RUNPOD_API) -> str:
    """Create the pod; returns its id."""
    reply = _post(f"{api_url.rstrip('/')}/pods", body, api_key, provider="RunPod")
    pod_id = reply.get("id") if isinstance(reply, dict) else None
    if not pod_id:
        raise ProviderError("answered without a pod id", provider="RunPod")
    return str(pod_id)


# --- Lambda Cloud ---------------------------------------------------------------------------


def lambda_user_data(image: str, env: dict[str, str], *, shutdown: bool = True,
                     shm_size: str = "16g") -> str:
    """cloud-config that runs the image once on the GPUs and then powers the instance off.

    The environment goes into a root-only file for `docker run --env-file`, not onto a command
    line, so it shows neither in `ps` nor in cloud-init's logs of the commands it ran.
    """
    for key, value in env.items():
        if "\n" in value or "\n" in key or "=" in key:
            raise LaunchError(f"environment variable {key!r} cannot go into an env file")
    env_file = "".join(f"{k}={v}\n" for k, v in env.items())
    docker = " ".join([
        "docker run --rm --name job --gpus all",
        f"--shm-size {shlex.quote(shm_size)}",
        "--read-only --tmpfs /tmp",
        f"-v /var/lib/job/cache:{CACHE_DIR} -v /var/lib/job/scratch:{SCRATCH_DIR}",
        "--env-file /etc/job/env",
        shlex.quote(image), "run",
    ])
    script = "\n".join([
        "#!/bin/bash",
        "set -u",
        "mkdir -p /var/lib/job/cache /var/lib/job/scratch",
        "chmod 0777 /var/lib/job/cache /var/lib/job/scratch",
        f"{docker} > /var/log/job.log 2>&1",
        "echo \"exit=$?\" >> /var/log/job.log",
        "shutdown -h now" if shutdown else "true",
        "",
    ])
    config = {
        "write_files": [
            {"path": "/etc/job/env", "permissions": "0600", "owner": "root:root", "content": env_file},
            {"path": "/usr/local/bin/job-once", "permissions": "0755", "content": script},
        ],
        # A script of its own, so a failing docker pull still reaches the shutdown.
        "runcmd": [["/usr/local/bin/job-once"]],
    }
    return "#cloud-config\n" + json.dumps(config, indent=2) + "\n"


def lambda_request(*, name: str, region: str, instance_type: str, ssh_key: str, user_data: str,
                   file_systems: list[str] = ()) -> dict[str, Any]:
    """Body of Lambda Cloud's launch call (one instance)."""
    if len(name) > 64:
        raise LaunchError("a Lambda instance name has at most 64 characters")
    body: dict[str, Any] = {
        "region_name": region,
        "instance_type_name": instance_type,
        "ssh_key_names": [ssh_key],
        "quantity": 1,
        "name": name,
        "user_data": user_data,
    }
    if file_systems:
        body["file_system_names"] = list(file_systems)
    return body


def launch_lambda(api_key: str, body: dict[str, Any], *, api_url: str = LAMBDA_API) -> str:
    """Launch the instance; returns its id."""
    reply = _post(f"{api_url.rstrip('/')}/instance-operations/launch", body, api_key, provider="Lambda Cloud")
    ids = (reply.get("data") or {}).get("instance_ids") if isinstance(reply, dict) else None
    if not ids:
        raise ProviderError("answered without an instance id", provider="Lambda Cloud")
    return str(ids[0])


# --- SkyPilot -------------------------------------------------------------------------------

# Exit codes after which a new attempt can succeed (job/errors.py): SkyPilot recovers on these only.
# A user error, a failed verification or a bug would fail again: max_restarts_on_errors stays 0.
INFRA_EXIT_CODES = (errors.EXIT_TRANSIENT, errors.EXIT_PREEMPTED)


def skypilot_task(*, name: str, image: str, accelerators: list[str], env: dict[str, str],
                  secrets: list[str] = (), nodes: int = 1, use_spot: bool = False, infra: str | None = None,
                  disk_gb: int | None = None) -> dict[str, Any]:
    """A SkyPilot task that runs the image on `nodes` hosts with `accelerators` each (e.g. "H100:8";
    several are alternatives in order of preference).

    The image runs as SkyPilot's container runtime: SkyPilot installs its agent in the container
    through apt, so the container runs as root, and torchrun (one process per GPU) is started by the
    task's `run` script from SkyPilot's node variables. secrets are names only, whose values
    `sky jobs launch --secret NAME` takes from the launching shell.
    """
    if nodes < 1:
        raise LaunchError("the node count must be at least 1")
    if not accelerators:
        raise LaunchError("name at least one accelerator, e.g. H100:8")
    for accelerator in accelerators:
        kind, _, count = accelerator.partition(":")
        if not kind or (count and not (count.isdigit() and int(count) >= 1)):
            raise LaunchError(f"accelerator {accelerator!r} is not TYPE or TYPE:COUNT (e.g. H100:8)")
    resources: dict[str, Any] = {
        "accelerators": accelerators[0] if len(accelerators) == 1 else list(accelerators),
        "image_id": f"docker:{image}",
        "use_spot": use_spot,
        "job_recovery": {
            "strategy": "EAGER_NEXT_REGION",
            "max_restarts_on_errors": 0,
            "recover_on_exit_codes": list(INFRA_EXIT_CODES),
        },
    }
    if infra:
        resources["infra"] = infra
    if disk_gb:
        resources["disk_size"] = disk_gb
    task: dict[str, Any] = {
        "name": name,
        "num_nodes": nodes,
        "resources": resources,
        "envs": dict(env),
    }
    if secrets:
        task["secrets"] = {secret: None for secret in secrets}
    task["config"] = {"docker": {"run_options": ["--user=0:0"]}}
    task["run"] = skypilot_run_script(nodes)
    return task


def skypilot_run_script(nodes: int) -> str:
    """The task's `run`: one process per GPU of the node, rank and head address from SkyPilot."""
    # The image's PATH is not guaranteed in SkyPilot's login shell.
    lines = ["set -euo pipefail", "export PATH=/opt/venv/bin:$PATH"]
    if nodes == 1:
        lines.append('exec job launch torchrun --standalone --nnodes 1 '
                     '--nproc-per-node "$SKYPILOT_NUM_GPUS_PER_NODE" -m job.cli run')
    else:
        lines += [
            'head_ip=$(echo "$SKYPILOT_NODE_IPS" | head -n1)',
            'exec job launch torchrun --nnodes "$SKYPILOT_NUM_NODES" '
            '--nproc-per-node "$SKYPILOT_NUM_GPUS_PER_NODE" --node-rank "$SKYPILOT_NODE_RANK" '
            '--master-addr "$head_ip" --master-port 29500 -m job.cli run',
        ]
    return "\n".join(lines) + "\n"


# --- torchrun --------------------------------------------------------------------------------


def torchrun(argv: list[str]) -> int:
    """Run torchrun with argv; return the exit code of the worker that failed first.

    torchrun itself exits 1 whatever its workers exited with, which would hide a user error (2) or
    a transient failure (75) from Kubernetes' podFailurePolicy and SkyPilot's recovery. A worker
    killed by a signal gives 128 + the signal, as a shell reports it. When the rendezvous or the
    store fails (a peer was lost, or never came) the run can succeed on a new attempt: transient.
    A SIGTERM to this process reaches the workers (torchrun forwards it and waits
    TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds for their checkpoint): preempted, as `job run` reports it.
    """
    import torch.distributed as dist
    from torch.distributed import run as torch_run
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError

    try:
        torch_run.run(torch_run.parse_args(argv))
    except ChildFailedError as failed:
        _rank, failure = failed.get_first_failure()
        return failure.exitcode if failure.exitcode >= 0 else 128 - failure.exitcode
    except SignalException:
        return errors.EXIT_PREEMPTED
    except (RendezvousError, dist.DistError):
        return errors.EXIT_TRANSIENT
    return errors.EXIT_OK


# --- HTTP -----------------------------------------------------------------------------------


def _post(url: str, body: dict[str, Any], api_key: str, *, provider: str) -> Any:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        method="POST",
        headers={
            "Authorization": f"Bearer {api_key}",
            "Content-Type": "application/json",
            "Accept": "application/json",
            "User-Agent": "job-launch",
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            return json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as e:
        raise _api_error(e.code, e.read(), api_key, provider) from None
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        raise ProviderError(_scrub(f"cannot reach {url}: {network_reason(e)}", api_key), provider=provider) from None
    except json.JSONDecodeError:
        raise ProviderError(f"{url} answered with something that is not JSON", provider=provider) from None


def _api_error(status: int, raw: bytes, api_key: str, provider: str) -> ProviderError:
    """Lambda: {"error": {"code", "message", "suggestion"}}; RunPod: {"error": "..."} or text."""
    code = None
    text = raw.decode("utf-8", "replace").strip()
    try:
        payload = json.loads(text)
    except json.JSONDecodeError:
        payload = None
    if isinstance(payload, dict):
        error = payload.get("error", payload)
        if isinstance(error, dict):
            code = error.get("code")
            parts = [error.get("message") or ""]
            if error.get("suggestion"):
                parts.append(f"({error['suggestion']})")
            text = " ".join(p for p in parts if p) or json.dumps(error)
        elif isinstance(error, str):
            text = error
    hint = {401: "check the API key", 403: "the API key lacks permission for this",
            429: "rate limited; try again in a minute"}.get(status)
    message = f"HTTP {status}" + (f" {code}" if code else "") + f": {text[:500] or 'no details'}"
    if hint:
        message += f" [{hint}]"
    return ProviderError(_scrub(message, api_key), provider=provider, status=status, code=code)


def _scrub(text: str, secret: str) -> str:
    return text.replace(secret, "***") if secret else text
