"""The per-dimension ranges that int8 / uint8 embeddings are quantized with, computed once at
build time so that every request and every container quantizes the same way.

The finished artifact is run by the runtime's own Engine on the calibration texts (the same set
the int8 build calibrates on), and [min, max] of each dense dimension goes into the manifest's
optional `embedding_ranges` section (read by handler/engine/compact.py):

    "embedding_ranges": {"min": [D floats], "max": [D floats], "set": "calibration.jsonl",
                         "texts": 87}

`python -m model_build.ranges DIR` adds the section to an artifact built before it existed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from handler.engine.compact import RANGES_SECTION
from handler.engine.manifest import MANIFEST_NAME
from model_build import validate


def compute_ranges(model_dir: Path, texts: list[str]) -> dict[str, Any]:
    from handler.engine import Engine, EngineConfig

    engine = Engine.load(model_dir, EngineConfig(verify="off", warmup=False))
    encoded = engine.encode(texts, dense=True)
    assert encoded.dense is not None
    dense = encoded.dense.astype(np.float32)
    return {
        # float32 values as JSON numbers that read back to the same float32
        "min": [float(v) for v in dense.min(axis=0)],
        "max": [float(v) for v in dense.max(axis=0)],
    }


def add_ranges(model_dir: Path, calibration_set: Path | None = None) -> dict[str, Any]:
    """Compute the ranges on the calibration set and write them into the artifact's manifest."""
    path = calibration_set or validate.CALIBRATION_SET
    texts = [item.text for item in validate.load_text_set(path)]
    section = {**compute_ranges(model_dir, texts), "set": path.name, "texts": len(texts)}
    manifest_path = model_dir / MANIFEST_NAME
    data = json.loads(manifest_path.read_text(encoding="utf-8"))
    data[RANGES_SECTION] = section
    manifest_path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return section


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", type=Path, help="an artifact made by python -m model_build")
    parser.add_argument("--calibration-set", type=Path, default=None)
    args = parser.parse_args(argv)
    section = add_ranges(args.model_dir, args.calibration_set)
    print(f"{args.model_dir}: embedding_ranges over {section['texts']} texts written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
