#!/usr/bin/env bash
# Install the Python dependencies of an image (or of any directory) in one pip call.
#
#   install_deps.sh runtime --target DIR [--requirements FILE] [--ort PKG] [--wheels DIR]
#       requirements.txt only (no torch, no transformers): the Lambda / Cloud Run runtime.
#       --ort swaps the onnxruntime pin for another distribution of the same module, e.g.
#       onnxruntime-gpu==1.26.0 (GPU image) or onnxruntime==1.26.0 (that image built for CI).
#   install_deps.sh build --target DIR [--requirements FILE] [--wheels DIR] [--torch-index URL]
#       requirements-build.txt with torch from the CPU index: what `python -m model_build` needs.
#   install_deps.sh requirements [--requirements FILE] [--ort PKG]
#       print the runtime requirements that `runtime` would install (for `pip download`).
#
# --wheels DIR: when DIR holds *.whl files, install from them only (pip --no-index
# --find-links DIR): air-gapped builds, and our CI whose containers cannot reach the index.
# Without wheels, packages come from the index pip is configured with (PIP_INDEX_URL etc.).
# PYTHON (default python3) is the interpreter whose pip runs; --target keeps the result in one
# directory, which works the same on the Lambda base, Debian and Ubuntu (no PEP 668 conflict).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
PYTHON=${PYTHON:-python3}

mode=${1:-}
[ -n "$mode" ] && shift
target="" requirements="" ort="" wheels="" torch_index="https://download.pytorch.org/whl/cpu"
while [ "$#" -gt 0 ]; do
  case "$1" in
    --target) target=$2; shift 2 ;;
    --requirements) requirements=$2; shift 2 ;;
    --ort) ort=$2; shift 2 ;;
    --wheels) wheels=$2; shift 2 ;;
    --torch-index) torch_index=$2; shift 2 ;;
    *) echo "install_deps: unknown argument $1" >&2; exit 2 ;;
  esac
done

runtime_requirements() {
  local file=${requirements:-$root/requirements.txt}
  [ -f "$file" ] || { echo "install_deps: $file not found" >&2; exit 1; }
  local line name
  while IFS= read -r line || [ -n "$line" ]; do
    # Both distributions provide the `onnxruntime` module: never install the two together.
    name=$(printf '%s' "${line%%[=<>!~;[ ]*}" | tr '[:upper:]_' '[:lower:]-')
    if [ -n "$ort" ] && { [ "$name" = onnxruntime ] || [ "$name" = onnxruntime-gpu ]; }; then
      continue
    fi
    printf '%s\n' "$line"
  done <"$file"
  if [ -n "$ort" ]; then
    printf '%s\n' "$ort"
  fi
}

pip_source_args() {
  local found=("$wheels"/*.whl)
  if [ -n "$wheels" ] && [ -e "${found[0]}" ]; then
    echo "install_deps: offline, from ${#found[@]} wheels in $wheels" >&2
    printf '%s\n' --no-index --find-links "$wheels"
  else
    echo "install_deps: from the package index" >&2
  fi
}

case "$mode" in
  requirements)
    runtime_requirements
    ;;
  runtime)
    [ -n "$target" ] || { echo "install_deps: runtime needs --target DIR" >&2; exit 2; }
    reqs=$(mktemp)
    trap 'rm -f "$reqs"' EXIT
    runtime_requirements >"$reqs"
    mapfile -t source_args < <(pip_source_args)
    # Binary wheels only: the runtime bases have no compiler, and a missing wheel for the
    # architecture should fail here, loudly, not build from source.
    "$PYTHON" -m pip install --no-cache-dir --disable-pip-version-check --only-binary=:all: \
      "${source_args[@]}" --target "$target" -r "$reqs"
    ;;
  build)
    [ -n "$target" ] || { echo "install_deps: build needs --target DIR" >&2; exit 2; }
    file=${requirements:-$root/requirements-build.txt}
    mapfile -t source_args < <(pip_source_args)
    if [ "${#source_args[@]}" -eq 0 ]; then
      # torch from the CPU index: its local version (2.x.y+cpu) sorts above PyPI's CUDA build of
      # the same version, so `torch==2.x.y` in the requirements resolves to the CPU wheel.
      source_args=(--extra-index-url "$torch_index")
    fi
    # One resolver run: a second `pip install --target` would not see the first one's packages.
    "$PYTHON" -m pip install --no-cache-dir --disable-pip-version-check --prefer-binary \
      "${source_args[@]}" --target "$target" -r "$file"
    ;;
  *)
    sed -n '2,20p' "$0" >&2
    exit 2
    ;;
esac
