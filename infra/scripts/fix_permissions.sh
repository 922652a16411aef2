#!/usr/bin/env bash
# Make directories world-readable and -traversable, and files world-readable (never writable by
# others). safetensors and some ONNX exporters write 0600 files; the Lambda runtime user
# (sbx_user1051) and Cloud Run's non-root users are not root and could not open them.
#
#   infra/scripts/fix_permissions.sh DIR [DIR...]
set -euo pipefail
[ "$#" -gt 0 ] || { echo "usage: $0 DIR [DIR...]" >&2; exit 2; }
for dir in "$@"; do
  [ -e "$dir" ] || { echo "fix_permissions: $dir does not exist" >&2; exit 1; }
  chmod -R u+rwX,go+rX,go-w "$dir"
done
