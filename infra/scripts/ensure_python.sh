#!/usr/bin/env bash
# Make sure `python3 -m pip` works in an image whose base may have no Python (the CUDA runtime
# images); a base that already has it (our Debian stand-in, the Lambda base) is left untouched.
#
#   infra/scripts/ensure_python.sh
set -euo pipefail
if command -v python3 >/dev/null 2>&1 && python3 -m pip --version >/dev/null 2>&1; then
  echo "ensure_python: $(python3 --version) with $(python3 -m pip --version | cut -d' ' -f1-2)"
  exit 0
fi
if command -v apt-get >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends python3 python3-pip ca-certificates
  rm -rf /var/lib/apt/lists/*
elif command -v dnf >/dev/null 2>&1; then
  dnf install -y python3 python3-pip
  dnf clean all
else
  echo "ensure_python: no python3 and no apt-get/dnf to install it" >&2
  exit 1
fi
python3 --version
