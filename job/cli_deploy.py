"""`job k8s render` and `job launch runpod|lambda|skypilot|torchrun`: thin commands over job.k8s and job.launch.

Registered on the main group in job/cli.py with `main.add_command(k8s)` and `main.add_command(launch)`.
API keys come from the environment only (RUNPOD_API_KEY, LAMBDA_API_KEY) and are never printed.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import click

from job import k8s as k8s_lib
from job import launch as launch_lib
from job.errors import EXIT_NOT_FOUND, EXIT_TRANSIENT, EXIT_USER

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _env_pairs(pairs: tuple[str, ...], names: tuple[str, ...]) -> dict[str, str]:
    """--env KEY=VALUE pairs, then --pass-env NAME values copied from this shell."""
    env: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not _ENV_NAME.match(key):
            raise click.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint="--env")
        env[key] = value
    for name in names:
        if name not in os.environ:
            raise click.BadParameter(f"{name} is not set in this shell", param_hint="--pass-env")
        env[name] = os.environ[name]
    return env


def _launch_failed(provider: str, error: launch_lib.LaunchError) -> click.ClickException:
    """The provider's refusal, with the exit code of job/errors.py: a bad request is the user's to fix,
    a rejected key or missing resource is denied, capacity, throttling and outages are transient."""
    exc = click.ClickException(f"{provider}: {error}")
    status = error.status
    if status in (401, 403, 404):
        exc.exit_code = EXIT_NOT_FOUND
    elif status is None or status == 429 or status >= 500 or "capacity" in (error.code or ""):
        exc.exit_code = EXIT_TRANSIENT
    else:
        exc.exit_code = EXIT_USER
    return exc


def _api_key(var: str) -> str:
    key = os.environ.get(var, "").strip()
    if not key:
        raise click.UsageError(f"set {var} to your API key")
    return key


@click.group()
def k8s() -> None:
    """Kubernetes manifests for runs and sweeps."""


@k8s.command("render")
@click.argument("spec")
@click.option("--sweep", "sweeps", multiple=True, metavar="SECTION.FIELD=V1,V2",
              help="Values to sweep; several --sweep options make their cartesian product.")
@click.option("--set", "sets", multiple=True, metavar="SECTION.FIELD=VALUE",
              help="An override applied to every experiment.")
@click.option("--overlay", type=click.Choice(k8s_lib.OVERLAYS),
              help="Node placement and identity for this cloud (k8s/overlays/NAME).")
@click.option("--image", help="Image reference; default: the one in k8s/base/kustomization.yaml.")
@click.option("--namespace", help="Namespace; default: the one in k8s/base/kustomization.yaml.")
@click.option("--run-id", help="Base run id; default: run.id of the spec, or one derived from it.")
@click.option("--env", "env_pairs", multiple=True, metavar="KEY=VALUE",
              help="Extra container env, e.g. AWS_REGION=eu-west-1 or AWS_ROLE_ARN=... (GKE).")
@click.option("--nodes", default=1, show_default=True, type=click.IntRange(1, 256),
              help="Hosts per run: above 1, an Indexed Job with a headless Service, torchrun over c10d.")
@click.option("--gpus-per-node", default=1, show_default=True, type=click.IntRange(1, 16),
              help="GPUs (training processes) per host; above 1 the run goes under torchrun.")
@click.option("--format", "fmt", type=click.Choice(k8s_lib.FORMATS), default="job", show_default=True,
              help="job: batch/v1 Jobs; trainjob: Kubeflow Trainer TrainJobs.")
@click.option("--runtime", default=k8s_lib.TRAINER_RUNTIME, show_default=True,
              help="TrainJob only: the ClusterTrainingRuntime to run on (job-torch: k8s/trainer/).")
@click.option("--cluster-domain", default=k8s_lib.CLUSTER_DOMAIN, show_default=True,
              help="The cluster's DNS domain, in the rendezvous address of pod 0.")
def render(spec: str, sweeps, sets, overlay, image, namespace, run_id, env_pairs, nodes, gpus_per_node,
           fmt, runtime, cluster_domain) -> None:
    """Print a Job (and a ConfigMap with the spec) per experiment, for `kubectl apply -f -`.

    SPEC is a local YAML file, which travels in a ConfigMap, or an s3:// or https:// URI that
    the Job reads itself. --nodes and --gpus-per-node spread each run over several GPUs and hosts.
    """
    text = None
    if not k8s_lib.is_remote(spec):
        try:
            text = Path(spec).read_text()
        except OSError as e:
            raise click.BadParameter(f"cannot read {spec}: {e.strerror}", param_hint="SPEC") from None
    try:
        docs = k8s_lib.render(spec, spec_text=text, overlay=overlay, sweeps=list(sweeps),
                              sets=list(sets), image=image, namespace=namespace, run_id=run_id,
                              env=_env_pairs(env_pairs, ()), layout=k8s_lib.Layout(nodes, gpus_per_node),
                              fmt=fmt, runtime=runtime, cluster_domain=cluster_domain)
    except k8s_lib.RenderError as e:
        raise click.UsageError(str(e)) from None
    click.echo(k8s_lib.dump(docs), nl=False)


@click.group()
def launch() -> None:
    """Start the job image on RunPod or Lambda Cloud, describe it for SkyPilot, or run it under torchrun."""


_common = [
    click.argument("spec_uri"),
    click.option("--image", required=True, help="Image reference the provider pulls."),
    click.option("--name", help="Pod or instance name; default: job-<spec file name>."),
    click.option("--set", "sets", multiple=True, metavar="SECTION.FIELD=VALUE",
                 help="Override passed as JOB__SECTION__FIELD."),
    click.option("--env", "env_pairs", multiple=True, metavar="KEY=VALUE",
                 help="Extra env, e.g. AWS_REGION=us-east-1."),
    click.option("--pass-env", "pass_env", multiple=True, metavar="NAME",
                 help="Copy NAME from this shell into the job's env (e.g. AWS_ACCESS_KEY_ID); never printed."),
]


def _with_common(f):
    for decorator in reversed(_common):
        f = decorator(f)
    return f


def _job_env(spec_uri, sets, env_pairs, pass_env) -> dict[str, str]:
    try:
        overrides = dict(k8s_lib.parse_assignment(s) for s in sets)
        return launch_lib.job_env(spec_uri, overrides=overrides, extra=_env_pairs(env_pairs, pass_env))
    except (k8s_lib.RenderError, launch_lib.LaunchError) as e:
        raise click.UsageError(str(e)) from None


def _default_name(spec_uri: str) -> str:
    return "job-" + k8s_lib.slug(Path(spec_uri.split("?", 1)[0]).stem, 50)


@launch.command("runpod")
@_with_common
@click.option("--gpu", "gpus", multiple=True, required=True,
              help='RunPod GPU type id, e.g. "NVIDIA L40S"; repeat to allow several, in order of preference.')
@click.option("--gpu-count", default=1, show_default=True, type=click.IntRange(1, 8))
@click.option("--disk-gb", default=100, show_default=True, type=click.IntRange(10, 2000),
              help="Container disk for the model cache and scratch.")
@click.option("--cloud-type", type=click.Choice(["SECURE", "COMMUNITY"]), default="SECURE", show_default=True)
@click.option("--spot/--on-demand", default=False, help="Interruptible (spot) pod.")
@click.option("--api-url", default=launch_lib.RUNPOD_API, show_default=True, hidden=True)
def runpod(spec_uri, image, name, sets, env_pairs, pass_env, gpus, gpu_count, disk_gb, cloud_type,
           spot, api_url) -> None:
    """Create a RunPod pod that runs SPEC_URI; prints the pod id. Key: $RUNPOD_API_KEY."""
    key = _api_key("RUNPOD_API_KEY")
    body = launch_lib.runpod_request(
        name=name or _default_name(spec_uri), image=image, gpu_type_ids=list(gpus),
        env=_job_env(spec_uri, sets, env_pairs, pass_env), gpu_count=gpu_count,
        container_disk_gb=disk_gb, cloud_type=cloud_type, interruptible=spot)
    try:
        pod_id = launch_lib.launch_runpod(key, body, api_url=api_url)
    except launch_lib.LaunchError as e:
        raise _launch_failed("RunPod", e) from None
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
    """Launch a Lambda Cloud instance that runs SPEC_URI once; prints the instance id. Key: $LAMBDA_API_KEY."""
    key = _api_key("LAMBDA_API_KEY")
    env = _job_env(spec_uri, sets, env_pairs, pass_env)
    try:
        body = launch_lib.lambda_request(
            name=name or _default_name(spec_uri), region=region, instance_type=instance_type,
            ssh_key=ssh_key, file_systems=list(file_systems),
            user_data=launch_lib.lambda_user_data(image, env, shutdown=not keep_running))
        instance_id = launch_lib.launch_lambda(key, body, api_url=api_url)
    except launch_lib.LaunchError as e:
        raise _launch_failed("Lambda Cloud", e) from None
    click.echo(instance_id)


@launch.command("skypilot")
@_with_common
@click.option("--accelerators", "accelerators", multiple=True, required=True, metavar="TYPE:COUNT",
              help="GPUs per node, e.g. H100:8; repeat to allow several, in order of preference.")
@click.option("--nodes", default=1, show_default=True, type=click.IntRange(1, 256), help="Hosts.")
@click.option("--spot/--on-demand", default=False, help="Spot instances; SkyPilot recovers preempted runs.")
@click.option("--infra", help="Where to run, in SkyPilot's terms, e.g. aws, gcp/us-central1, runpod, lambda.")
@click.option("--disk-gb", type=click.IntRange(50, 10000), help="Disk per node (model cache and scratch).")
@click.option("--output", "-o", type=click.Path(dir_okay=False, writable=True),
              help="Write the task YAML here instead of to stdout.")
def skypilot(spec_uri, image, name, sets, env_pairs, pass_env, accelerators, nodes, spot, infra, disk_gb,
             output) -> None:
    """Print a SkyPilot task that runs SPEC_URI on --nodes hosts; launch it with `sky jobs launch`.

    --pass-env NAME becomes a secret reference whose value `sky jobs launch --secret NAME` reads from
    your shell: no value is written into the task.
    """
    for secret in pass_env:
        if not _ENV_NAME.match(secret):
            raise click.BadParameter(f"{secret!r} is not an environment variable name", param_hint="--pass-env")
    try:
        task = launch_lib.skypilot_task(
            name=name or _default_name(spec_uri), image=image, accelerators=list(accelerators),
            env=_job_env(spec_uri, sets, env_pairs, ()), secrets=list(pass_env), nodes=nodes,
            use_spot=spot, infra=infra, disk_gb=disk_gb)
    except launch_lib.LaunchError as e:
        raise click.UsageError(str(e)) from None
    text = k8s_lib.dump([task])
    if output:
        Path(output).write_text(text)
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
