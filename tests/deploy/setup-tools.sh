#!/usr/bin/env bash
# Tools for tests/deploy that are not Python test dependencies: checkov in a venv of its own
# (it ships its own top-level `hcl2` module, which would overwrite python-hcl2's), and SkyPilot in
# another (its task loader validates the rendered task YAML; it pins its own click, pydantic, ...).
# kubectl (with kustomize built in) and terraform are expected on PATH; the AWS provider is read from
# TF_PLUGIN_DIR when the registry is unreachable.
set -euo pipefail
cd "$(dirname "$0")/../.."
# pip here also reads two local index folders and warns for every package they lack: noise, not errors.
quiet_pip() { "$@" 2>&1 | { grep -v 'is ignored: it is neither a file nor a directory' || true; }; }
CHECKOV_VERSION=3.3.30
if [[ ! -x .venv-checkov/bin/checkov ]] || ! .venv-checkov/bin/checkov --version | grep -qx "$CHECKOV_VERSION"; then
  python3 -m venv .venv-checkov
  quiet_pip .venv-checkov/bin/pip install --quiet "checkov==$CHECKOV_VERSION"
fi
.venv-checkov/bin/checkov --version
SKYPILOT_VERSION=0.14.1
if [[ ! -x .venv-sky/bin/python ]] || ! .venv-sky/bin/python -c "import importlib.metadata as m, sys; sys.exit(m.version('skypilot') != '$SKYPILOT_VERSION')" 2>/dev/null; then
  python3 -m venv .venv-sky
  quiet_pip .venv-sky/bin/pip install --quiet "skypilot==$SKYPILOT_VERSION"
fi
.venv-sky/bin/python -c "import importlib.metadata as m; print('skypilot', m.version('skypilot'))"
command -v kubectl >/dev/null || { echo "kubectl missing (needs 1.27+ for podFailurePolicy fields in kustomize)"; exit 1; }
command -v terraform >/dev/null || { echo "terraform missing (1.5+)"; exit 1; }
kubectl version --client
terraform version
