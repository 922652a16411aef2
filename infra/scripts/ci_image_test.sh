#!/usr/bin/env bash
# Build the Lambda (CPU) and GPU images for real and run them: what `make test-image` and CI run.
#
# No registry is reachable here, and pip inside a container cannot reach the index (the proxy's CA
# is trusted by the host only), so everything an image needs is made on the host first:
#   1. docker.io + debootstrap from apt (if missing); our own dockerd, with its data root, exec
#      root, pid file and socket in a temp dir (no systemd), no iptables, no bridge;
#   2. a minimal Debian with python3 (debootstrap), `docker import`ed as the stand-in base;
#   3. wheels for the base's Python and platform (`pip download`): requirements.txt, and the same
#      with onnxruntime swapped for the CPU build of the GPU image's version;
#   4. the model, by infra/scripts/build_model.sh from the BGE-M3-layout fixture (tiny, random
#      weights): int8 for the Lambda image, fp16 for the GPU image;
#   5. the Lambda image (BASE_IMAGE=stand-in, MODEL_STAGE=model-prebuilt, WHEELS_DIR), then, as a
#      non-root user on a read-only root file system (as Lambda runs it):
#      handler.lambda_function.handler called with every captured event in tests/data/lambda_events,
#      uvicorn on a loopback port with one request per dialect, no torch/transformers, the size;
#   6. the GPU image with the stand-in base and ORT_PACKAGE=onnxruntime (no CUDA here): the app
#      must start with DEVICE=cuda, fall back to CPU with a logged warning, and answer.
# dockerd is stopped and every temp file removed at the end, whatever happens (trap). Nothing is
# cached between runs.
#
# Environment: PYTHON (host interpreter with requirements-build.txt; default python3),
# DEBIAN_SUITE (bookworm), DEBIAN_MIRROR (http://deb.debian.org/debian), DOCKER (the docker CLI;
# default Debian's /usr/bin/docker, whose built-in BuildKit needs no buildx plugin),
# CI_IMAGE_KEEP=1 keeps the temp dir (not the daemon) for a look afterwards, and
# CI_IMAGE_MODEL_INT8=DIR bakes that int8 model directory into the Lambda image instead of the
# tiny fixture build (to see the shipped image's size and init time).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
PYTHON=${PYTHON:-python3}
DEBIAN_SUITE=${DEBIAN_SUITE:-bookworm}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
# The GPU image's onnxruntime version (infra/gpu.Dockerfile ORT_PACKAGE), as a CPU build.
GPU_ORT_VERSION=$(sed -n 's/^ARG ORT_PACKAGE=onnxruntime-gpu==//p' infra/gpu.Dockerfile)

work=$(mktemp -d /tmp/bge-m3-image-ci.XXXXXX)
ctx_rel=build/ci-image-$$ # wheels and models must sit inside the build context (the repo root)
ctx=$root/$ctx_rel
sock=$work/docker.sock
export DOCKER_HOST=unix://$sock
base_tag=bge-m3-ci/debian-python:$DEBIAN_SUITE
lambda_tag=bge-m3-ci/lambda:test
gpu_tag=bge-m3-ci/gpu:test
containers=()
dockerd_pid=""

# ---- progress and timings -----------------------------------------------------------------------
t_start=$(date +%s)
stage_name="" stage_t=0
timings=()
end_stage() {
  if [ -n "$stage_name" ]; then
    timings+=("$(printf '%5ss  %s' $(($(date +%s) - stage_t)) "$stage_name")")
  fi
  stage_name=""
}
stage() {
  end_stage
  stage_name=$1
  stage_t=$(date +%s)
  printf '\n==== [%4ss] %s\n' $((stage_t - t_start)) "$1"
}
die() {
  echo "ci_image_test: $*" >&2
  exit 1
}

cleanup() {
  local rc=$?
  set +e
  end_stage
  if [ -n "$dockerd_pid" ]; then
    for c in "${containers[@]}"; do
      "$DOCKER" rm -f "$c" >/dev/null 2>&1
    done
    echo "---- stopping dockerd ($dockerd_pid)"
    kill "$dockerd_pid" 2>/dev/null
    for _ in $(seq 1 30); do
      kill -0 "$dockerd_pid" 2>/dev/null || break
      sleep 1
    done
    kill -9 "$dockerd_pid" 2>/dev/null
    # dockerd stops the containerd it started; if it was killed, that one is still running.
    local containerd_pid
    containerd_pid=$(cat "$work/exec/containerd/containerd.pid" 2>/dev/null)
    if [ -n "$containerd_pid" ] && kill -0 "$containerd_pid" 2>/dev/null; then
      kill "$containerd_pid" 2>/dev/null
    fi
    # Mounts a killed daemon may leave behind, deepest first.
    awk -v w="$work" 'index($2, w) == 1 { print $2 }' /proc/mounts | sort -r |
      while read -r mnt; do umount -l "$mnt" 2>/dev/null; done
  fi
  if [ $rc -ne 0 ] && [ -f "$work/dockerd.log" ]; then
    echo "---- last lines of dockerd.log"
    tail -n 20 "$work/dockerd.log"
  fi
  rm -rf "$ctx"
  rmdir "$root/build" 2>/dev/null # and build/ itself if that left it empty
  if [ "${CI_IMAGE_KEEP:-0}" = 1 ]; then
    echo "---- kept $work"
  else
    rm -rf "$work"
  fi
  echo
  echo "==== stage timings"
  printf '%s\n' "${timings[@]}"
  printf '%5ss  total (exit %s)\n' $(($(date +%s) - t_start)) "$rc"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The steps of a build and what our scripts printed; the whole log when it failed.
build_summary() {
  grep -E '^#[0-9]+ \[|^#[0-9]+ [0-9.]+ (check_|install_deps|ensure_python)' "$1" | cut -c1-160 || true
}
build_failed() {
  tail -n 60 "$1"
  die "docker build failed (log above)"
}

free_port() {
  "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# ---- 1. Docker engine ---------------------------------------------------------------------------
stage "prerequisites: docker.io, debootstrap"
need=()
command -v dockerd >/dev/null 2>&1 || need+=(docker.io)
command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
if [ "${#need[@]}" -gt 0 ]; then
  [ "$(id -u)" = 0 ] || die "need root to apt-get install ${need[*]}"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}"
fi
[ "$(id -u)" = 0 ] || die "dockerd and debootstrap need root"
# Debian's CLI builds with the daemon's built-in BuildKit (DOCKER_BUILDKIT=1); a newer CLI without
# the buildx plugin refuses to use BuildKit at all, and the classic builder runs every stage.
DOCKER=${DOCKER:-$(command -v /usr/bin/docker || command -v docker)}
if "$DOCKER" buildx version >/dev/null 2>&1; then
  build() { "$DOCKER" buildx build --load --provenance=false --sbom=false "$@"; }
else
  build() { DOCKER_BUILDKIT=1 "$DOCKER" build "$@"; }
fi
echo "dockerd: $(dockerd --version); CLI: $DOCKER"

stage "start dockerd (data, exec root and socket under $work)"
dockerd --data-root "$work/data" --exec-root "$work/exec" --pidfile "$work/dockerd.pid" \
  -H "unix://$sock" --iptables=false --ip-masq=false --bridge=none \
  >"$work/dockerd.log" 2>&1 &
dockerd_pid=$!
for _ in $(seq 1 60); do
  "$DOCKER" version >/dev/null 2>&1 && break
  kill -0 "$dockerd_pid" 2>/dev/null || die "dockerd exited; see the log above"
  sleep 1
done
"$DOCKER" version --format 'engine {{.Server.Version}} on {{.Server.Os}}/{{.Server.Arch}}' ||
  die "dockerd did not answer on $sock"

# ---- 2. stand-in base ---------------------------------------------------------------------------
stage "debootstrap a minimal Debian $DEBIAN_SUITE with python3 (stand-in base)"
if ! debootstrap --variant=minbase --include=python3,python3-pip "$DEBIAN_SUITE" \
  "$work/rootfs" "$DEBIAN_MIRROR" >"$work/debootstrap.log" 2>&1; then
  tail -n 30 "$work/debootstrap.log"
  die "debootstrap failed"
fi
rm -rf "$work"/rootfs/var/cache/apt/archives/*.deb "$work"/rootfs/var/lib/apt/lists/*
py_version=$(chroot "$work/rootfs" python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
glibc=$(chroot "$work/rootfs" python3 -c 'import platform; print(platform.libc_ver()[1])')
echo "rootfs: $(du -sh "$work/rootfs" | cut -f1), python $py_version, glibc $glibc"
tar -C "$work/rootfs" -c . | "$DOCKER" import - "$base_tag" >/dev/null
rm -rf "$work/rootfs"
"$DOCKER" image ls "$base_tag"

# ---- 3. wheels ----------------------------------------------------------------------------------
stage "download wheels for cp${py_version/./} / glibc $glibc / $(uname -m)"
mkdir -p "$ctx/wheels"
platforms=()
for minor in $(seq "${glibc#2.}" -1 17); do
  platforms+=(--platform "manylinux_2_${minor}_$(uname -m)")
done
platforms+=(--platform "manylinux2014_$(uname -m)" --platform "linux_$(uname -m)")
download() {
  # (pip's notes about index locations that do not exist on this host are dropped)
  "$PYTHON" -m pip download --quiet --disable-pip-version-check --only-binary=:all: \
    --python-version "$py_version" --implementation cp "${platforms[@]}" -d "$ctx/wheels" \
    -r "$1" 2>&1 | { grep -v 'is ignored: it is neither a file nor a directory' || true; }
}
infra/scripts/install_deps.sh requirements >"$work/requirements-lambda.txt"
infra/scripts/install_deps.sh requirements --ort "onnxruntime==$GPU_ORT_VERSION" \
  >"$work/requirements-gpu.txt"
download "$work/requirements-lambda.txt"
download "$work/requirements-gpu.txt"
echo "$(find "$ctx/wheels" -name '*.whl' | wc -l) wheels, $(du -sh "$ctx/wheels" | cut -f1)"

# ---- 4. models ----------------------------------------------------------------------------------
stage "build the models from the BGE-M3-layout fixture (tiny): int8 and fp16"
"$PYTHON" -m model_build.fixture --out "$work/fixture" --size tiny
precisions=(int8 fp16)
if [ -n "${CI_IMAGE_MODEL_INT8:-}" ]; then
  # A real int8 model built beforehand (say, `make build-model`): size and init time as shipped.
  [ -f "$CI_IMAGE_MODEL_INT8/manifest.json" ] || die "no manifest.json in $CI_IMAGE_MODEL_INT8"
  echo "Lambda image model: $CI_IMAGE_MODEL_INT8 ($(du -sh "$CI_IMAGE_MODEL_INT8" | cut -f1))"
  cp -a "$CI_IMAGE_MODEL_INT8" "$ctx/model-int8"
  precisions=(fp16)
fi
for precision in "${precisions[@]}"; do
  PYTHON=$PYTHON infra/scripts/build_model.sh --source "$work/fixture" --recipe bge-m3 \
    --precision "$precision" --out "$ctx/model-$precision" 2>&1 | tail -n 8
  [ -f "$ctx/model-$precision/manifest.json" ] || die "no $precision model was built"
done

# ---- 5. Lambda image ----------------------------------------------------------------------------
stage "build infra/lambda.Dockerfile (stand-in base, prebuilt int8 model, offline wheels)"
build --network host --progress plain -f infra/lambda.Dockerfile -t "$lambda_tag" \
  --build-arg BASE_IMAGE="$base_tag" \
  --build-arg ARCH="$(uname -m)" \
  --build-arg MODEL_STAGE=model-prebuilt \
  --build-arg MODEL_DIR="$ctx_rel/model-int8" \
  --build-arg WHEELS_DIR="$ctx_rel/wheels" \
  . >"$work/build-lambda.log" 2>&1 || build_failed "$work/build-lambda.log"
build_summary "$work/build-lambda.log"

# As Lambda runs it: a non-root user, a read-only root file system with a writable /tmp.
lambda_run=(--user 993:990 --read-only --tmpfs /tmp
  -e AWS_LAMBDA_FUNCTION_NAME=bge-m3-ci -e AWS_LAMBDA_FUNCTION_MEMORY_SIZE=4096
  -e AWS_REGION=us-east-1)

stage "Lambda image: handler.lambda_function.handler with the captured events (non-root, no network)"
"$DOCKER" run --rm --network none "${lambda_run[@]}" \
  -v "$root/tests/data/lambda_events:/events:ro" -v "$root/infra/scripts:/ci:ro" \
  --entrypoint python3 "$lambda_tag" /ci/image_smoke.py lambda /events |
  grep -v '^{' # the JSON request log lines; the check lines remain

stage "Lambda image: no torch / transformers; contents"
"$DOCKER" run --rm --network none "${lambda_run[@]}" -v "$root/infra/scripts:/ci:ro" \
  --entrypoint bash "$lambda_tag" -c \
  'PYTHON=python3 /ci/check_no_torch.sh /var/task && du -sh /var/task /opt/model && ls -l /opt/model'

stage "Lambda image: uvicorn on a loopback port, one request per dialect"
port=$(free_port)
containers+=(bge-m3-ci-lambda-http)
"$DOCKER" run -d --name bge-m3-ci-lambda-http --network host "${lambda_run[@]}" \
  -e HOST=127.0.0.1 -e PORT="$port" --entrypoint python3 "$lambda_tag" -m handler.main >/dev/null
if ! "$PYTHON" infra/scripts/image_smoke.py http "http://127.0.0.1:$port" --device cpu --wait 120; then
  "$DOCKER" logs bge-m3-ci-lambda-http 2>&1 | tail -n 40
  die "the Lambda image did not serve"
fi
"$DOCKER" rm -f bge-m3-ci-lambda-http >/dev/null

stage "Lambda image: size and layers"
size=$("$DOCKER" image inspect -f '{{.Size}}' "$lambda_tag")
base_size=$("$DOCKER" image inspect -f '{{.Size}}' "$base_tag")
echo "image $lambda_tag: $((size / 1000000)) MB (stand-in base $((base_size / 1000000)) MB," \
  "so $(((size - base_size) / 1000000)) MB of ours: dependencies, model, code)"
"$DOCKER" history --format '{{.Size}}\t{{.CreatedBy}}' "$lambda_tag" | head -n 8 | cut -c1-150

# ---- 6. GPU image, CPU stand-in -----------------------------------------------------------------
stage "build infra/gpu.Dockerfile (stand-in base, onnxruntime==$GPU_ORT_VERSION for -gpu, fp16)"
build --network host --progress plain -f infra/gpu.Dockerfile -t "$gpu_tag" \
  --build-arg BASE_IMAGE="$base_tag" \
  --build-arg ORT_PACKAGE="onnxruntime==$GPU_ORT_VERSION" \
  --build-arg MODEL_STAGE=model-prebuilt \
  --build-arg MODEL_DIR="$ctx_rel/model-fp16" \
  --build-arg WHEELS_DIR="$ctx_rel/wheels" \
  . >"$work/build-gpu.log" 2>&1 || build_failed "$work/build-gpu.log"
build_summary "$work/build-gpu.log"

stage "GPU image: DEVICE=cuda without CUDA falls back to CPU (logged) and serves every dialect"
port=$(free_port)
containers+=(bge-m3-ci-gpu)
# The image's own CMD, user (1000) and DEVICE=cuda; only the port is ours.
"$DOCKER" run -d --name bge-m3-ci-gpu --network host --read-only --tmpfs /tmp \
  -e HOST=127.0.0.1 -e PORT="$port" "$gpu_tag" >/dev/null
if ! "$PYTHON" infra/scripts/image_smoke.py http "http://127.0.0.1:$port" --device cpu --wait 120; then
  "$DOCKER" logs bge-m3-ci-gpu 2>&1 | tail -n 40
  die "the GPU image did not serve"
fi
gpu_logs=$("$DOCKER" logs bge-m3-ci-gpu 2>&1)
warning=$(grep -E 'WARNING.*(falling back to CPU|running on CPU)' <<<"$gpu_logs" | head -n 1 || true)
[ -n "$warning" ] || {
  echo "$gpu_logs" | tail -n 40
  die "no logged warning about the fallback from CUDA to CPU"
}
echo "ok   logged: $warning"
"$DOCKER" run --rm --network none --entrypoint bash -v "$root/infra/scripts:/ci:ro" "$gpu_tag" \
  -c 'PYTHON=python3 /ci/check_no_torch.sh /app'
"$DOCKER" rm -f bge-m3-ci-gpu >/dev/null
echo "image $gpu_tag: $(($("$DOCKER" image inspect -f '{{.Size}}' "$gpu_tag") / 1000000)) MB (stand-in base)"

end_stage
echo
echo "ci_image_test: all image checks passed"
