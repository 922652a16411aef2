"""The per-dimension ranges that int8 / uint8 embeddings are quantized with, computed once at
build time so that every request and every container quantizes the same way.

The finished artifact is run by the runtime's own Engine on the calibration texts (the same set
the int8 build calibrates on), and [min, max] of each dense dimension goes into the manifest's
optional `embedding_ranges` section (handler.engine.manifest.EmbeddingRanges, read by
handler/engine/compact.py).

`python -m model_build.ranges DIR` adds the section to an artifact built before it existed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from handler.engine.manifest import EmbeddingRanges, load_manifest, write_manifest
from model_build import validate


def compute_ranges(model_dir: Path, texts: list[str]) -> tuple[list[float], list[float]]:
    from handler.engine import Engine, EngineConfig

    engine = Engine.load(model_dir, EngineConfig(verify="off", warmup=False))
    encoded = engine.encode(texts, dense=True)
    assert encoded.dense is not None
    dense = encoded.dense.astype(np.float32)
    # float32 values as JSON numbers that read back to the same float32
    return [float(v) for v in dense.min(axis=0)], [float(v) for v in dense.max(axis=0)]


def measure_ranges(model_dir: Path, calibration_set: Path | None = None) -> EmbeddingRanges:
    """The ranges of this artifact's dense vectors on the calibration set."""
    path = calibration_set or validate.CALIBRATION_SET
    texts = [item.text for item in validate.load_text_set(path)]
    low, high = compute_ranges(model_dir, texts)
    return EmbeddingRanges(min=tuple(low), max=tuple(high), set=path.name, texts=len(texts))


def add_ranges(model_dir: Path, calibration_set: Path | None = None) -> EmbeddingRanges:
    """Measure the ranges and write them into an existing artifact's manifest."""
    section = measure_ranges(model_dir, calibration_set)
    manifest = load_manifest(model_dir)
    write_manifest(model_dir, manifest.with_sections(embedding_ranges=section))
    return section


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", type=Path, help="an artifact made by python -m model_build")
    parser.add_argument("--calibration-set", type=Path, default=None)
    args = parser.parse_args(argv)
    section = add_ranges(args.model_dir, args.calibration_set)
    print(f"{args.model_dir}: embedding_ranges over {section.texts} texts written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
