"""Similarity scores between BGE-M3 representations (FlagEmbedding's compute_score numerics).

Weights are always ordered [dense, sparse, colbert]; the hybrid scores are weighted means.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from numpy.typing import NDArray

FloatArray = NDArray[np.float32]


def dense_score(q: FloatArray, p: FloatArray) -> float:
    """Cosine of two L2-normalised vectors: their dot product."""
    return float(np.dot(q, p))


def lexical_score(q: Mapping[int, float], p: Mapping[int, float]) -> float:
    """Sum over the token ids both sides share of w_q * w_p."""
    if len(q) > len(p):
        q, p = p, q
    return float(sum(w * p[t] for t, w in q.items() if t in p))


def colbert_score(q: FloatArray, p: FloatArray) -> float:
    """Mean over query rows of the best dot product with any passage row (late interaction)."""
    if q.shape[0] == 0 or p.shape[0] == 0:
        return 0.0
    return float((q @ p.T).max(axis=1).sum() / q.shape[0])


def weighted_mean(scores: Sequence[float], weights: Sequence[float]) -> float:
    total = float(sum(weights))
    if total == 0:
        raise ValueError("the weights must not sum to zero")
    return float(sum(s * w for s, w in zip(scores, weights, strict=True)) / total)


def hybrid_scores(
    dense: float, sparse: float, colbert: float, weights: Sequence[float]
) -> tuple[float, float]:
    """(`sparse+dense`, `colbert+sparse+dense`) as FlagEmbedding's compute_score defines them."""
    w_dense, w_sparse, w_colbert = weights
    sparse_dense = weighted_mean((sparse, dense), (w_sparse, w_dense))
    all_three = weighted_mean((dense, sparse, colbert), (w_dense, w_sparse, w_colbert))
    return sparse_dense, all_three
