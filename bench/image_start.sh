#!/usr/bin/env bash
# The cold start inside the Lambda image, warm and cold page cache: run by bench/image_start.py
# (`python -m bench.image_start`), which reads what this prints on stdout.
#
#   bench/image_start.sh --model DIR --tag TAG --data-root DIR --rounds N --spec JSON
#                        [--states "cold warm cold-model host"] [--run-timeout S]
#
# 1. our own dockerd (infra/scripts/docker_lib.sh) on DATA_ROOT (outside the repository: it holds
#    whole images' file trees), kept between runs so that an image
#    already built under TAG (the caller derives it from the model and the code) is reused;
# 2. if TAG is missing: the stand-in base (reused by its tag too), wheels on the host, the model
#    copied into the build context, infra/lambda.Dockerfile built as ci_image_test.sh builds it;
# 3. one untimed run (state `prime`), then ROUNDS rounds of STATES, each a fresh container run as
#    Lambda runs it (non-root, read-only root, no network): `python3 -m bench.worker SPEC` with
#    job `cold` times new process -> first 200 through handler.lambda_function.handler, bench/
#    bind-mounted read-only. Before a run, state
#      cold        drops the whole page cache (sync; echo 3 > /proc/sys/vm/drop_caches; as root):
#                  every file of the image (Python, the dependencies, the model) and of the host,
#                  docker's own binaries included, is read from disk again;
#      cold-model  evicts only the model files of the image's layers (posix_fadvise DONTNEED);
#      warm        evicts nothing: the previous run left everything in the page cache;
#      host        the same worker on the host ($PYTHON, MODEL_PATH=DIR), its files in the page
#                  cache (an untimed run first): the host's figure under the same load, for
#                  comparison.
#
# Output protocol (stdout): `IMAGE_START_INFO key value`; per run `IMAGE_START_RUN round state
# evicted host_t0`, then the worker's stdout (its `BENCH_RESULT {json}`), then `IMAGE_START_END
# round state exit_status host_t1`. Progress goes to stderr. dockerd is stopped and temp files are
# removed on exit, whatever happens (trap).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
PYTHON=${PYTHON:-python3}
DEBIAN_SUITE=${DEBIAN_SUITE:-bookworm}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

model="" tag="" data_root="" rounds=3 spec="" states="cold warm cold-model host" run_timeout=600
while [ $# -gt 0 ]; do
  case $1 in
  --model) model=$2 ;;
  --tag) tag=$2 ;;
  --data-root) data_root=$2 ;;
  --rounds) rounds=$2 ;;
  --spec) spec=$2 ;;
  --states) states=$2 ;;
  --run-timeout) run_timeout=$2 ;;
  *)
    echo "image_start.sh: unknown argument $1" >&2
    exit 2
    ;;
  esac
  shift 2
done
die() {
  echo "image_start.sh: $*" >&2
  exit 1
}
[ -f "$model/manifest.json" ] || die "no manifest.json in --model '$model'"
[ -n "$tag" ] && [ -n "$data_root" ] && [ -n "$spec" ] || die "--tag, --data-root and --spec are needed"

work=$(mktemp -d /tmp/bge-m3-image-start.XXXXXX)
ctx_rel=build/image-start-$$ # the model and wheels must sit inside the build context
ctx=$root/$ctx_rel
base_tag=bge-m3-ci/debian-python:$DEBIAN_SUITE
# shellcheck source=infra/scripts/docker_lib.sh
source "$root/infra/scripts/docker_lib.sh"

log() { echo "[image_start] $*" >&2; }
info() { echo "IMAGE_START_INFO $1 $2"; }

cleanup() {
  local rc=$?
  set +e
  stop_dockerd >&2
  if [ $rc -ne 0 ] && [ -f "$work/dockerd.log" ]; then
    echo "---- last lines of dockerd.log" >&2
    tail -n 20 "$work/dockerd.log" >&2
  fi
  rm -rf "$ctx" "$work"
  rmdir "$root/build" 2>/dev/null
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

docker_prerequisites >&2
start_dockerd "$data_root" >&2
info storage_driver "$("$DOCKER" info --format '{{.Driver}}')"

if "$DOCKER" image inspect "$tag" >/dev/null 2>&1; then
  log "image $tag: already built, reused"
  info image_built reused
else
  t=$(date +%s)
  if "$DOCKER" image inspect "$base_tag" >/dev/null 2>&1; then
    log "base $base_tag: reused"
  else
    log "debootstrap a minimal Debian $DEBIAN_SUITE (stand-in base)"
    make_base_image "$base_tag" >&2
  fi
  base_python "$base_tag" >&2
  log "wheels for cp${py_version/./} / glibc $glibc"
  infra/scripts/install_deps.sh requirements >"$work/requirements-lambda.txt"
  download_wheels "$ctx/wheels" "$work/requirements-lambda.txt" >&2
  log "model $model ($(du -sh "$model" | cut -f1)) into the build context"
  mkdir -p "$ctx"
  cp -r "$model" "$ctx/model-int8"
  log "build infra/lambda.Dockerfile as $tag"
  build_lambda_image "$tag" "$base_tag" "$ctx_rel/model-int8" "$ctx_rel/wheels" \
    "$work/build-lambda.log" >&2
  rm -rf "$ctx"
  info image_built "$(($(date +%s) - t))s"
fi
info image_size_bytes "$("$DOCKER" image inspect -f '{{.Size}}' "$tag")"
info model_bytes "$(du -sb "$model" | cut -f1)"

# The image's model files in docker's layer store (the runtime stage's layers and the stages
# they were copied from): what `cold-model` evicts.
model_files() {
  find "$data_root" -path '*/diff/opt/model/*' -type f -print0 2>/dev/null
}

cached_kib() { awk '/^Cached:/ { print $2 }' /proc/meminfo; }

# evict STATE: prints what was evicted.
evict() {
  case $1 in
  cold)
    sync
    if { echo 3 >/proc/sys/vm/drop_caches; } 2>/dev/null; then
      echo "page-cache:all"
    else
      # Not allowed here: every file of docker's data root (all images' layers) instead.
      find "$data_root" -type f -print0 2>/dev/null | xargs -0 -r "$PYTHON" -m bench.image_start --evict-files
      echo "fadvise:data-root"
    fi
    ;;
  cold-model)
    model_files | xargs -0 -r "$PYTHON" -m bench.image_start --evict-files
    echo "fadvise:model"
    ;;
  *) echo "none" ;;
  esac
}

run_host() {
  local round=$1 t0 rc=0
  # Untimed first: the page-cache drop of a cold round also took the host's Python files.
  cat "$model"/* >/dev/null
  MODEL_PATH=$model MODEL_VERIFY=size timeout "$run_timeout" "$PYTHON" -m bench.worker "$spec" \
    >/dev/null 2>&1 || true
  t0=$(date +%s.%N)
  echo "IMAGE_START_RUN $round host none $t0"
  BENCH_T0=$t0 MODEL_PATH=$model MODEL_VERIFY=size timeout "$run_timeout" "$PYTHON" \
    -m bench.worker "$spec" || rc=$?
  echo "IMAGE_START_END $round host $rc $(date +%s.%N)"
  log "round $round host: exit $rc"
}

run_once() {
  local round=$1 state=$2 name evicted t0 rc
  if [ "$state" = host ]; then
    run_host "$round"
    return
  fi
  name=bge-m3-image-start-$$-$round-$state
  containers+=("$name")
  evicted=$(evict "$state")
  info "cached_kib_before_run_${round}_$state" "$(cached_kib)"
  t0=$(date +%s.%N)
  echo "IMAGE_START_RUN $round $state $evicted $t0"
  rc=0
  # BENCH_T0 is taken inside the container just before the interpreter starts: the worker's
  # total is process start -> 200; the host's t0 above adds the container's own start. (Single
  # quotes: the container's shell expands them.)
  # shellcheck disable=SC2016
  timeout "$run_timeout" "$DOCKER" run --name "$name" --network none "${lambda_run[@]}" \
    -v "$root/bench:/opt/bench-code/bench:ro" \
    -e PYTHONPATH=/var/task:/opt/bench-code -e PYTHONDONTWRITEBYTECODE=1 \
    -e BENCH_SPEC="$spec" --entrypoint sh "$tag" \
    -c 'BENCH_T0=$(date +%s.%N) exec python3 -m bench.worker "$BENCH_SPEC"' || rc=$?
  echo "IMAGE_START_END $round $state $rc $(date +%s.%N)"
  "$DOCKER" rm -f "$name" >/dev/null 2>&1 || true
  log "round $round $state: exit $rc (evicted: $evicted)"
}

run_once 0 prime
for round in $(seq 1 "$rounds"); do
  for state in $states; do
    run_once "$round" "$state"
  done
done
