"""Shared helpers for the deploy checks: the repo paths, the external tools, schema validation.

Tools: kubectl (kustomize built in), terraform, checkov and SkyPilot, each of the last two in a venv
of its own (tests/deploy/setup-tools.sh installs them; CHECKOV and SKY_PYTHON override the paths).
Kubeflow Trainer's CRDs come from ../shared/schemas/kubeflow-trainer/ (see its README for their origin).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
TERRAFORM = ROOT / "terraform"
# A pinned, current Kubernetes: GKE and EKS both offer it; kubernetes-validate bundles its schemas.
K8S_VERSION = "1.33"
TRAINER_SCHEMAS = ROOT.parent / "shared" / "schemas" / "kubeflow-trainer"


def checkov_path() -> str | None:
    path = os.environ.get("CHECKOV") or str(ROOT / ".venv-checkov" / "bin" / "checkov")
    return path if Path(path).is_file() else shutil.which("checkov")


def sky_python() -> str | None:
    path = os.environ.get("SKY_PYTHON") or str(ROOT / ".venv-sky" / "bin" / "python")
    return path if Path(path).is_file() else None


def require(tool: str | None, name: str) -> str:
    if not tool:
        pytest.skip(f"{name} is not installed; run tests/deploy/setup-tools.sh")
    return tool


def validate_k8s(doc: dict) -> None:
    """Strict schema validation: unknown fields fail too."""
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def run_checkov(directory: Path, framework: str, extra: list[str] = ()) -> dict:
    """checkov's JSON report for a directory; a failed check fails the caller's assertion."""
    checkov = require(checkov_path(), "checkov")
    proc = subprocess.run(
        [checkov, "-d", str(directory), "--framework", framework, "-o", "json", "--quiet",
         "--compact", "--skip-download", *extra],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": "false"},
    )
    if proc.returncode not in (0, 1):
        raise AssertionError(f"checkov failed to run ({proc.returncode}): {proc.stderr[-2000:]}")
    out = proc.stdout.strip()
    if not out or out == "[]":
        return {"passed": 0, "failed": [], "skipped": 0, "parsing_errors": 0, "resources": 0}
    reports = json.loads(out)
    reports = reports if isinstance(reports, list) else [reports]
    failed, passed, skipped, parsing, resources = [], 0, 0, 0, 0
    for report in reports:
        summary = report.get("summary", {})
        passed += summary.get("passed", 0)
        skipped += summary.get("skipped", 0)
        parsing += summary.get("parsing_errors", 0)
        resources += summary.get("resource_count", 0)
        for check in report.get("results", {}).get("failed_checks", []):
            failed.append(f"{check['check_id']} {check['resource']} {check.get('file_path')}: {check['check_name']}")
    return {"passed": passed, "failed": failed, "skipped": skipped, "parsing_errors": parsing,
            "resources": resources}


def kustomize(path: Path) -> list[dict]:
    kubectl = require(shutil.which("kubectl"), "kubectl")
    out = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, check=True)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def write_docs(directory: Path, docs: list[dict]) -> None:
    """One file per object, as checkov and kubectl read them."""
    directory.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(docs):
        (directory / f"{i:02d}-{doc['kind'].lower()}.yaml").write_text(yaml.safe_dump(doc))


def _strict(schema: dict) -> dict:
    """An OpenAPI v3 schema of a CRD as the API server applies it with `kubectl apply --validate=strict`:
    an object that lists its properties and neither allows nor preserves other fields rejects them."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [_strict(v) for v in schema]
    return schema


@cache
def _crd(filename: str) -> dict:
    path = TRAINER_SCHEMAS / filename
    if not path.is_file():
        pytest.skip(f"{path} is missing (../shared/schemas beside the checkout)")
    return next(d for d in yaml.safe_load_all(path.read_text()) if d)


def validate_crd(doc: dict, filename: str) -> None:
    """A custom resource against the CRD in TRAINER_SCHEMAS/filename: its group, version and kind, the
    strict openAPIV3Schema, and the CRD's top-level CEL rules (those on metadata.name). CEL rules deeper
    in the schema are not evaluated here (no CEL engine): tests check the values they guard themselves."""
    crd = _crd(filename)
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    version = next(v for v in crd["spec"]["versions"] if f"{group}/{v['name']}" == doc["apiVersion"])
    assert doc["kind"] == kind
    schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
    rules = schema.get("x-kubernetes-validations", [])
    jsonschema.Draft7Validator(_strict(schema)).validate(doc)
    name = doc["metadata"]["name"]
    for rule in (r["rule"] for r in rules):
        if match := re.fullmatch(r"self\.metadata\.name\.matches\('(.+)'\)", rule):
            assert re.fullmatch(match[1].replace("\\\\", "\\"), name), f"{name!r} breaks {rule}"
        elif match := re.fullmatch(r"size\(self\.metadata\.name\) <= (\d+)", rule):
            assert len(name) <= int(match[1]), f"{name!r} breaks {rule}"
        else:
            raise AssertionError(f"a name rule this check cannot read: {rule}")
