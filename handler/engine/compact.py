"""Compact embedding types, by Cohere's names: `float`, `int8`, `uint8`, `binary`, `ubinary`.

The packing is sentence-transformers' `quantize_embeddings` (which Cohere's binary types match):
- `binary` / `ubinary`: one bit per dimension, 1 where the value is > 0, packed 8 per byte with
  the first dimension in the highest bit (`numpy.packbits`); `ubinary` as uint8, `binary` as that
  byte minus 128 (int8), so D dimensions give D/8 numbers;
- `int8` / `uint8`: per-dimension scalar quantization over [min, max] of that dimension in
  256 steps, floor and clip; `int8` is the uint8 value minus 128.

The int8 ranges must be the same for every request and every container, or vectors indexed on one
day would not compare with queries of the next: they come from the model's build (the manifest's
`embedding_ranges` section, computed on the calibration texts by model_build), never from the
request's own vectors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np
from numpy.typing import NDArray

from handler.engine.errors import InputError
from handler.engine.manifest import EmbeddingRanges

EmbeddingType = Literal["float", "int8", "uint8", "binary", "ubinary"]
EMBEDDING_TYPES: tuple[str, ...] = get_args(EmbeddingType)


@dataclass(frozen=True)
class Ranges:
    """Per-dimension [min, max] of the dense vectors on the calibration texts."""

    low: NDArray[np.float32]
    high: NDArray[np.float32]

    @classmethod
    def from_manifest(cls, section: EmbeddingRanges | None, dims: int) -> Ranges | None:
        if section is None:
            return None
        low = np.asarray(section.min, dtype=np.float32)
        high = np.asarray(section.max, dtype=np.float32)
        if low.shape != (dims,) or high.shape != (dims,):
            return None
        return cls(low, high)


def pack_bits(dense: NDArray[np.float32], kind: str) -> NDArray[Any]:
    packed = np.packbits(dense > 0, axis=-1)
    if kind == "ubinary":
        return packed
    return (packed.astype(np.int16) - 128).astype(np.int8)


def scalar(dense: NDArray[np.float32], ranges: Ranges, kind: str) -> NDArray[Any]:
    starts = ranges.low
    steps = (ranges.high - starts) / 255
    steps = np.where(steps == 0, 1, steps)
    q = np.clip(np.floor((dense - starts) / steps), 0, 255)
    if kind == "uint8":
        return q.astype(np.uint8)
    return (q - 128).astype(np.int8)


def check_types(
    types: Sequence[str], *, ranges: Ranges | None, dimensions: int | None, model_id: str
) -> None:
    """InputError unless every type can be served for this model and request."""
    unknown = [t for t in types if t not in EMBEDDING_TYPES]
    if unknown or not types:
        raise InputError(
            f"embedding_types must list some of {', '.join(EMBEDDING_TYPES)}"
            + (f" (not {unknown[0]!r})" if unknown else ""),
            param="embedding_types",
        )
    scalar_types = [t for t in types if t in ("int8", "uint8")]
    if scalar_types and ranges is None:
        raise InputError(
            f"model '{model_id}' has no calibrated int8 ranges (its build predates them); "
            "rebuild it or ask for float, binary or ubinary",
            param="embedding_types",
            code="unsupported_output",
        )
    if scalar_types and dimensions is not None:
        raise InputError(
            "int8 and uint8 are calibrated on the model's full width; they cannot be combined "
            "with 'dimensions'",
            param="dimensions",
        )


def compact(
    dense: NDArray[np.float32], types: Sequence[str], ranges: Ranges | None
) -> dict[str, NDArray[Any]]:
    """The dense vectors in every asked type, keyed by type, in the order asked."""
    out: dict[str, NDArray[Any]] = {}
    for kind in dict.fromkeys(types):
        if kind == "float":
            out[kind] = dense
        elif kind in ("binary", "ubinary"):
            out[kind] = pack_bits(dense, kind)
        else:
            assert ranges is not None  # check_types refused it otherwise
            out[kind] = scalar(dense, ranges, kind)
    return out
