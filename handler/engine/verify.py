"""`python -m handler.engine.verify DIR [--mode sha256|size]`: check a model directory against its
manifest, e.g. once at image build time, so that the runtime may check sizes only at cold start."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from handler.engine.errors import ModelLoadError
from handler.engine.manifest import MANIFEST_NAME, VERIFY_MODES, load_manifest, verify_files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m handler.engine.verify")
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--mode", choices=VERIFY_MODES, default="sha256")
    args = parser.parse_args(argv)
    try:
        manifest = load_manifest(args.model_dir)
        verify_files(args.model_dir, manifest, args.mode)
    except ModelLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{args.model_dir}: {len(manifest.files)} files match {MANIFEST_NAME} ({args.mode})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
