#!/usr/bin/env bash
# Shell functions shared by infra/scripts/ci_image_test.sh and bench/image_start.sh: a Docker
# engine of our own (no systemd), the debootstrapped stand-in base, wheels made on the host and the
# Lambda image built offline from them. Sourced, never run.
#
# The callers define root and use lambda_run and these functions, which shellcheck cannot see here.
# shellcheck disable=SC2034,SC2154,SC2329
#
# The caller sets (before calling): root (the repository root, the build context), work (a temp
# dir: exec root, socket, logs), PYTHON (host interpreter with requirements-build.txt),
# DEBIAN_SUITE, DEBIAN_MIRROR; defines die(); and calls stop_dockerd from its EXIT trap.
# These functions set: DOCKER, build(), dockerd_pid, py_version, glibc; containers (names that
# stop_dockerd removes) is the caller's to append to.

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  echo "docker_lib.sh: source it (see infra/scripts/ci_image_test.sh); it does nothing run" >&2
  exit 2
fi

sock=${sock:-$work/docker.sock}
export DOCKER_HOST=unix://$sock
dockerd_pid=""
dockerd_data_root=""
containers=()

# docker.io + debootstrap (installed from apt if missing; needs root either way), the CLI, and
# build(): Debian's CLI builds with the daemon's built-in BuildKit (DOCKER_BUILDKIT=1); a newer CLI
# without the buildx plugin refuses to use BuildKit at all, and the classic builder runs every stage.
docker_prerequisites() {
  local need=()
  command -v dockerd >/dev/null 2>&1 || need+=(docker.io)
  command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
  if [ "${#need[@]}" -gt 0 ]; then
    [ "$(id -u)" = 0 ] || die "need root to apt-get install ${need[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}"
  fi
  [ "$(id -u)" = 0 ] || die "dockerd and debootstrap need root"
  DOCKER=${DOCKER:-$(command -v /usr/bin/docker || command -v docker)}
  if "$DOCKER" buildx version >/dev/null 2>&1; then
    build() { "$DOCKER" buildx build --load --provenance=false --sbom=false "$@"; }
  else
    build() { DOCKER_BUILDKIT=1 "$DOCKER" build "$@"; }
  fi
  echo "dockerd: $(dockerd --version); CLI: $DOCKER"
}

# start_dockerd DATA_ROOT: our own daemon, its exec root, pid file, log and socket under $work; no
# iptables, no bridge (containers get --network none or host).
start_dockerd() {
  dockerd_data_root=$1
  mkdir -p "$dockerd_data_root"
  dockerd --data-root "$dockerd_data_root" --exec-root "$work/exec" --pidfile "$work/dockerd.pid" \
    -H "unix://$sock" --iptables=false --ip-masq=false --bridge=none \
    >"$work/dockerd.log" 2>&1 &
  dockerd_pid=$!
  for _ in $(seq 1 60); do
    "$DOCKER" version >/dev/null 2>&1 && break
    kill -0 "$dockerd_pid" 2>/dev/null || die "dockerd exited; see $work/dockerd.log"
    sleep 1
  done
  "$DOCKER" version --format 'engine {{.Server.Version}} on {{.Server.Os}}/{{.Server.Arch}}' ||
    die "dockerd did not answer on $sock"
}

# For the EXIT trap: remove our containers, stop dockerd (and the containerd it started, if it
# was killed) and unmount what a killed daemon may leave behind. Never fails.
stop_dockerd() {
  [ -n "$dockerd_pid" ] || return 0
  local c containerd_pid
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
  containerd_pid=$(cat "$work/exec/containerd/containerd.pid" 2>/dev/null)
  if [ -n "$containerd_pid" ] && kill -0 "$containerd_pid" 2>/dev/null; then
    kill "$containerd_pid" 2>/dev/null
  fi
  # Deepest first.
  awk -v w="$work" -v d="$dockerd_data_root" \
    'index($2, w) == 1 || (d != "" && index($2, d) == 1) { print $2 }' /proc/mounts | sort -r |
    while read -r mnt; do umount -l "$mnt" 2>/dev/null; done
  dockerd_pid=""
  return 0
}

# make_base_image TAG: a minimal Debian with python3 (debootstrap), `docker import`ed as the
# stand-in for the Lambda base (no registry is reachable here).
make_base_image() {
  local tag=$1
  if ! debootstrap --variant=minbase --include=python3,python3-pip "$DEBIAN_SUITE" \
    "$work/rootfs" "$DEBIAN_MIRROR" >"$work/debootstrap.log" 2>&1; then
    tail -n 30 "$work/debootstrap.log"
    die "debootstrap failed"
  fi
  rm -rf "$work"/rootfs/var/cache/apt/archives/*.deb "$work"/rootfs/var/lib/apt/lists/*
  echo "rootfs: $(du -sh "$work/rootfs" | cut -f1)"
  tar -C "$work/rootfs" -c . | "$DOCKER" import - "$tag" >/dev/null
  rm -rf "$work/rootfs"
  "$DOCKER" image ls "$tag"
}

# base_python IMAGE: sets py_version (3.11) and glibc (2.36) from the image's own python3.
base_python() {
  local info
  info=$("$DOCKER" run --rm --network none --entrypoint python3 "$1" -c \
    'import platform, sys; print("%d.%d" % sys.version_info[:2], platform.libc_ver()[1])')
  read -r py_version glibc <<<"$info"
  echo "base $1: python $py_version, glibc $glibc"
}

# download_wheels DEST REQUIREMENTS...: every wheel the requirements need, for the base's Python
# and platform (pip inside a container cannot reach the index: the proxy's CA is the host's).
download_wheels() {
  local dest=$1 minor req
  shift
  mkdir -p "$dest"
  local platforms=()
  for minor in $(seq "${glibc#2.}" -1 17); do
    platforms+=(--platform "manylinux_2_${minor}_$(uname -m)")
  done
  platforms+=(--platform "manylinux2014_$(uname -m)" --platform "linux_$(uname -m)")
  for req in "$@"; do
    # (pip's notes about index locations that do not exist on this host are dropped)
    "$PYTHON" -m pip download --quiet --disable-pip-version-check --only-binary=:all: \
      --python-version "$py_version" --implementation cp "${platforms[@]}" -d "$dest" \
      -r "$req" 2>&1 | { grep -v 'is ignored: it is neither a file nor a directory' || true; }
  done
  echo "$(find "$dest" -name '*.whl' | wc -l) wheels, $(du -sh "$dest" | cut -f1)"
}

# The steps of a build and what our scripts printed; the whole log when it failed.
build_summary() {
  grep -E '^#[0-9]+ \[|^#[0-9]+ [0-9.]+ (check_|install_deps|ensure_python)' "$1" | cut -c1-160 || true
}
build_failed() {
  tail -n 60 "$1"
  die "docker build failed (log above)"
}

# build_lambda_image TAG BASE MODEL_DIR WHEELS_DIR LOG: infra/lambda.Dockerfile with the stand-in
# base, a prebuilt model and offline wheels (both directories relative to $root, the context).
build_lambda_image() {
  local tag=$1 base=$2 model_rel=$3 wheels_rel=$4 log=$5
  build --network host --progress plain -f "$root/infra/lambda.Dockerfile" -t "$tag" \
    --build-arg BASE_IMAGE="$base" \
    --build-arg ARCH="$(uname -m)" \
    --build-arg MODEL_STAGE=model-prebuilt \
    --build-arg MODEL_DIR="$model_rel" \
    --build-arg WHEELS_DIR="$wheels_rel" \
    "$root" >"$log" 2>&1 || build_failed "$log"
  build_summary "$log"
}

# The Lambda image run as Lambda runs it: a non-root user, a read-only root file system with a
# writable /tmp.
lambda_run=(--user 993:990 --read-only --tmpfs /tmp
  -e AWS_LAMBDA_FUNCTION_NAME=bge-m3-ci -e AWS_LAMBDA_FUNCTION_MEMORY_SIZE=4096
  -e AWS_REGION=us-east-1)
