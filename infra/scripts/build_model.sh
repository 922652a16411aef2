#!/usr/bin/env bash
# Build a model directory (model.onnx, model.onnx_data, tokenizer.json, manifest.json) with the
# project's build CLI, then make it world-readable. The same script runs in the Dockerfiles'
# build stage and on a host (CI builds the model once from the fixture and bakes it in).
#
#   build_model.sh --out DIR [--source HUB_ID|DIR] [--revision REV] [--recipe bge-m3|dense]
#                  [--precision int8|fp16|fp32] [--fixture tiny|full]
#
# Defaults come from MODEL_ID, MODEL_REVISION, MODEL_RECIPE, MODEL_PRECISION (BAAI/bge-m3, its
# pinned revision, bge-m3, int8). --fixture makes a random-weight model in BGE-M3's exact layout
# (python -m model_build.fixture) and builds from it: for machines that cannot reach the hub.
# Arguments after `--`, and the words of MODEL_BUILD_ARGS (a build argument of the Dockerfiles),
# go to `python -m model_build` as they are (e.g. --no-smoothquant, --max-length 2048).
# PYTHON (default python3) must have requirements-build.txt installed, or PYTHONPATH set to it.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PYTHON=${PYTHON:-python3}
source=${MODEL_ID:-BAAI/bge-m3}
revision=${MODEL_REVISION:-}
recipe=${MODEL_RECIPE:-bge-m3}
precision=${MODEL_PRECISION:-int8}
out="" fixture=""
while [ "$#" -gt 0 ]; do
  case "$1" in
    --out) out=$2; shift 2 ;;
    --source) source=$2; shift 2 ;;
    --revision) revision=$2; shift 2 ;;
    --recipe) recipe=$2; shift 2 ;;
    --precision) precision=$2; shift 2 ;;
    --fixture) fixture=$2; shift 2 ;;
    --) shift; break ;;
    *) echo "build_model: unknown argument $1" >&2; exit 2 ;;
  esac
done
[ -n "$out" ] || { echo "usage: $0 --out DIR [--source ...] (see the header)" >&2; exit 2; }

# The build CLI lives at the repository root (or wherever the caller put model_build/).
cd "${MODEL_BUILD_ROOT:-$(cd "$here/../.." && pwd)}"

if [ -n "$fixture" ]; then
  fixture_dir=$(mktemp -d)
  trap 'rm -rf "$fixture_dir"' EXIT
  echo "build_model: random-weight BGE-M3-layout fixture ($fixture) in $fixture_dir"
  "$PYTHON" -m model_build.fixture --out "$fixture_dir/bge-m3-$fixture" --size "$fixture"
  source="$fixture_dir/bge-m3-$fixture"
  revision=""
fi

args=(--source "$source" --recipe "$recipe" --precision "$precision" --out "$out")
# A local directory has no revision; a hub id is pinned when a revision is given.
if [ -n "$revision" ] && [ ! -d "$source" ]; then
  args+=(--revision "$revision")
fi
read -r -a extra <<<"${MODEL_BUILD_ARGS:-}"
args+=("${extra[@]}" "$@")
echo "build_model: python -m model_build ${args[*]}"
"$PYTHON" -m model_build "${args[@]}"
"$here/fix_permissions.sh" "$out"
echo "build_model: $(du -sh "$out" | cut -f1) in $out"
ls -l "$out"
