"""The engine's public interface: what the HTTP dialects call, and what a fake engine implements.

Kept free of FastAPI, pydantic and onnxruntime so that route tests can inject a deterministic fake
(`tests/fakes.py`) and the real engine (`handler/engine/engine.py`) stays swappable.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np
from numpy.typing import NDArray

if TYPE_CHECKING:
    from handler.engine.compact import Ranges

FloatArray = NDArray[np.float32]

# BGE-M3's three outputs, in the order the hybrid score weights follow everywhere (FlagEmbedding's
# compute_score order).
HEADS: tuple[str, str, str] = ("dense", "sparse", "colbert")
DEFAULT_SCORE_WEIGHTS: tuple[float, float, float] = (0.4, 0.2, 0.4)  # dense, sparse, colbert


@dataclass(frozen=True)
class Capabilities:
    dense: bool = True
    sparse: bool = False
    colbert: bool = False


@dataclass(frozen=True)
class ModelInfo:
    """What the routes show about a served model (/v1/models, /models/{id}, /health)."""

    id: str
    aliases: tuple[str, ...]
    dims: int
    max_length: int
    vocab_size: int
    capabilities: Capabilities
    recipe: str
    precision: str
    fingerprint: str  # sha256 of the graph file, from the manifest
    source: str  # hub repo id or local path the build came from
    revision: str | None
    created: int  # unix time of the build
    device: str  # "cpu" or "cuda": where the session actually runs


@dataclass
class Encoded:
    """Outputs for a list of inputs, in input order. A head that was not asked for is None."""

    dense: FloatArray | None  # (n, dims), L2-normalised
    sparse: list[dict[int, float]] | None  # token id -> weight, specials and zeros dropped
    colbert: list[FloatArray] | None  # one (tokens - 1, dims) array per input, rows normalised
    token_counts: list[int]  # real tokens per input, special tokens included, after truncation
    # tokenize / infer / post, and queue (waiting for a shared pass) behind the micro-batcher
    timings_ms: dict[str, float] = field(default_factory=dict)
    # Other requests whose inputs ran in the same forward passes (micro-batching; 0: alone).
    batched_with: int = 0
    # Per input: whether it was cut to max_length (empty: the engine did not say).
    truncated: list[bool] = field(default_factory=list)
    # Per input: "computed", "shared" (an identical input in the same pass ran for it) or
    # "cached" (from the engine's cache); empty: the engine did not say.
    sources: list[str] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return sum(self.token_counts)


@dataclass
class Scores:
    """Pairwise scores for sentences_1[i] against sentences_2[i] (FlagEmbedding's compute_score)."""

    dense: list[float]
    sparse: list[float] | None
    colbert: list[float] | None
    sparse_dense: list[float] | None
    colbert_sparse_dense: list[float] | None
    token_counts: list[int]
    timings_ms: dict[str, float] = field(default_factory=dict)
    batched_with: int = 0  # as in Encoded


@dataclass
class Ranking:
    """One query against many documents: `scores[i]` is documents[i]'s score in the mode asked
    for (input order; the caller sorts). `token_counts` holds the query's first."""

    scores: list[float]
    mode: str  # the components that made the score, e.g. "colbert+sparse+dense"
    token_counts: list[int]
    timings_ms: dict[str, float] = field(default_factory=dict)
    batched_with: int = 0  # as in Encoded


@dataclass(frozen=True)
class TokenInfo:
    """One token as the model's tokenizer gives it (text-embeddings-inference's SimpleToken):
    `text` is the input's own characters [start, stop) (character offsets), or for a token the
    template added (`<s>`, `</s>`: `special`) its vocabulary entry, with no offsets."""

    id: int
    text: str
    special: bool
    start: int | None
    stop: int | None


class EmbeddingEngine(Protocol):
    """What every dialect needs from a model. `max_length=None` means the model's own limit;
    `truncate=False` turns an over-long input into InputTooLongError instead of cutting it;
    `max_tokens` caps the tokens of the whole call, counted after truncation from the engine's
    own tokenization (TooManyTokensError, before anything runs); `dimensions` keeps the first N
    dense dimensions and renormalises them."""

    @property
    def info(self) -> ModelInfo: ...

    @property
    def embedding_ranges(self) -> Ranges | None:
        """Per-dimension ranges for int8 / uint8 embeddings, from the build (None: none)."""
        ...

    def encode(
        self,
        texts: Sequence[str],
        *,
        dense: bool = True,
        sparse: bool = False,
        colbert: bool = False,
        max_length: int | None = None,
        truncate: bool = True,
        max_tokens: int | None = None,
        dimensions: int | None = None,
    ) -> Encoded: ...

    def encode_ids(
        self,
        ids: Sequence[Sequence[int]],
        *,
        dense: bool = True,
        sparse: bool = False,
        colbert: bool = False,
        max_length: int | None = None,
        truncate: bool = True,
        max_tokens: int | None = None,
        dimensions: int | None = None,
    ) -> Encoded: ...

    def token_strings(self, weights: Mapping[int, float]) -> dict[str, float]: ...

    def score(
        self,
        sentences_1: Sequence[str],
        sentences_2: Sequence[str],
        *,
        weights: Sequence[float] = DEFAULT_SCORE_WEIGHTS,
        max_length: int | None = None,
        max_tokens: int | None = None,
    ) -> Scores: ...

    def tokens(
        self, texts: Sequence[str], *, add_special_tokens: bool = True
    ) -> list[list[TokenInfo]]:
        """Each text's tokens as encode() would run them before truncation."""
        ...

    def decode(
        self, ids: Sequence[Sequence[int]], *, skip_special_tokens: bool = True
    ) -> list[str]:
        """Each id sequence back to text; InputError for an id outside the vocabulary."""
        ...

    def rank(
        self,
        query: str,
        documents: Sequence[str],
        *,
        weights: Sequence[float] = DEFAULT_SCORE_WEIGHTS,
        mode: str | None = None,
        max_length: int | None = None,
        truncate: bool = True,
        max_tokens: int | None = None,
    ) -> Ranking: ...


class ModelRegistry:
    """The served models by id and alias. The first one is the default (used when any model name
    is accepted, and by the native routes when no model is named)."""

    def __init__(self, engines: Sequence[EmbeddingEngine]):
        if not engines:
            raise ValueError("at least one model must be served")
        self._engines = list(engines)
        self._by_name: dict[str, EmbeddingEngine] = {}
        for engine in self._engines:
            for name in (engine.info.id, *engine.info.aliases):
                self._by_name.setdefault(name, engine)

    @property
    def default(self) -> EmbeddingEngine:
        return self._engines[0]

    def get(self, name: str) -> EmbeddingEngine | None:
        return self._by_name.get(name)

    def __iter__(self) -> Iterator[EmbeddingEngine]:
        return iter(self._engines)

    def __len__(self) -> int:
        return len(self._engines)
