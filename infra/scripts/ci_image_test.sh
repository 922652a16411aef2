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
base_tag=bge-m3-ci/debian-python:$DEBIAN_SUITE
lambda_tag=bge-m3-ci/lambda:test
gpu_tag=bge-m3-ci/gpu:test
# shellcheck source=infra/scripts/docker_lib.sh
source "$root/infra/scripts/docker_lib.sh"

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
  stop_dockerd
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

free_port() {
  "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# ---- 1. Docker engine ---------------------------------------------------------------------------
stage "prerequisites: docker.io, debootstrap"
docker_prerequisites

stage "start dockerd (data, exec root and socket under $work)"
start_dockerd "$work/data"

# ---- 2. stand-in base ---------------------------------------------------------------------------
stage "debootstrap a minimal Debian $DEBIAN_SUITE with python3 (stand-in base)"
make_base_image "$base_tag"
base_python "$base_tag"

# ---- 3. wheels ----------------------------------------------------------------------------------
stage "download wheels for cp${py_version/./} / glibc $glibc / $(uname -m)"
infra/scripts/install_deps.sh requirements >"$work/requirements-lambda.txt"
infra/scripts/install_deps.sh requirements --ort "onnxruntime==$GPU_ORT_VERSION" \
  >"$work/requirements-gpu.txt"
download_wheels "$ctx/wheels" "$work/requirements-lambda.txt" "$work/requirements-gpu.txt"

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
build_lambda_image "$lambda_tag" "$base_tag" "$ctx_rel/model-int8" "$ctx_rel/wheels" \
  "$work/build-lambda.log"

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
