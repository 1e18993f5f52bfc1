"""`job launch runpod|lambda|skypilot|torchrun`: start the image elsewhere (thin commands over job.deploy.launch).

API keys come from the environment only (RUNPOD_API_KEY, LAMBDA_API_KEY) and are never printed.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import click

from job import errors
from job.cli.common import (ENV_NAME, check_sendable, env_pairs_from, exits, largest_disk, refuse_secret_values,
                             spec_option)
from job.deploy import k8s as k8s_lib
from job.deploy import launch as launch_lib


def _api_key(var: str) -> str:
    key = os.environ.get(var, "").strip()
    if not key:
        raise click.UsageError(f"set {var} to your API key")
    return key


@click.group()
def launch() -> None:
    """Start the job image on RunPod or Lambda Cloud, describe it for SkyPilot, or run it under torchrun."""


_common = [
    spec_option,
    click.option("--image", required=True, help="Image reference the provider pulls."),
    click.option("--name", help="Pod or instance name; default: job-<spec file name>."),
    click.option("--set", "sets", multiple=True, metavar="SECTION.FIELD=VALUE",
                 help="Override passed as JOB__SECTION__FIELD."),
    click.option("--env", "env_pairs", multiple=True, metavar="KEY=VALUE",
                 help="Extra env, e.g. AWS_REGION=us-east-1."),
    click.option("--pass-env", "pass_env", multiple=True, metavar="NAME",
                 help="Copy NAME from this shell into the job's env (e.g. AWS_ACCESS_KEY_ID); never printed."),
]


def _with_common(command):
    def with_spec_uri(*args, spec_arg: str | None = None, **kwargs):
        if not spec_arg:
            raise click.UsageError("name the spec: an s3:// or https:// URI the machine can read")
        return command(*args, spec_uri=spec_arg, **kwargs)

    with_spec_uri = functools.wraps(command)(with_spec_uri)
    for decorator in reversed(_common):
        with_spec_uri = decorator(with_spec_uri)
    return with_spec_uri


def _job_env(spec_uri, sets, env_pairs, pass_env) -> dict[str, str]:
    overrides = dict(k8s_lib.parse_assignment(s) for s in sets)
    return launch_lib.job_env(spec_uri, overrides=overrides, extra=env_pairs_from(env_pairs, pass_env, dict(os.environ)))


def _disk_gb(resolved: list, given: int | None, size, default: int | None) -> int | None:
    """--disk-gb as given; else `size(disk)` from the spec's predicted peak when the spec was read here, else
    `default`."""
    if given is not None:
        return given
    disk = largest_disk(resolved, default=f"{default} GB" if default else "the provider's default")
    return size(disk) if disk is not None else default


def _default_name(spec_uri: str) -> str:
    return "job-" + k8s_lib.slug(Path(spec_uri.split("?", 1)[0]).stem, 50)


@launch.command("runpod")
@_with_common
@click.option("--gpu", "gpus", multiple=True, required=True,
              help='RunPod GPU type id, e.g. "NVIDIA L40S"; repeat to allow several, in order of preference.')
@click.option("--gpu-count", default=1, show_default=True, type=click.IntRange(1, 8))
@click.option("--disk-gb", type=click.IntRange(10, 2000),
              help="Container disk for the model cache and scratch; default: sized from the spec's predicted peak "
                   "(`job plan`), else 100.")
@click.option("--cloud-type", type=click.Choice(["SECURE", "COMMUNITY"]), default="SECURE", show_default=True)
@click.option("--spot/--on-demand", default=False, help="Interruptible (spot) pod.")
@click.option("--api-url", default=launch_lib.RUNPOD_API, show_default=True, hidden=True)
def runpod(spec_uri, image, name, sets, env_pairs, pass_env, gpus, gpu_count, disk_gb, cloud_type,
           spot, api_url) -> None:
    """Create a RunPod pod that runs SPEC (an s3:// or https:// URI); prints the pod id. Key: $RUNPOD_API_KEY."""
    key = _api_key("RUNPOD_API_KEY")
    with exits():
        resolved = check_sendable(spec_uri, None, sets)
        disk_gb = _disk_gb(resolved, disk_gb, launch_lib.runpod_disk_gb, launch_lib.RUNPOD_DEFAULT_DISK_GB)
        body = launch_lib.runpod_request(
            name=name or _default_name(spec_uri), image=image, gpu_type_ids=list(gpus),
            env=_job_env(spec_uri, sets, env_pairs, pass_env), gpu_count=gpu_count,
            container_disk_gb=disk_gb, cloud_type=cloud_type, interruptible=spot)
        pod_id = launch_lib.launch_runpod(key, body, api_url=api_url)
    click.echo(pod_id)


@launch.command("lambda")
@_with_common
@click.option("--instance-type", required=True, help="e.g. gpu_1x_a100_sxm4.")
@click.option("--region", required=True, help="e.g. us-east-1; must have capacity for the type.")
@click.option("--ssh-key", required=True, help="Name of an SSH key registered with Lambda Cloud.")
@click.option("--file-system", "file_systems", multiple=True, help="Persistent file system to attach.")
@click.option("--keep-running", is_flag=True, help="Do not power off when the job ends.")
@click.option("--api-url", default=launch_lib.LAMBDA_API, show_default=True, hidden=True)
def lambda_(spec_uri, image, name, sets, env_pairs, pass_env, instance_type, region, ssh_key,
            file_systems, keep_running, api_url) -> None:
    """Launch a Lambda Cloud instance that runs SPEC (an s3:// or https:// URI) once; prints the instance id. Key: $LAMBDA_API_KEY."""
    key = _api_key("LAMBDA_API_KEY")
    with exits():
        check_sendable(spec_uri, None, sets)  # a Lambda instance type comes with its disk: nothing to size
        env = _job_env(spec_uri, sets, env_pairs, pass_env)
        body = launch_lib.lambda_request(
            name=name or _default_name(spec_uri), region=region, instance_type=instance_type,
            ssh_key=ssh_key, file_systems=list(file_systems),
            user_data=launch_lib.lambda_user_data(image, env, shutdown=not keep_running))
        instance_id = launch_lib.launch_lambda(key, body, api_url=api_url)
    click.echo(instance_id)


@launch.command("skypilot")
@_with_common
@click.option("--accelerators", "accelerators", multiple=True, required=True, metavar="TYPE:COUNT",
              help="GPUs per node, e.g. H100:8; repeat to allow several, in order of preference.")
@click.option("--nodes", default=1, show_default=True, type=click.IntRange(1, 256), help="Hosts.")
@click.option("--spot/--on-demand", default=False, help="Spot instances; SkyPilot recovers preempted runs.")
@click.option("--infra", help="Where to run, in SkyPilot's terms, e.g. aws, gcp/us-central1, runpod, lambda.")
@click.option("--disk-gb", type=click.IntRange(50, 10000),
              help="Disk per node (the image, model cache and scratch); default: sized from the spec's predicted peak "
                   "(`job plan`), else SkyPilot's default.")
@click.option("--output", "-o", type=click.Path(dir_okay=False, writable=True),
              help="Write the task YAML here instead of to stdout.")
def skypilot(spec_uri, image, name, sets, env_pairs, pass_env, accelerators, nodes, spot, infra, disk_gb,
             output) -> None:
    """Print a SkyPilot task that runs SPEC (an s3:// or https:// URI) on --nodes hosts; launch it with `sky jobs launch`.

    --pass-env NAME becomes a secret reference whose value `sky jobs launch --secret NAME` reads from
    your shell: no value is written into the task.
    """
    for secret in pass_env:
        if not ENV_NAME.match(secret):
            raise click.BadParameter(f"{secret!r} is not an environment variable name", param_hint="--pass-env")
    with exits():
        refuse_secret_values(env_pairs_from(env_pairs, (), dict(os.environ)), "--env")
        resolved = check_sendable(spec_uri, None, sets)
        disk_gb = _disk_gb(resolved, disk_gb, launch_lib.skypilot_disk_gb, None)
        task = launch_lib.skypilot_task(
            name=name or _default_name(spec_uri), image=image, accelerators=list(accelerators),
            env=_job_env(spec_uri, sets, env_pairs, ()), secrets=list(pass_env), nodes=nodes,
            use_spot=spot, infra=infra, disk_gb=disk_gb)
    text = k8s_lib.dump([task])
    if output:
        with exits():
            try:
                Path(output).write_text(text)
            except OSError as exc:
                raise errors.SpecError(f"--output {output}: cannot write the task there ({exc.strerror})",
                                       hint="name a file in a folder that exists") from None
    else:
        click.echo(text, nl=False)


@launch.command("torchrun", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.argument("torchrun_args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def torchrun(ctx: click.Context, torchrun_args: tuple[str, ...]) -> None:
    """torchrun TORCHRUN_ARGS, exiting with the first failed worker's exit code (torchrun's own is 1).

    What the Kubernetes and SkyPilot renderings start on each host, e.g.
    `job launch torchrun --standalone --nproc-per-node 8 -m job.cli run`.
    """
    ctx.exit(launch_lib.torchrun(list(torchrun_args)))
