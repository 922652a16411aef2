"""The one request sequence under every dialect: model lookup, limits, one engine call, the record.

A dialect parses its body into an `EmbedRequest` (or the pair lists of a score request), calls
`Service.embed` / `Service.score`, and renders what comes back. Everything between is here, once:
which model answers a name, MAX_INPUTS_* and empty inputs, the token length per input, and the
request's entry in the log line. Tokenizing, the MAX_TOKENS_PER_REQUEST cap, `dimensions` and
token-id checks are the engine's, done on its one tokenization of the request.

Knows nothing of HTTP: every refusal is an `ApiError` (or an engine error) that the app renders
in the dialect's envelope.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from numpy.typing import NDArray

from handler.engine import compact
from handler.engine.types import (
    DEFAULT_SCORE_WEIGHTS,
    EmbeddingEngine,
    Encoded,
    ModelInfo,
    ModelRegistry,
    Ranking,
    Scores,
    TokenInfo,
)
from handler.errors import ApiError, Dialect, ErrorKind, invalid
from handler.logging import RequestRecord
from handler.model_threads import ModelThreads
from handler.settings import Settings

TOKEN_IDS_REFUSED = (
    "This service does not accept token-id input: 'input' must be a string or an array of "
    "strings. Arrays of integers are usually tiktoken ids sent by LangChain's OpenAIEmbeddings, "
    "which mean nothing to this model's tokenizer. Fix: OpenAIEmbeddings(..., "
    "check_embedding_ctx_length=False) sends the text itself."
)


@dataclass(frozen=True)
class EmbedRequest:
    """One embedding request, as any dialect says it. `texts` or, where the dialect allows
    them, `token_ids`; the naming fields say how the dialect calls things in its messages."""

    dialect: Dialect
    model: str | None
    texts: Sequence[str] = ()
    token_ids: Sequence[Sequence[int]] | None = None
    dense: bool = True
    sparse: bool | None = None  # None: on when the model has sparse weights
    colbert: bool = False
    max_length: int | None = None
    truncate: bool = True
    dimensions: int | None = None
    # Compact forms of the dense vectors (Cohere's names), keyed by type in `Embedded.compact`.
    embedding_types: Sequence[str] | None = None
    model_param: str = "model"
    param: str = "input"  # the field that holds the inputs
    item: str = "input[{index}]"  # one input, for messages
    outputs_named: str = "dense, sparse or colbert"  # the switches, when all are off


@dataclass(frozen=True)
class Embedded:
    engine: EmbeddingEngine  # the model that answered (dialects key sparse weights through it)
    encoded: Encoded
    compact: dict[str, NDArray[Any]] | None = None  # by embedding type, when asked for

    @property
    def info(self) -> ModelInfo:
        return self.engine.info


@dataclass(frozen=True)
class Scored:
    info: ModelInfo
    scores: Scores


@dataclass(frozen=True)
class RerankRequest:
    """One query against documents, as any rerank dialect says it; the naming fields say how the
    dialect calls its query and documents in messages."""

    dialect: Dialect
    model: str | None
    query: str
    documents: Sequence[str]
    weights: Sequence[float] = DEFAULT_SCORE_WEIGHTS
    mode: str | None = None  # None: every component the model has
    max_length: int | None = None
    truncate: bool = True
    query_param: str = "query"
    param: str = "documents"


@dataclass(frozen=True)
class Reranked:
    info: ModelInfo
    ranking: Ranking

    def order(self, top_n: int | None = None) -> list[int]:
        """Document indices, best first (ties keep input order), at most `top_n` of them."""
        scores = self.ranking.scores
        ranked = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
        return ranked if top_n is None else ranked[:top_n]


@dataclass(frozen=True)
class Tokenized:
    info: ModelInfo
    tokens: list[list[TokenInfo]]


@dataclass(frozen=True)
class Decoded:
    info: ModelInfo
    texts: list[str]


class Service:
    """The served models (or why there are none), the settings that limit requests, and the
    threads the requests that run the models run on (`threads`: the dialects' model routes run
    there whole, handler/api/routing.py)."""

    def __init__(
        self, settings: Settings, registry: ModelRegistry | None, load_error: str | None = None
    ):
        self.settings = settings
        self.registry = registry
        self.load_error = load_error
        self.threads = ModelThreads(settings.max_concurrent_requests)

    # ---- models --------------------------------------------------------------------------------

    def models(self) -> ModelRegistry:
        if self.registry is None:
            raise ApiError(
                ErrorKind.UNAVAILABLE,
                f"The model is not loaded: {self.load_error or 'unknown reason'}",
                code="model_not_loaded",
            )
        return self.registry

    def find(self, name: str, *, param: str = "model") -> EmbeddingEngine:
        """A served model by id or alias, else 404 model_not_found (whatever ALLOW_ANY_MODEL
        says: this is for /models/{id} lookups)."""
        registry = self.models()
        engine = registry.get(name)
        if engine is None:
            raise ApiError(
                ErrorKind.MODEL_NOT_FOUND,
                f"The model '{name}' does not exist. This service serves: "
                f"{served_names(registry)}.",
                param=param,
            )
        return engine

    def resolve(self, name: str | None, *, param: str = "model") -> EmbeddingEngine:
        """The engine for a request's `model`. None means the default model; an unknown name is
        a 404 unless ALLOW_ANY_MODEL=true, when the default model answers any name."""
        registry = self.models()
        if name is None:
            return registry.default
        engine = registry.get(name)
        if engine is not None:
            return engine
        if self.settings.allow_any_model:
            return registry.default
        return self.find(name, param=param)

    # ---- requests ------------------------------------------------------------------------------

    def embed(self, record: RequestRecord, request: EmbedRequest) -> Embedded:
        engine = self.resolve(request.model, param=request.model_param)
        info = engine.info
        limit = self.max_inputs(request.dialect)
        run: Callable[..., Encoded]
        if request.token_ids is not None:
            if not self.settings.allow_token_ids:
                raise invalid(TOKEN_IDS_REFUSED, param="input", code="token_ids_not_accepted")
            check_count(len(request.token_ids), limit=limit, param=request.param)
            run, n = functools.partial(engine.encode_ids, request.token_ids), len(request.token_ids)
        else:
            check_texts(request.texts, limit=limit, param=request.param, item=request.item)
            run, n = functools.partial(engine.encode, request.texts), len(request.texts)
        sparse = info.capabilities.sparse if request.sparse is None else request.sparse
        dense = request.dense
        types = request.embedding_types
        if types is not None:
            compact.check_types(
                types,
                ranges=engine.embedding_ranges,
                dimensions=request.dimensions,
                model_id=info.id,
            )
            dense = True  # every embedding type is a form of the dense vectors
        if not (dense or sparse or request.colbert):
            raise invalid(f"Ask for at least one of {request.outputs_named}.", code="invalid_input")
        encoded = run(
            dense=dense,
            sparse=sparse,
            colbert=request.colbert,
            max_length=self.max_length(info, request.max_length),
            truncate=request.truncate,
            max_tokens=self.settings.max_tokens_per_request,
            dimensions=request.dimensions,
        )
        record_run(record, info, n, encoded.token_counts, encoded.timings_ms, encoded.batched_with)
        record.counts["truncated"] = sum(encoded.truncated)
        record_sources(record, encoded.sources, cache_on=self.settings.embed_cache_size > 0)
        if types is None or encoded.dense is None:
            return Embedded(engine, encoded)
        return Embedded(
            engine, encoded, compact.compact(encoded.dense, types, engine.embedding_ranges)
        )

    def score(
        self,
        record: RequestRecord,
        *,
        model: str | None,
        sentences_1: Sequence[str],
        sentences_2: Sequence[str],
        weights: Sequence[float],
        max_length: int | None,
    ) -> Scored:
        engine = self.resolve(model)
        info = engine.info
        limit = self.max_inputs("native")
        check_texts(sentences_1, limit=limit, param="sentences_1", item="sentences_1[{index}]")
        check_texts(sentences_2, limit=limit, param="sentences_2", item="sentences_2[{index}]")
        scores = engine.score(
            sentences_1,
            sentences_2,
            weights=weights,
            max_length=self.max_length(info, max_length),
            max_tokens=self.settings.max_tokens_per_request,
        )
        inputs = len(sentences_1) + len(sentences_2)
        record_run(
            record, info, inputs, scores.token_counts, scores.timings_ms, scores.batched_with
        )
        return Scored(info, scores)

    def rerank(self, record: RequestRecord, request: RerankRequest) -> Reranked:
        """The documents scored against the query with BGE-M3's own scores; MAX_INPUTS_* of the
        dialect bound the documents, MAX_TOKENS_PER_REQUEST the query and documents together."""
        engine = self.resolve(request.model)
        info = engine.info
        if request.query == "":
            raise invalid(
                f"'{request.query_param}' is an empty string; send the text to rank against.",
                param=request.query_param,
                code="empty_input",
            )
        check_texts(
            request.documents,
            limit=self.max_inputs(request.dialect),
            param=request.param,
            item=request.param + "[{index}]",
        )
        ranking = engine.rank(
            request.query,
            request.documents,
            weights=request.weights,
            mode=request.mode,
            max_length=self.max_length(info, request.max_length),
            truncate=request.truncate,
            max_tokens=self.settings.max_tokens_per_request,
        )
        record_run(
            record,
            info,
            1 + len(request.documents),
            ranking.token_counts,
            ranking.timings_ms,
            ranking.batched_with,
        )
        return Reranked(info, ranking)

    def tokenize(
        self,
        record: RequestRecord,
        *,
        model: str | None,
        texts: Sequence[str],
        add_special_tokens: bool,
        param: str = "inputs",
    ) -> Tokenized:
        """The served model's own tokens for each text, uncut (an empty text is fine: it has
        the template's tokens only). MAX_INPUTS_NATIVE bounds the texts."""
        engine = self.resolve(model)
        check_count(len(texts), limit=self.max_inputs("native"), param=param)
        tokens = engine.tokens(texts, add_special_tokens=add_special_tokens)
        record.model = engine.info.id
        record.inputs = len(texts)
        record.tokens = sum(len(t) for t in tokens)
        return Tokenized(engine.info, tokens)

    def decode(
        self,
        record: RequestRecord,
        *,
        model: str | None,
        ids: Sequence[Sequence[int]],
        skip_special_tokens: bool,
        param: str = "ids",
    ) -> Decoded:
        engine = self.resolve(model)
        check_count(len(ids), limit=self.max_inputs("native"), param=param)
        texts = engine.decode(ids, skip_special_tokens=skip_special_tokens)
        record.model = engine.info.id
        record.inputs = len(ids)
        record.tokens = sum(len(s) for s in ids)
        return Decoded(engine.info, texts)

    # ---- limits --------------------------------------------------------------------------------

    def max_inputs(self, dialect: Dialect) -> int:
        settings = self.settings
        return {
            "openai": settings.max_inputs_openai,
            "v2": settings.max_inputs_v2,
            "native": settings.max_inputs_native,
        }[dialect]

    def max_length(self, info: ModelInfo, requested: int | None) -> int:
        """Tokens per input: the model's own limit, capped by MAX_INPUT_TOKENS and the request."""
        limit = info.max_length
        if self.settings.max_input_tokens is not None:
            limit = min(limit, self.settings.max_input_tokens)
        if requested is not None:
            if requested < 1:
                raise invalid("'max_length' must be positive.", param="max_length")
            limit = min(limit, requested)
        return limit


def served_names(registry: ModelRegistry) -> str:
    return ", ".join(
        repr(e.info.id) + (f" (aliases: {', '.join(e.info.aliases)})" if e.info.aliases else "")
        for e in registry
    )


def check_count(n: int, *, limit: int, param: str) -> None:
    if n == 0:
        raise invalid(f"'{param}' must not be empty.", param=param, code="empty_input")
    if n > limit:
        raise invalid(
            f"Too many inputs: {n} in one request; at most {limit} are allowed. Split the request.",
            param=param,
            code="too_many_inputs",
        )


def check_texts(texts: Sequence[str], *, limit: int, param: str, item: str) -> None:
    """Non-empty, not too many, and no empty string (OpenAI rejects them too: an empty text has
    no content to embed, and a silent "zero" vector would poison an index)."""
    check_count(len(texts), limit=limit, param=param)
    for index, text in enumerate(texts):
        if text == "":
            raise invalid(
                f"{item.format(index=index)} is an empty string; every input must have text.",
                param=param,
                code="empty_input",
            )


def record_sources(record: RequestRecord, sources: Sequence[str], *, cache_on: bool) -> None:
    """How many inputs shared an identical input's run, and, with the cache on, its hits and
    misses (a miss is an input that ran)."""
    record.counts["shared"] = sources.count("shared")
    if cache_on:
        record.counts["cache_hits"] = sources.count("cached")
        record.counts["cache_misses"] = sources.count("computed")


def record_run(
    record: RequestRecord,
    info: ModelInfo,
    inputs: int,
    token_counts: Sequence[int],
    timings_ms: dict[str, float],
    batched_with: int,
) -> None:
    record.model = info.id
    record.inputs = inputs
    record.tokens = sum(token_counts)
    record.add_timings(timings_ms)
    record.batched_with = batched_with
