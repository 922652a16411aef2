"""Agreement of two sets of lexical (sparse) weights, in measures that near-ties cannot break.

A model's sparse output serves lexical matching: the score of a query and a passage is the sum of
w_q * w_p over the token ids they share (handler/engine/scoring.py). So the gate measures that
score itself, over many query-passage pairs, and the weight of each text's heaviest tokens:

- lexical error: sum |s - s_ref| / sum |s_ref| over every pair. Two tokens of nearly equal weight
  that trade places change no score, while a head that is off by a few percent moves them all;
- top overlap: over the union of both sides' `top_k` heaviest tokens, sum min(w, w_ref) /
  sum max(w, w_ref) (a weighted Jaccard). A token that falls out of one side's top list still
  counts with the weight it has there, so a near-tie costs as little as the weights differ.

Asking for the same top-5 id sets instead fails on a model whose weights are near-ties (random
weights, where every hidden state looks alike) however small the error is; it is kept as an
informative figure only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from handler.engine.manifest import LexicalAgreement, SparseFigures
from handler.engine.scoring import lexical_score

Weights = Mapping[int, float]
TOP_K = 10


def top_ids(weights: Weights, k: int) -> list[int]:
    """The k heaviest token ids (ties broken by id, so the choice is deterministic)."""
    ranked = sorted(weights.items(), key=lambda kv: (-kv[1], kv[0]))
    return [token for token, _ in ranked[:k]]


def top_overlap(reference: Weights, candidate: Weights, k: int = TOP_K) -> float:
    tokens = set(top_ids(reference, k)) | set(top_ids(candidate, k))
    low = sum(min(reference.get(t, 0.0), candidate.get(t, 0.0)) for t in tokens)
    high = sum(max(reference.get(t, 0.0), candidate.get(t, 0.0)) for t in tokens)
    return low / high if high > 0 else 1.0


def cosine(a: Weights, b: Weights) -> float:
    if not a and not b:
        return 1.0
    dot = sum(w * b.get(t, 0.0) for t, w in a.items())
    na = math.sqrt(sum(w * w for w in a.values()))
    nb = math.sqrt(sum(w * w for w in b.values()))
    return dot / (na * nb) if na > 0 and nb > 0 else 0.0


def max_weight_error(reference: Weights, candidate: Weights) -> float:
    """The largest |w - w_ref| over both sides' tokens, a token absent on one side weighing 0."""
    tokens = set(reference) | set(candidate)
    return max((abs(reference.get(t, 0.0) - candidate.get(t, 0.0)) for t in tokens), default=0.0)


def pair_scores(queries: Sequence[Weights], passages: Sequence[Weights]) -> NDArray[np.float64]:
    """[query, passage] lexical match scores, by the engine's own scoring function."""
    return np.array(
        [[lexical_score(q, p) for p in passages] for q in queries], dtype=np.float64
    ).reshape(len(queries), len(passages))


def score_errors(reference: NDArray[np.float64], candidate: NDArray[np.float64]) -> NDArray[Any]:
    """Per query row, sum |s - s_ref| / sum |s_ref|; a row whose reference scores are all 0
    counts as 0 when the candidate's are too, else as 1 (wholly wrong)."""
    diff = np.abs(candidate - reference).sum(axis=1)
    scale = np.abs(reference).sum(axis=1)
    ratio = np.divide(diff, scale, out=np.zeros_like(diff), where=scale > 0)
    return np.where(scale > 0, ratio, np.where(diff > 0, 1.0, 0.0))


def total_score_error(reference: NDArray[np.float64], candidate: NDArray[np.float64]) -> float:
    scale = float(np.abs(reference).sum())
    diff = float(np.abs(candidate - reference).sum())
    if scale == 0.0:
        return 0.0 if diff == 0.0 else 1.0
    return diff / scale


def sparse_figures(
    texts_ref: Sequence[Weights],
    texts_cand: Sequence[Weights],
    queries_ref: Sequence[Weights],
    queries_cand: Sequence[Weights],
) -> SparseFigures:
    """The gate's sparse figures: per text, and over every (query, text) pair."""
    ref_scores = pair_scores(queries_ref, texts_ref)
    cand_scores = pair_scores(queries_cand, texts_cand)
    per_query = score_errors(ref_scores, cand_scores)
    overlaps = [top_overlap(r, c) for r, c in zip(texts_ref, texts_cand, strict=True)]
    identical = [
        set(top_ids(r, 5)) == set(top_ids(c, 5)) for r, c in zip(texts_ref, texts_cand, strict=True)
    ]
    cosines = [cosine(r, c) for r, c in zip(texts_ref, texts_cand, strict=True)]
    return SparseFigures(
        lexical_error=round(total_score_error(ref_scores, cand_scores), 6),
        lexical_error_worst_query=round(float(per_query.max(initial=0.0)), 6),
        pairs=int(ref_scores.size),
        top_overlap_mean=round(float(np.mean(overlaps)), 6),
        top_overlap_min=round(float(np.min(overlaps)), 6),
        top_k=TOP_K,
        top5_identical=round(sum(identical) / len(identical), 6),
        cosine_mean=round(float(np.mean(cosines)), 6),
    )


def agreement(reference: Sequence[Weights], candidate: Sequence[Weights]) -> LexicalAgreement:
    """A few texts against recorded weights: every text is both query and passage."""
    overlaps = [top_overlap(r, c) for r, c in zip(reference, candidate, strict=True)]
    errors = [max_weight_error(r, c) for r, c in zip(reference, candidate, strict=True)]
    return LexicalAgreement(
        max_weight_error=round(max(errors, default=0.0), 6),
        lexical_error=round(
            total_score_error(pair_scores(reference, reference), pair_scores(candidate, candidate)),
            6,
        ),
        top_overlap_mean=round(float(np.mean(overlaps)), 6),
        top_overlap_min=round(float(np.min(overlaps)), 6),
    )
