"""Similarity scores between BGE-M3 representations (FlagEmbedding's compute_score numerics).

Weights are always ordered [dense, sparse, colbert]; the hybrid scores are weighted means.
`score_pairs` is the score operation of any EmbeddingEngine, written once over its `encode` (so a
wrapper such as the micro-batcher scores through its own encode).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from numpy.typing import NDArray

from handler.engine.errors import InputError, TooManyTokensError
from handler.engine.types import DEFAULT_SCORE_WEIGHTS, EmbeddingEngine, Ranking, Scores

FloatArray = NDArray[np.float32]

# The components of a score, in the order FlagEmbedding names its hybrids ("colbert+sparse+dense").
COMPONENTS = ("colbert", "sparse", "dense")
WEIGHT_INDEX = {"dense": 0, "sparse": 1, "colbert": 2}  # into [dense, sparse, colbert] weights


def dense_score(q: FloatArray, p: FloatArray) -> float:
    """Cosine of two dense vectors, in [-1, 1]. The graph normalises them, but in fp16 a unit
    vector's norm is only 1 within about 1e-3, so their dot product alone can read 1.0004: the
    cosine is taken in float64 over the actual norms, and clipped against the last rounding."""
    q64, p64 = q.astype(np.float64), p.astype(np.float64)
    norms = float(np.linalg.norm(q64) * np.linalg.norm(p64))
    if norms == 0.0:
        return 0.0
    return float(np.clip(np.dot(q64, p64) / norms, -1.0, 1.0))


def lexical_score(q: Mapping[int, float], p: Mapping[int, float]) -> float:
    """Sum over the token ids both sides share of w_q * w_p."""
    if len(q) > len(p):
        q, p = p, q
    return float(sum(w * p[t] for t, w in q.items() if t in p))


def colbert_score(q: FloatArray, p: FloatArray) -> float:
    """Mean over query rows of the best dot product with any passage row (late interaction): a
    mean of cosines, so clipped to [-1, 1] like dense_score (fp16 rows are unit only roughly)."""
    if q.shape[0] == 0 or p.shape[0] == 0:
        return 0.0
    return float(np.clip((q @ p.T).max(axis=1).sum() / q.shape[0], -1.0, 1.0))


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


def score_pairs(
    engine: EmbeddingEngine,
    sentences_1: Sequence[str],
    sentences_2: Sequence[str],
    *,
    weights: Sequence[float],
    max_length: int | None,
    max_tokens: int | None = None,
) -> Scores:
    """sentences_1[i] against sentences_2[i], all of them encoded in one call (`max_tokens`
    counts both sides together)."""
    if len(sentences_1) != len(sentences_2):
        raise InputError(
            f"sentences_1 and sentences_2 must pair up ({len(sentences_1)} != {len(sentences_2)})",
            param="sentences_2",
        )
    check_weights(weights)
    if weights[0] + weights[1] <= 0:
        # sparse+dense is the weighted mean of those two scores alone: it needs one of them.
        raise InputError(
            "weights: the dense and sparse weights must not both be 0 (sparse+dense is their "
            "weighted mean)",
            param="weights",
        )
    caps = engine.info.capabilities
    try:
        both = engine.encode(
            [*sentences_1, *sentences_2],
            dense=True,
            sparse=caps.sparse,
            colbert=caps.colbert,
            max_length=max_length,
            max_tokens=max_tokens,
        )
    except TooManyTokensError as exc:  # the texts came from sentences_1/2, not from an "input"
        raise TooManyTokensError(total=exc.total, limit=exc.limit, param="sentences_1") from None
    n = len(sentences_1)
    assert both.dense is not None
    dense = [dense_score(both.dense[i], both.dense[n + i]) for i in range(n)]
    if both.sparse is None or both.colbert is None:
        return Scores(
            dense, None, None, None, None, both.token_counts, both.timings_ms, both.batched_with
        )
    sparse = [lexical_score(both.sparse[i], both.sparse[n + i]) for i in range(n)]
    colbert = [colbert_score(both.colbert[i], both.colbert[n + i]) for i in range(n)]
    hybrid = [
        hybrid_scores(d, s, c, weights) for d, s, c in zip(dense, sparse, colbert, strict=True)
    ]
    return Scores(
        dense=dense,
        sparse=sparse,
        colbert=colbert,
        sparse_dense=[h[0] for h in hybrid],
        colbert_sparse_dense=[h[1] for h in hybrid],
        token_counts=both.token_counts,
        timings_ms=both.timings_ms,
        batched_with=both.batched_with,
    )


def check_weights(weights: Sequence[float]) -> None:
    """Three non-negative finite weights whose sum is finite and positive: huge weights would
    overflow the weighted means to inf / inf = NaN, which JSON cannot carry."""
    if (
        len(weights) != 3
        or not all(math.isfinite(w) and w >= 0 for w in weights)
        or not 0 < sum(weights) < math.inf
    ):
        raise InputError(
            "weights must be three finite non-negative numbers [dense, sparse, colbert] with a "
            "positive sum",
            param="weights",
        )


def parse_mode(mode: str | None, engine: EmbeddingEngine) -> tuple[str, ...]:
    """The components a rank score is made of, in FlagEmbedding's order. None: all that the
    model has (colbert+sparse+dense for BGE-M3, dense for a dense-only model)."""
    caps = engine.info.capabilities
    if mode is None:
        return tuple(c for c in COMPONENTS if getattr(caps, c))
    parts = [p.strip().lower() for p in mode.split("+")]
    unknown = [p for p in parts if p not in COMPONENTS]
    if unknown or len(set(parts)) != len(parts):
        raise InputError(
            f"mode {mode!r} must name dense, sparse or colbert, each at most once, joined by "
            "'+' (for example 'colbert+sparse+dense' or 'sparse+dense')",
            param="mode",
        )
    return tuple(c for c in COMPONENTS if c in parts)


def rank_documents(
    engine: EmbeddingEngine,
    query: str,
    documents: Sequence[str],
    *,
    weights: Sequence[float],
    mode: str | None,
    max_length: int | None,
    truncate: bool = True,
    max_tokens: int | None = None,
) -> Ranking:
    """Every document scored against the query, in input order. The query and the documents go
    to the engine in one call, so the query is encoded once, not once per document; the score of
    a mode is the weighted mean of its components with `weights` (a single component is its own
    score), so colbert+sparse+dense equals /score's value for the same pair."""
    check_weights(weights)
    components = parse_mode(mode, engine)
    if len(components) > 1 and sum(weights[WEIGHT_INDEX[c]] for c in components) <= 0:
        raise InputError(
            f"the weights of {'+'.join(components)} sum to zero; give one of them a weight",
            param="weights",
        )
    try:
        both = engine.encode(
            [query, *documents],
            dense="dense" in components,
            sparse="sparse" in components,
            colbert="colbert" in components,
            max_length=max_length,
            truncate=truncate,
            max_tokens=max_tokens,
        )
    except TooManyTokensError as exc:  # the texts came from query and documents
        raise TooManyTokensError(total=exc.total, limit=exc.limit, param="documents") from None
    per_component: dict[str, list[float]] = {}
    n = len(documents)
    if both.dense is not None:
        per_component["dense"] = [dense_score(both.dense[0], both.dense[1 + i]) for i in range(n)]
    if both.sparse is not None:
        q = both.sparse[0]
        per_component["sparse"] = [lexical_score(q, both.sparse[1 + i]) for i in range(n)]
    if both.colbert is not None:
        q_rows = both.colbert[0]
        per_component["colbert"] = [colbert_score(q_rows, both.colbert[1 + i]) for i in range(n)]
    if len(components) == 1:
        scores = per_component[components[0]]
    else:
        chosen = [weights[WEIGHT_INDEX[c]] for c in components]
        scores = [
            weighted_mean([per_component[c][i] for c in components], chosen) for i in range(n)
        ]
    return Ranking(
        scores=scores,
        mode="+".join(components),
        token_counts=both.token_counts,
        timings_ms=both.timings_ms,
        batched_with=both.batched_with,
    )


class PairScoring:
    """`score` and `rank` for an engine class, written once over the engine's own `encode`: mixed
    into the Engine, the MicroBatcher (whose encode shares passes) and test fakes alike."""

    def score(
        self: EmbeddingEngine,
        sentences_1: Sequence[str],
        sentences_2: Sequence[str],
        *,
        weights: Sequence[float] = DEFAULT_SCORE_WEIGHTS,
        max_length: int | None = None,
        max_tokens: int | None = None,
    ) -> Scores:
        return score_pairs(
            self,
            sentences_1,
            sentences_2,
            weights=weights,
            max_length=max_length,
            max_tokens=max_tokens,
        )

    def rank(
        self: EmbeddingEngine,
        query: str,
        documents: Sequence[str],
        *,
        weights: Sequence[float] = DEFAULT_SCORE_WEIGHTS,
        mode: str | None = None,
        max_length: int | None = None,
        truncate: bool = True,
        max_tokens: int | None = None,
    ) -> Ranking:
        return rank_documents(
            self,
            query,
            documents,
            weights=weights,
            mode=mode,
            max_length=max_length,
            truncate=truncate,
            max_tokens=max_tokens,
        )
