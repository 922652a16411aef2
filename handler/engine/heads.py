"""Post-processing of the graph's raw head outputs: small pure numpy functions.

The ONNX graph already gives L2-normalised dense vectors, per-token sparse weights
(`relu(sparse_linear(h))`) and masked, row-normalised ColBERT vectors. What is left is per input:
cutting away padding and folding the sparse weights into one weight per token id, exactly as
FlagEmbedding's `BGEM3FlagModel` does it (the reference).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection

import numpy as np
from numpy.typing import NDArray

from handler.engine.errors import InputError
from handler.engine.types import Encoded

FloatArray = NDArray[np.float32]


def sparse_weights(
    token_ids: NDArray[np.int64], weights: FloatArray, drop_ids: Collection[int]
) -> dict[int, float]:
    """One weight per token id: the max over its occurrences; special ids and weights <= 0 dropped.

    FlagEmbedding keeps the max because a repeated word should not outweigh a single strong one.
    """
    keep = weights > 0
    if drop_ids:
        keep &= ~np.isin(token_ids, np.fromiter(drop_ids, dtype=np.int64))
    ids = token_ids[keep]
    values = weights[keep]
    if ids.size == 0:
        return {}
    unique, inverse = np.unique(ids, return_inverse=True)
    best = np.zeros(unique.shape, dtype=np.float32)
    np.maximum.at(best, inverse, values)
    return {int(i): float(w) for i, w in zip(unique, best, strict=True)}


def colbert_rows(colbert: FloatArray, length: int) -> FloatArray:
    """The ColBERT rows of one input: the graph drops `<s>` already; drop padding (keeps `</s>`)."""
    return np.ascontiguousarray(colbert[: max(length - 1, 0)], dtype=np.float32)


def l2_normalize(x: FloatArray, eps: float = 1e-12) -> FloatArray:
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    out: FloatArray = (x / np.maximum(norms, eps)).astype(np.float32, copy=False)
    return out


def truncate_dims(dense: FloatArray, dims: int) -> FloatArray:
    """Matryoshka-style shortening (OpenAI's `dimensions`): keep the first `dims`, renormalise."""
    return l2_normalize(np.ascontiguousarray(dense[..., :dims]))


def check_dimensions(dimensions: int | None, dims: int, model_id: str) -> None:
    """A `dimensions` request must lie within the model's own width."""
    if dimensions is None:
        return
    if dimensions < 1:
        raise InputError("'dimensions' must be positive.", param="dimensions")
    if dimensions > dims:
        raise InputError(
            f"'dimensions' is {dimensions}, but model '{model_id}' has {dims}.",
            param="dimensions",
            code="invalid_dimensions",
        )


def shortened(encoded: Encoded, dimensions: int | None) -> Encoded:
    """`encoded` with its dense vectors cut to `dimensions` and renormalised; the model's own
    width (or no dense head) leaves it as it is, bit for bit."""
    dense = encoded.dense
    if dimensions is None or dense is None or dimensions >= dense.shape[1]:
        return encoded
    return dataclasses.replace(encoded, dense=truncate_dims(dense, dimensions))
