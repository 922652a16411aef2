#!/usr/bin/env bash
# Fail when torch or transformers is importable by the runtime's Python or present in any of the
# given directories (the runtime image installs requirements.txt only; torch is build-time).
#
#   infra/scripts/check_no_torch.sh [DIR...]        PYTHON=python3 by default
set -euo pipefail
PYTHON=${PYTHON:-python3}
FORBIDDEN=(torch transformers)
status=0
# Shell globs only: the Lambda base (Amazon Linux 2023 minimal) has no `find`.
for dir in "$@"; do
  for name in "${FORBIDDEN[@]}"; do
    for found in "$dir/$name" "$dir/$name"-*.dist-info; do
      if [ -e "$found" ]; then
        echo "check_no_torch: $name found at $found" >&2
        status=1
      fi
    done
  done
done
"$PYTHON" - "${FORBIDDEN[@]}" <<'PY' || status=1
import importlib.util
import sys

found = [name for name in sys.argv[1:] if importlib.util.find_spec(name) is not None]
if found:
    print(f"check_no_torch: importable: {', '.join(found)}", file=sys.stderr)
    sys.exit(1)
PY
if [ "$status" -eq 0 ]; then
  echo "check_no_torch: no ${FORBIDDEN[*]} (${*:-python path only})"
fi
exit "$status"
