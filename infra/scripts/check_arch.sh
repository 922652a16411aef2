#!/usr/bin/env bash
# Fail when the machine (or emulated platform) building the image is not the architecture asked
# for, so that an arm64 build never silently produces x86_64 wheels (or the reverse).
#
#   infra/scripts/check_arch.sh [x86_64|amd64|arm64|aarch64|""]   (empty: print and accept)
set -euo pipefail
normalise() {
  case "$1" in
    x86_64 | amd64) echo x86_64 ;;
    arm64 | aarch64) echo arm64 ;;
    *) echo "$1" ;;
  esac
}
actual=$(normalise "$(uname -m)")
wanted=$(normalise "${1:-}")
if [ -z "$wanted" ]; then
  echo "check_arch: building for $actual (no architecture requested)"
elif [ "$wanted" != "$actual" ]; then
  echo "check_arch: asked for $wanted but this build runs on $actual;" \
    "pass --platform linux/${wanted/x86_64/amd64} (and have QEMU/binfmt for a foreign one)" >&2
  exit 1
else
  echo "check_arch: $actual"
fi
