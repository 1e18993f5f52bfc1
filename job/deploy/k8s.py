"""Kubernetes Jobs for one run or a sweep, built from the kustomize files in k8s/.

The Job is written once, in k8s/base/job.yaml; an overlay's job-patch.yaml is merged over it the
way kustomize merges a strategic merge patch, so `job k8s render` and `kubectl kustomize` give the
same Job (tests/deploy checks that). Everything here is pure: data in, manifests out.

Several GPUs or hosts: the same Job runs `job launch torchrun` (torchrun that keeps the worker's exit
code, so podFailurePolicy still sees 2, 3 and 4). On several hosts it becomes an Indexed Job with a
headless Service (k8s/distributed/) through which every pod reaches pod 0's c10d rendezvous. The
same run can instead be a Kubeflow Trainer TrainJob, built from that Job so that placement, security
context and env cannot drift apart.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from job.errors import RenderError
from job.plan.estimate import Disk

OVERLAYS = ("gke", "eks")
FORMATS = ("job", "trainjob")
SPEC_KEY = "spec.yaml"
CONTAINER = "train"
RDZV_PORT = 29500
# A GPU node pool scaling up from zero takes minutes per node: wait that long for every pod to join.
RDZV_JOIN_TIMEOUT_S = 1800
CLUSTER_DOMAIN = "cluster.local"
# Kubeflow Trainer: the runtime every install ships, and the container its torch plugin configures.
TRAINER_RUNTIME = "torch-distributed"
TRAINER_CONTAINER = "node"
TRAINER_API = "trainer.kubeflow.org/v1alpha1"
_RFC1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_QUANTITY = re.compile(r"^(\d+)([A-Za-z]*)$")
MAX_NAME = 63  # a Job's name is also the value of its pods' job-name label
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_REMOTE = ("s3://", "https://", "http://")

# Strategic merge keys of the lists our patches touch (Kubernetes API types); other lists replace.
_MERGE_KEYS = {"containers": "name", "env": "name", "volumes": "name", "volumeMounts": "mountPath"}


@dataclass(frozen=True)
class Experiment:
    run_id: str
    overrides: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Layout:
    """How many hosts a run spans and how many GPUs (one training process each) it uses on each."""

    nodes: int = 1
    gpus_per_node: int = 1

    def __post_init__(self):
        if self.nodes < 1 or self.gpus_per_node < 1:
            raise RenderError("--nodes and --gpus-per-node must be at least 1")

    @property
    def distributed(self) -> bool:
        return self.nodes > 1 or self.gpus_per_node > 1


def manifest_dir() -> Path:
    """k8s/ next to the package in a checkout, or job/resources/k8s when installed as package data."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "resources" / "k8s", package.parent / "k8s"):
        if (candidate / "base" / "job.yaml").is_file():
            return candidate
    raise RenderError("cannot find the k8s/ manifests (k8s/base/job.yaml) next to the job package")


def is_remote(spec: str) -> bool:
    return spec.startswith(_REMOTE)


def slug(text: str, limit: int = MAX_NAME) -> str:
    """A DNS-1123 label made from text: lower case, [a-z0-9-], at most limit characters."""
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].strip("-")
    return s or "run"


def _short_hash(text: str, n: int = 8) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def base_run_id(spec_ref: str, spec: dict | None) -> str:
    """run.id of the spec when it has one; else a name from the spec's content (or its URI)."""
    if spec is not None:
        run = spec.get("run") or {}
        if isinstance(run, dict) and run.get("id"):
            return slug(str(run["id"]))
        canonical = json.dumps(spec, sort_keys=True, default=str)
        return f"run-{_short_hash(canonical, 10)}"
    stem = Path(spec_ref.split("?", 1)[0]).stem
    return f"{slug(stem, MAX_NAME - 7)}-{_short_hash(spec_ref, 6)}"


def parse_assignment(text: str) -> tuple[str, str]:
    """'training.learning_rate=1e-4' -> ('training.learning_rate', '1e-4')."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+", key):
        raise RenderError(f"expected SECTION.FIELD=VALUE, got {text!r}")
    return key, value.strip()


def parse_sweep(text: str) -> tuple[str, list[str]]:
    """'lora.r=8,16' -> ('lora.r', ['8', '16'])."""
    key, values = parse_assignment(text)
    items = [v.strip() for v in values.split(",")]
    if not all(items):
        raise RenderError(f"sweep {text!r} has an empty value")
    if len(set(items)) != len(items):
        raise RenderError(f"sweep {text!r} repeats a value")
    return key, items


def override_env_name(key: str) -> str:
    """'training.learning_rate' -> 'JOB__TRAINING__LEARNING_RATE' (the runner's override form)."""
    return "JOB__" + "__".join(part.upper() for part in key.split("."))


def experiments(base_id: str, sweeps: list[tuple[str, list[str]]],
                fixed: dict[str, str] | None = None, limit: int = MAX_NAME) -> list[Experiment]:
    """The cartesian product of the sweeps; each point gets its own run id."""
    fixed = dict(fixed or {})
    keys = [k for k, _ in sweeps]
    if len(set(keys)) != len(keys) or set(keys) & set(fixed):
        raise RenderError("each field may be swept or set only once")
    if not sweeps:
        return [Experiment(base_id, fixed)]
    out = []
    for values in itertools.product(*(vals for _, vals in sweeps)):
        point = dict(zip(keys, values))
        suffix = _short_hash(json.dumps(point, sort_keys=True))
        run_id = f"{base_id[: limit - len(suffix) - 1].rstrip('-')}-{suffix}"
        out.append(Experiment(run_id, {**fixed, **point}))
    return out


def strategic_merge(base: Any, patch: Any, key: str | None = None) -> Any:
    """kustomize's strategic merge, for the shapes in k8s/: maps merge, named lists merge by key."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            out[k] = strategic_merge(base[k], v, k) if k in base else v
        return out
    merge_key = _MERGE_KEYS.get(key or "")
    if merge_key and isinstance(base, list) and isinstance(patch, list):
        by_key = {item[merge_key]: item for item in patch}
        merged = [strategic_merge(item, by_key[item[merge_key]]) if item[merge_key] in by_key else item
                  for item in base]
        seen = {item[merge_key] for item in base}
        return [item for item in patch if item[merge_key] not in seen] + merged
    return patch


def _read_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def base_job(overlay: str | None = None, root: Path | None = None) -> dict:
    """k8s/base/job.yaml with the overlay's job-patch.yaml merged over it."""
    root = root or manifest_dir()
    job = _read_yaml(root / "base" / "job.yaml")
    if overlay is not None:
        if overlay not in OVERLAYS:
            raise RenderError(f"unknown overlay {overlay!r}; choose one of {', '.join(OVERLAYS)}")
        job = strategic_merge(job, _read_yaml(root / "overlays" / overlay / "job-patch.yaml"))
    return job


def kustomization(root: Path | None = None) -> dict:
    return _read_yaml((root or manifest_dir()) / "base" / "kustomization.yaml")


def default_image(root: Path | None = None) -> str:
    image = kustomization(root)["images"][0]
    return f"{image['newName']}:{image['newTag']}"


def _container(job: dict) -> dict:
    return next(c for c in job["spec"]["template"]["spec"]["containers"] if c["name"] == CONTAINER)


def job_manifest(template: dict, experiment: Experiment, *, namespace: str, image: str,
                 spec_env: dict, extra_env: dict[str, str]) -> dict:
    """One experiment's Job: the template, named after the run, with its spec and overrides in env."""
    job = json.loads(json.dumps(template))  # deep copy of plain data
    labels = {"app.kubernetes.io/instance": experiment.run_id}
    job["metadata"]["name"] = experiment.run_id
    job["metadata"]["namespace"] = namespace
    job["metadata"]["labels"] = {**job["metadata"].get("labels", {}), **labels}
    pod_meta = job["spec"]["template"]["metadata"]
    pod_meta["labels"] = {**pod_meta.get("labels", {}), **labels}
    container = _container(job)
    container["image"] = image
    env = [e for e in container.get("env", []) if e["name"] != "JOB_SPEC"]
    added = [spec_env, {"name": "JOB__RUN__ID", "value": experiment.run_id}]
    added += [{"name": override_env_name(k), "value": v} for k, v in experiment.overrides.items()]
    added += [{"name": k, "value": v} for k, v in extra_env.items()]
    names = {e["name"] for e in added}
    container["env"] = added + [e for e in env if e["name"] not in names]
    return job


def spec_configmap(name: str, namespace: str, text: str, run_id: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/name": "job", "app.kubernetes.io/instance": run_id},
        },
        "data": {SPEC_KEY: text},
    }


# Beyond the predicted peak: the scratch volume also holds checkpoints, the tokenized data and compiled kernels; the
# cache also holds the tokenizer and the hub's metadata. The container's own writes (logs) need a little more.
SCRATCH_HEADROOM = (1.1, 5)  # x predicted + GiB
CACHE_HEADROOM = (1.1, 2)
CONTAINER_WRITES_GIB = 8


def _gib(quantity: str) -> int:
    match = _QUANTITY.match(str(quantity))
    if not match or match[2] not in ("Gi", "Mi"):
        raise RenderError(f"k8s/base/job.yaml: expected a size in Gi or Mi, got {quantity!r}")
    return math.ceil(int(match[1]) / (1024 if match[2] == "Mi" else 1))


def size_storage(job: dict, disk: Disk) -> dict:
    """The Job with its cache and scratch volumes sized from the run's predicted peak disk (job.plan.estimate) and its
    ephemeral-storage request the sum of its disk-backed volumes, so a node without the room is never picked."""
    job = json.loads(json.dumps(job))
    limits = {"cache": math.ceil(disk.cache * CACHE_HEADROOM[0] + CACHE_HEADROOM[1]),
              "scratch": math.ceil(disk.scratch * SCRATCH_HEADROOM[0] + SCRATCH_HEADROOM[1])}
    on_disk = 0
    for volume in job["spec"]["template"]["spec"]["volumes"]:
        empty_dir = volume.get("emptyDir")
        if empty_dir is None or empty_dir.get("medium") == "Memory":
            continue
        if volume["name"] in limits:
            empty_dir["sizeLimit"] = f"{limits[volume['name']]}Gi"
        on_disk += _gib(empty_dir["sizeLimit"])
    resources = _container(job)["resources"]
    resources["requests"]["ephemeral-storage"] = f"{on_disk}Gi"
    resources["limits"]["ephemeral-storage"] = f"{on_disk + CONTAINER_WRITES_GIB}Gi"
    return job


def _scale(quantity: str, factor: int) -> str:
    """'32Gi' x 8 -> '256Gi': the base Job's requests are per GPU."""
    match = _QUANTITY.match(str(quantity))
    if not match:
        raise RenderError(f"cannot scale the quantity {quantity!r} of k8s/base/job.yaml by the GPU count")
    return f"{int(match[1]) * factor}{match[2]}"


def scale_to_gpus(job: dict, gpus: int) -> dict:
    """The Job with its GPUs, CPU, memory and /dev/shm multiplied for `gpus` training processes."""
    job = json.loads(json.dumps(job))
    resources = _container(job)["resources"]
    for bound in ("requests", "limits"):
        for name in ("cpu", "memory"):
            resources[bound][name] = _scale(resources[bound][name], gpus)
        resources[bound]["nvidia.com/gpu"] = str(gpus)
    for volume in job["spec"]["template"]["spec"]["volumes"]:
        if volume["name"] == "dshm":  # NCCL and data loader workers of every process share it
            volume["emptyDir"]["sizeLimit"] = _scale(volume["emptyDir"]["sizeLimit"], gpus)
    return job


def _with_shutdown_timeout(env: list[dict], pod: dict) -> list[dict]:
    """torchrun gives its workers 30 s after a SIGTERM before it kills them; give them the pod's
    grace period (less a margin for torchrun itself), so they can finish a step and checkpoint."""
    seconds = max(pod.get("terminationGracePeriodSeconds", 30) - 30, 30)
    return env + [{"name": "TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "value": str(seconds)}]


def torchrun_args(layout: Layout, *, rdzv_endpoint: str | None = None, rdzv_id: str | None = None) -> list[str]:
    """Arguments to the image's `job` entrypoint: one process per GPU under `job launch torchrun`.

    One host: a standalone rendezvous on the pod itself. Several: c10d at rdzv_endpoint, the store
    hosted by the pod whose name that endpoint resolves to.
    """
    args = ["launch", "torchrun", "--nnodes", str(layout.nodes), "--nproc-per-node", str(layout.gpus_per_node)]
    if layout.nodes == 1:
        args.append("--standalone")
    else:
        args += ["--rdzv-backend", "c10d", "--rdzv-endpoint", str(rdzv_endpoint), "--rdzv-id", str(rdzv_id),
                 "--rdzv-conf", f"join_timeout={RDZV_JOIN_TIMEOUT_S}"]
    return args + ["-m", "job.cli", "run"]


def rendezvous_endpoint(name: str, namespace: str, cluster_domain: str = CLUSTER_DOMAIN) -> str:
    """Pod 0 of the Indexed Job `name` through the headless Service of the same name.

    The full name is what pod 0 finds in its own /etc/hosts, so torchrun there knows at once that it
    hosts the store, even before the cluster DNS has its record.
    """
    return f"{name}-0.{name}.{namespace}.svc.{cluster_domain}:{RDZV_PORT}"


def distribute(job: dict, layout: Layout, *, cluster_domain: str = CLUSTER_DOMAIN) -> dict:
    """The Job for its layout: unchanged for one GPU; `job launch torchrun` for several; for several
    hosts an Indexed Job (one pod per host) whose pods meet at pod 0 through the headless Service."""
    if not layout.distributed:
        return job
    job = scale_to_gpus(job, layout.gpus_per_node)
    container = _container(job)
    container["env"] = _with_shutdown_timeout(container["env"], job["spec"]["template"]["spec"])
    if layout.nodes == 1:
        container["args"] = torchrun_args(layout)
        return job
    name, namespace = job["metadata"]["name"], job["metadata"]["namespace"]
    spec = job["spec"]
    template = spec.pop("template")
    spec.update({
        "completionMode": "Indexed",
        "completions": layout.nodes,
        "parallelism": layout.nodes,
        # One pod per index at a time: a replacement starts once the old pod has finished its
        # checkpoint, and never shares its host name with it. (Required with podFailurePolicy.)
        "podReplacementPolicy": "Failed",
        # Losing pod 0 ends the rendezvous of every other pod: each may fail once per disruption.
        "backoffLimit": spec["backoffLimit"] * layout.nodes,
        "template": template,
    })
    template["spec"]["subdomain"] = name
    container["args"] = torchrun_args(layout, rdzv_endpoint=rendezvous_endpoint(name, namespace, cluster_domain),
                                      rdzv_id=name)
    return job


def peer_manifests(name: str, namespace: str, root: Path | None = None) -> list[dict]:
    """The headless Service that names pod 0, and the NetworkPolicy that lets the run's pods reach each other."""
    directory = (root or manifest_dir()) / "distributed"
    instance = {"app.kubernetes.io/instance": name}
    service = _read_yaml(directory / "service.yaml")
    service["metadata"].update(name=name, namespace=namespace)
    service["metadata"]["labels"].update(instance)
    service["spec"]["selector"].update(instance)
    policy = _read_yaml(directory / "networkpolicy.yaml")
    policy["metadata"].update(name=f"{name}-peers", namespace=namespace)
    policy["metadata"]["labels"].update(instance)
    policy["spec"]["podSelector"]["matchLabels"].update(instance)
    for rule in policy["spec"]["ingress"]:
        for peer in rule["from"]:
            peer["podSelector"]["matchLabels"].update(instance)
    return [policy, service]


def trainjob_manifest(job: dict, layout: Layout, runtime: str = TRAINER_RUNTIME) -> dict:
    """A Kubeflow Trainer TrainJob that runs what `job` (one experiment's Job) runs, on layout.

    The runtime's torch plugin hands torchrun the node count, rank and master address (PET_* env);
    everything else (image, env, resources per node, placement, security context, volumes) comes
    from the Job, patched onto the runtime's `node` container.
    """
    name = job["metadata"]["name"]
    if not _RFC1035.match(name):
        raise RenderError(f"a TrainJob's name must start with a letter; {name!r} does not (pass --run-id)")
    job = scale_to_gpus(job, layout.gpus_per_node)
    template = job["spec"]["template"]
    pod = template["spec"]
    container = _container(job)
    pod_patch = {key: pod[key] for key in ("serviceAccountName", "terminationGracePeriodSeconds", "securityContext",
                                           "nodeSelector", "tolerations", "volumes") if key in pod}
    pod_patch["containers"] = [{"name": TRAINER_CONTAINER, "securityContext": container["securityContext"],
                                "volumeMounts": container["volumeMounts"]}]
    node_patch = {"name": TRAINER_CONTAINER,
                  "template": {"spec": {"template": {"metadata": {"labels": template["metadata"]["labels"]},
                                                     "spec": pod_patch}}}}
    return {
        "apiVersion": TRAINER_API,
        "kind": "TrainJob",
        "metadata": {key: job["metadata"][key] for key in ("name", "namespace", "labels")},
        "spec": {
            "runtimeRef": {"name": runtime},
            "activeDeadlineSeconds": job["spec"]["activeDeadlineSeconds"],
            "trainer": {
                "image": container["image"],
                "command": ["job", "launch", "torchrun", "-m", "job.cli", "run"],
                "numNodes": layout.nodes,
                "numProcPerNode": layout.gpus_per_node,
                "resourcesPerNode": container["resources"],
                "env": _with_shutdown_timeout(container["env"], pod),
            },
            "runtimePatches": [{
                "manager": "job-cli",
                "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [node_patch]}}},
            }],
        },
    }


def render(spec_ref: str, *, spec_text: str | None = None, overlay: str | None = None,
           sweeps: list[str] = (), sets: list[str] = (), image: str | None = None,
           namespace: str | None = None, run_id: str | None = None,
           env: dict[str, str] | None = None, layout: Layout = Layout(), fmt: str = "job",
           runtime: str = TRAINER_RUNTIME, cluster_domain: str = CLUSTER_DOMAIN,
           disk: Disk | None = None, root: Path | None = None) -> list[dict]:
    """The ingress-denying NetworkPolicy, then per experiment a ConfigMap holding a local spec and its
    Job (fmt "job") or TrainJob (fmt "trainjob"); runs on several hosts also get a NetworkPolicy that
    lets their pods reach each other and, as Jobs, the headless Service that names pod 0.

    spec_ref is a local path (its text is passed as spec_text) or an s3:// or https:// URI, which
    the Job reads itself through JOB_SPEC_URI. `disk`, the run's predicted peak (the largest of the experiments'),
    sizes the cache and scratch volumes; without it they keep k8s/base/job.yaml's sizes.
    """
    if fmt not in FORMATS:
        raise RenderError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    remote = is_remote(spec_ref)
    spec = None
    if not remote:
        if spec_text is None:
            raise RenderError("a local spec needs its text")
        try:
            spec = yaml.safe_load(spec_text)
        except yaml.YAMLError as e:
            raise RenderError(f"{spec_ref} is not YAML: {e}") from None
        if not isinstance(spec, dict):
            raise RenderError(f"{spec_ref} must hold a YAML mapping")
        if isinstance(spec.get("model"), dict) and spec["model"].get("token"):
            # A ConfigMap is readable by anyone who may read the namespace: the token goes in the hf-token Secret.
            raise RenderError(f"{spec_ref}: model.token must not be rendered into a ConfigMap; remove it from the "
                              "spec and put the token in the hf-token Secret (env HF_TOKEN), see docs/deploy.md")
    # Pod i of an Indexed Job is named <job>-<i>, which must stay a DNS label too.
    limit = MAX_NAME - len(f"-{layout.nodes - 1}") if layout.nodes > 1 else MAX_NAME
    base_id = (slug(run_id) if run_id else base_run_id(spec_ref, spec))[:limit].rstrip("-")
    if not _DNS_LABEL.match(base_id):
        raise RenderError(f"run id {base_id!r} is not a DNS-1123 label")
    fixed = dict(parse_assignment(s) for s in sets)
    points = experiments(base_id, [parse_sweep(s) for s in sweeps], fixed, limit=limit)
    template = base_job(overlay, root)
    if disk is not None:
        template = size_storage(template, disk)
    namespace = namespace or kustomization(root).get("namespace", "default")
    image = image or default_image(root)
    policy = _read_yaml((root or manifest_dir()) / "base" / "networkpolicy.yaml")
    policy["metadata"]["namespace"] = namespace
    docs: list[dict] = [policy]  # shared by every run; applying it again changes nothing
    for point in points:
        if remote:
            spec_env = {"name": "JOB_SPEC_URI", "value": spec_ref}
        else:
            cm_name = f"{point.run_id}-spec"
            docs.append(spec_configmap(cm_name, namespace, spec_text, point.run_id))
            spec_env = {"name": "JOB_SPEC",
                        "valueFrom": {"configMapKeyRef": {"name": cm_name, "key": SPEC_KEY}}}
        job = job_manifest(template, point, namespace=namespace, image=image,
                           spec_env=spec_env, extra_env=dict(env or {}))
        peers = peer_manifests(point.run_id, namespace, root) if layout.nodes > 1 else []
        if fmt == "trainjob":
            docs += peers[:1] + [trainjob_manifest(job, layout, runtime)]  # the Trainer makes its own Service
        else:
            docs += peers + [distribute(job, layout, cluster_domain=cluster_domain)]
    return docs


class _Dumper(yaml.SafeDumper):
    """Quotes every string a YAML 1.2 reader (kubectl) could take for a number, bool or null:
    PyYAML leaves `1e-4` bare, and Kubernetes would then read an env value as a float."""


_PLAIN_RISK = re.compile(r"^([-+]?[.0-9]|~$|(true|false|yes|no|on|off|null|y|n)$)", re.IGNORECASE)


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    if "\n" in value:
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|")
    style = "'" if _PLAIN_RISK.match(value) else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def dump(docs: list[dict]) -> str:
    """A multi-document YAML stream for `kubectl apply -f -`."""
    return yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=1000)
