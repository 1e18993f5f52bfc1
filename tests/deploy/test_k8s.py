"""`job k8s render` and the kustomize overlays: schema-valid, checkov-clean, and the same Job."""

from __future__ import annotations

import copy
import re

import pytest
import yaml
from click.testing import CliRunner

from job import errors
from job.deploy import k8s
from job.cli.k8s import k8s as k8s_group

from deploy_tools import K8S, kustomize, run_checkov, validate_k8s, write_docs

SPEC = K8S / "base" / "spec.yaml"
SWEEP = ["--sweep", "training.learning_rate=1e-4,2e-4", "--sweep", "lora.r=8,16"]
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def render_cli(*args: str) -> list[dict]:
    result = CliRunner().invoke(k8s_group, ["render", *args])
    assert result.exit_code == 0, result.output
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def jobs(docs):
    return [d for d in docs if d["kind"] == "Job"]


def env_of(job: dict) -> dict:
    container = job["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


@pytest.mark.parametrize("overlay", [None, "gke", "eks"])
def test_sweep_2x2_gives_four_valid_jobs(overlay, tmp_path):
    args = [str(SPEC), *SWEEP] + (["--overlay", overlay] if overlay else [])
    docs = render_cli(*args)
    assert [d["kind"] for d in docs] == ["NetworkPolicy"] + ["ConfigMap", "Job"] * 4
    names = [j["metadata"]["name"] for j in jobs(docs)]
    assert len(set(names)) == 4
    for name in names:
        assert DNS_LABEL.match(name) and len(name) <= 63 and name.startswith("example-qlora-")
    points = {(env_of(j)["JOB__TRAINING__LEARNING_RATE"], env_of(j)["JOB__LORA__R"]) for j in jobs(docs)}
    assert points == {("1e-4", "8"), ("1e-4", "16"), ("2e-4", "8"), ("2e-4", "16")}
    for doc in docs:
        validate_k8s(doc)
    for job in jobs(docs):
        env = env_of(job)
        assert env["JOB__RUN__ID"] == job["metadata"]["name"]
        assert env["JOB_SPEC"]["configMapKeyRef"]["name"] == f"{job['metadata']['name']}-spec"
    write_docs(tmp_path, docs)
    report = run_checkov(tmp_path, "kubernetes")
    assert report["failed"] == [] and report["parsing_errors"] == 0
    assert report["passed"] > 0


def test_env_values_stay_strings_for_kubectl():
    out = CliRunner().invoke(k8s_group, ["render", str(SPEC), *SWEEP]).stdout
    # YAML 1.2 readers take a bare 1e-4 for a number; an env value must be a string.
    assert "value: '1e-4'" in out and "value: '8'" in out


def test_remote_spec_goes_in_as_uri_without_configmap():
    docs = render_cli("s3://bucket/specs/qwen-lora.yaml", "--sweep", "lora.r=8,16", "--overlay", "eks")
    assert [d["kind"] for d in docs] == ["NetworkPolicy", "Job", "Job"]
    for job in jobs(docs):
        validate_k8s(job)
        env = env_of(job)
        assert env["JOB_SPEC_URI"] == "s3://bucket/specs/qwen-lora.yaml"
        assert "JOB_SPEC" not in env
        assert job["metadata"]["name"].startswith("qwen-lora-")


def test_single_run_named_after_run_id_and_extra_env():
    docs = render_cli(str(SPEC), "--set", "training.max_steps=10", "--env", "AWS_REGION=eu-west-1",
                      "--image", "registry.example/job:1.2.3", "--namespace", "team-a")
    _, cm, job = docs
    assert job["metadata"]["name"] == "example-qlora" and job["metadata"]["namespace"] == "team-a"
    assert cm["data"]["spec.yaml"] == SPEC.read_text()
    env = env_of(job)
    assert env["JOB__TRAINING__MAX_STEPS"] == "10" and env["AWS_REGION"] == "eu-west-1"
    assert job["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.example/job:1.2.3"


def test_run_id_derived_when_spec_has_none(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text("run: {output: s3://bucket/runs}\nmodel: {name: x}\ndata: {source: s3://bucket/rows.jsonl}\n"
                    "training: {learning_rate: 1.0e-4}\n")
    names = {jobs(render_cli(str(spec)))[0]["metadata"]["name"] for _ in range(2)}
    assert len(names) == 1 and DNS_LABEL.match(names.pop())


def test_long_run_ids_are_cut_to_63():
    point = k8s.experiments("a" * 80, [("lora.r", ["8", "16"])])
    assert all(len(p.run_id) <= 63 and DNS_LABEL.match(p.run_id) for p in point)
    assert len({p.run_id for p in point}) == 2


@pytest.mark.parametrize("bad", [["--sweep", "lora.r"], ["--sweep", "lora.r=8,,16"], ["--sweep", "r=8,16"],
                                 ["--sweep", "lora.r=8,16", "--set", "lora.r=4"], ["--overlay", "aks"]])
def test_bad_arguments_are_usage_errors(bad):
    result = CliRunner().invoke(k8s_group, ["render", str(SPEC), *bad])
    assert result.exit_code == 2


def test_fail_fast_codes_match_the_runner():
    rules = k8s.base_job()["spec"]["podFailurePolicy"]["rules"]
    fail = next(r for r in rules if r["action"] == "FailJob")
    assert set(fail["onExitCodes"]["values"]) == {errors.EXIT_USER, errors.EXIT_NOT_FOUND,
                                                   errors.EXIT_VERIFICATION}
    assert errors.EXIT_TRANSIENT not in fail["onExitCodes"]["values"]
    ignore = next(r for r in rules if r["action"] == "Ignore")
    assert ignore["onPodConditions"] == [{"type": "DisruptionTarget", "status": "True"}]
    preempted = [r for r in rules if r["action"] == "Ignore" and "onExitCodes" in r]
    assert preempted[0]["onExitCodes"]["values"] == [errors.EXIT_PREEMPTED]


def test_job_hardening():
    job = k8s.base_job()
    pod = job["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert pod["restartPolicy"] == "Never" and pod["terminationGracePeriodSeconds"] >= 300
    assert job["spec"]["activeDeadlineSeconds"] and job["spec"]["ttlSecondsAfterFinished"]
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"] and sc["capabilities"]["drop"] == ["ALL"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "ephemeral-storage" in c["resources"]["requests"]
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert {"/dev/shm", "/cache", "/scratch", "/tmp"} <= mounts
    dshm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert dshm["emptyDir"]["medium"] == "Memory"


@pytest.mark.parametrize("overlay", ["base", "overlays/gke", "overlays/eks"])
def test_kustomize_builds_valid_and_checkov_clean(overlay, tmp_path):
    docs = kustomize(K8S / overlay)
    assert sorted(d["kind"] for d in docs) == ["ConfigMap", "Job", "NetworkPolicy", "ServiceAccount"]
    for doc in docs:
        validate_k8s(doc)
    write_docs(tmp_path, docs)
    report = run_checkov(tmp_path, "kubernetes")
    assert report["failed"] == [] and report["parsing_errors"] == 0


def _normalized(job: dict) -> dict:
    """The Job without what render sets per experiment (names, instance label, run env, spec ref)."""
    job = copy.deepcopy(job)
    job["metadata"] = {k: v for k, v in job["metadata"].items() if k in ("annotations", "namespace")}
    pod = job["spec"]["template"]
    pod["metadata"]["labels"].pop("app.kubernetes.io/instance", None)
    for c in pod["spec"]["containers"]:
        c["env"] = sorted((e for e in c["env"] if e["name"] not in ("JOB_SPEC", "JOB__RUN__ID")),
                          key=lambda e: e["name"])
        c["volumeMounts"] = sorted(c["volumeMounts"], key=lambda m: m["mountPath"])
    pod["spec"]["volumes"] = sorted(pod["spec"]["volumes"], key=lambda v: v["name"])
    return job


@pytest.mark.parametrize("overlay", [None, "gke", "eks"])
def test_render_builds_the_job_kustomize_builds(overlay):
    """One Job definition: render's merge of base + overlay patch equals kustomize's."""
    built = next(d for d in kustomize(K8S / (f"overlays/{overlay}" if overlay else "base")) if d["kind"] == "Job")
    rendered = jobs(k8s.render(str(SPEC), spec_text=SPEC.read_text(), overlay=overlay))[0]
    assert _normalized(rendered) == _normalized(built)


def test_env_option_replaces_the_overlay_placeholder_role():
    job = jobs(render_cli("s3://b/specs/s.yaml", "--overlay", "gke", "--env", "AWS_ROLE_ARN=arn:aws:iam::123456789012:role/x"))[0]
    names = [e["name"] for e in job["spec"]["template"]["spec"]["containers"][0]["env"]]
    assert names.count("AWS_ROLE_ARN") == 1
    assert env_of(job)["AWS_ROLE_ARN"] == "arn:aws:iam::123456789012:role/x"
    validate_k8s(job)
