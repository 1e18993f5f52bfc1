"""Kubernetes Jobs for one run or a sweep, built from the kustomize files in k8s/.

The Job is written once, in k8s/base/job.yaml; an overlay's job-patch.yaml is merged over it the
way kustomize merges a strategic merge patch, so `job k8s render` and `kubectl kustomize` give the
same Job (tests/deploy checks that). Everything here is pure: data in, manifests out.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

OVERLAYS = ("gke", "eks")
SPEC_KEY = "spec.yaml"
CONTAINER = "train"
MAX_NAME = 63  # a Job's name is also the value of its pods' job-name label
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_REMOTE = ("s3://", "https://", "http://")

# Strategic merge keys of the lists our patches touch (Kubernetes API types); other lists replace.
_MERGE_KEYS = {"containers": "name", "env": "name", "volumes": "name", "volumeMounts": "mountPath"}


class RenderError(ValueError):
    """The arguments cannot make a valid Job (bad sweep, unknown overlay, unreadable spec)."""


@dataclass(frozen=True)
class Experiment:
    run_id: str
    overrides: dict[str, str] = field(default_factory=dict)


def manifest_dir() -> Path:
    """k8s/ next to the package in a checkout, or job/data/k8s when installed as package data."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "data" / "k8s", here.parent / "k8s"):
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
                fixed: dict[str, str] | None = None) -> list[Experiment]:
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
        run_id = f"{base_id[: MAX_NAME - len(suffix) - 1].rstrip('-')}-{suffix}"
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


def render(spec_ref: str, *, spec_text: str | None = None, overlay: str | None = None,
           sweeps: list[str] = (), sets: list[str] = (), image: str | None = None,
           namespace: str | None = None, run_id: str | None = None,
           env: dict[str, str] | None = None, root: Path | None = None) -> list[dict]:
    """The ingress-denying NetworkPolicy, then per experiment a ConfigMap holding a local spec and its Job.

    spec_ref is a local path (its text is passed as spec_text) or an s3:// or https:// URI, which
    the Job reads itself through JOB_SPEC_URI.
    """
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
    base_id = slug(run_id) if run_id else base_run_id(spec_ref, spec)
    if not _DNS_LABEL.match(base_id):
        raise RenderError(f"run id {base_id!r} is not a DNS-1123 label")
    fixed = dict(parse_assignment(s) for s in sets)
    points = experiments(base_id, [parse_sweep(s) for s in sweeps], fixed)
    template = base_job(overlay, root)
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
        docs.append(job_manifest(template, point, namespace=namespace, image=image,
                                 spec_env=spec_env, extra_env=dict(env or {})))
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
