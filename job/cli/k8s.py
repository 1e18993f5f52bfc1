"""`job k8s render`: a Job (and a ConfigMap with the spec) per experiment (a thin command over job.deploy.k8s)."""

from __future__ import annotations

import os
from pathlib import Path

import click

from job.cli.common import check_sendable, env_pairs_from, exits, largest_disk, refuse_secret_values, spec_option
from job.deploy import k8s as k8s_lib


@click.group()
def k8s() -> None:
    """Kubernetes manifests for runs and sweeps."""


@k8s.command("render")
@spec_option
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
def render(spec_arg: str | None, sweeps, sets, overlay, image, namespace, run_id, env_pairs, nodes, gpus_per_node,
           fmt, runtime, cluster_domain) -> None:
    """Print a Job (and a ConfigMap with the spec) per experiment, for `kubectl apply -f -`.

    SPEC is a local YAML file, which travels in a ConfigMap, or an s3:// or https:// URI that
    the Job reads itself. --nodes and --gpus-per-node spread each run over several GPUs and hosts.
    """
    if not spec_arg:
        raise click.UsageError("name the spec: job k8s render SPEC (a local YAML file, s3:// or https://)")
    spec = spec_arg
    text = None
    if not k8s_lib.is_remote(spec):
        try:
            text = Path(spec).read_text()
        except OSError as e:
            raise click.BadParameter(f"cannot read {spec}: {e.strerror}", param_hint="SPEC") from None
    env = env_pairs_from(env_pairs, (), dict(os.environ))
    with exits():
        resolved = check_sendable(spec, text, sets, sweeps)
        refuse_secret_values(env, "--env")
        disk = largest_disk(resolved)
        docs = k8s_lib.render(spec, spec_text=text, overlay=overlay, sweeps=list(sweeps),
                              sets=list(sets), image=image, namespace=namespace, run_id=run_id, env=env,
                              layout=k8s_lib.Layout(nodes, gpus_per_node),
                              fmt=fmt, runtime=runtime, cluster_domain=cluster_domain, disk=disk)
    click.echo(k8s_lib.dump(docs), nl=False)
