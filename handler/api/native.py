"""Native BGE-M3 dialect (seed 003): POST /embeddings, POST /score, GET /models, GET /models/{id}.

/embeddings returns `dense_vecs`, `sparse_vecs`, `colbert_vecs` as asked by `input_type` (defaults
dense and sparse on, ColBERT off; sparse defaults to off for a dense-only model, and asking such a
model for sparse or ColBERT explicitly is a 400). `sparse_format` picks `token` (token-string keys,
the default), `id` (token-id keys as strings, FlagEmbedding's form) or `indices_values`
(`{"indices", "values"}` sorted by index, for Qdrant and Milvus). `batch_size` is accepted for
compatibility and ignored: the engine forms its own length-sorted, token-budgeted batches.

/score is pairwise (sentences_1[i] with sentences_2[i]), FlagEmbedding's compute_score. For a
dense-only model it answers the `dense` scores only (the other keys are absent).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request

from handler.api.common import (
    FastJSONResponse,
    SparseFormat,
    body_doc,
    check_request_tokens,
    check_texts,
    find_model,
    json_body,
    max_length_for,
    record_encoded,
    record_of,
    registry_of,
    resolve_model,
    sparse_out,
    state_of,
    usage,
)
from handler.engine.types import DEFAULT_SCORE_WEIGHTS, ModelInfo

router = APIRouter(tags=["native"])


class InputType(BaseModel):
    model_config = ConfigDict(extra="ignore")

    dense: bool = True
    sparse: bool | None = Field(
        default=None, description="Default: true when the model has sparse weights."
    )
    colbert: bool = False


class NativeEmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    input: str | list[str]
    model: str | None = Field(default=None, description="Omitted: the default model.")
    input_type: InputType = Field(default_factory=InputType)
    batch_size: int | None = Field(
        default=None, ge=1, description="Accepted and ignored (the engine batches by tokens)."
    )
    max_length: int | None = Field(
        default=None, ge=1, description="Tokens per input; capped at the model's own limit."
    )
    truncate: bool = Field(default=True, description="false: an over-long input is a 400.")
    sparse_format: SparseFormat = "token"


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    sentences_1: str | list[str]
    sentences_2: str | list[str]
    weights: list[float] = Field(
        default_factory=lambda: list(DEFAULT_SCORE_WEIGHTS),
        description="[dense, sparse, colbert] weights of the hybrid scores.",
    )
    model: str | None = None
    max_length: int | None = Field(default=None, ge=1)


EMBED_HINTS = {"input": "'input' must be a non-empty string or an array of strings."}
SCORE_HINTS = {
    "sentences_1": "'sentences_1' must be a string or an array of strings.",
    "sentences_2": "'sentences_2' must be a string or an array of strings.",
    "weights": "'weights' must be three numbers: [dense, sparse, colbert].",
}


class NativeUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class NativeEmbeddingResponse(BaseModel):
    model: str
    dense_vecs: list[list[float]] | None = None
    sparse_vecs: list[dict[str, Any]] | None = None
    colbert_vecs: list[list[list[float]]] | None = None
    usage: NativeUsage


class ScoreResponse(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    model: str
    dense: list[float]
    sparse: list[float] | None = None
    colbert: list[float] | None = None
    sparse_dense: list[float] | None = Field(default=None, alias="sparse+dense")
    colbert_sparse_dense: list[float] | None = Field(default=None, alias="colbert+sparse+dense")
    usage: NativeUsage


class Capabilities(BaseModel):
    dense: bool
    sparse: bool
    colbert: bool


class NativeModel(BaseModel):
    id: str
    object: Literal["model"] = "model"
    aliases: list[str]
    embedding_dims: int
    max_length: int
    capabilities: Capabilities
    recipe: str
    precision: str
    sha256: str
    source: str
    revision: str | None
    created: int
    device: str


class NativeModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[NativeModel]


def model_card(info: ModelInfo) -> dict[str, Any]:
    caps = info.capabilities
    return {
        "id": info.id,
        "object": "model",
        "aliases": list(info.aliases),
        "embedding_dims": info.dims,
        "max_length": info.max_length,
        "capabilities": {"dense": caps.dense, "sparse": caps.sparse, "colbert": caps.colbert},
        "recipe": info.recipe,
        "precision": info.precision,
        "sha256": info.fingerprint,
        "source": info.source,
        "revision": info.revision,
        "created": info.created,
        "device": info.device,
    }


def _as_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


@router.post(
    "/embeddings",
    summary="Dense, sparse and ColBERT vectors (native BGE-M3)",
    response_model=None,
    responses={200: {"model": NativeEmbeddingResponse}},
    openapi_extra=body_doc(NativeEmbeddingRequest),
)
def embeddings(
    request: Request,
    body: Annotated[
        NativeEmbeddingRequest, Depends(json_body(NativeEmbeddingRequest, EMBED_HINTS))
    ],
) -> FastJSONResponse:
    state = state_of(request)
    engine = resolve_model(state, body.model)
    info = engine.info
    texts = _as_list(body.input)
    check_texts(
        texts,
        limit=state.settings.max_inputs_native,
        param="input",
        item="input" if isinstance(body.input, str) else "input[{index}]",
    )
    wanted = body.input_type
    sparse = info.capabilities.sparse if wanted.sparse is None else wanted.sparse
    max_length = max_length_for(state, info, body.max_length)
    check_request_tokens(state, engine, texts, max_length, param="input")
    encoded = engine.encode(
        texts,
        dense=wanted.dense,
        sparse=sparse,
        colbert=wanted.colbert,
        max_length=max_length,
        truncate=body.truncate,
    )
    record_encoded(record_of(request), info, len(texts), encoded)

    out: dict[str, Any] = {"model": info.id}
    if encoded.dense is not None:
        out["dense_vecs"] = encoded.dense
    if encoded.sparse is not None:
        out["sparse_vecs"] = [sparse_out(engine, w, body.sparse_format) for w in encoded.sparse]
    if encoded.colbert is not None:
        out["colbert_vecs"] = encoded.colbert
    out["usage"] = usage(encoded.total_tokens)
    return FastJSONResponse(out)


@router.post(
    "/score",
    summary="Pairwise dense, sparse, ColBERT and hybrid scores",
    response_model=None,
    responses={200: {"model": ScoreResponse}},
    openapi_extra=body_doc(ScoreRequest),
)
def score(
    request: Request,
    body: Annotated[ScoreRequest, Depends(json_body(ScoreRequest, SCORE_HINTS))],
) -> FastJSONResponse:
    state = state_of(request)
    engine = resolve_model(state, body.model)
    info = engine.info
    first, second = _as_list(body.sentences_1), _as_list(body.sentences_2)
    limit = state.settings.max_inputs_native
    check_texts(first, limit=limit, param="sentences_1", item="sentences_1[{index}]")
    check_texts(second, limit=limit, param="sentences_2", item="sentences_2[{index}]")
    max_length = max_length_for(state, info, body.max_length)
    check_request_tokens(state, engine, [*first, *second], max_length, param="sentences_1")
    scores = engine.score(first, second, weights=body.weights, max_length=max_length)
    record = record_of(request)
    record.model = info.id
    record.inputs = len(first) + len(second)
    record.tokens = sum(scores.token_counts)
    record.add_timings(scores.timings_ms)
    record.batched_with = scores.batched_with

    out: dict[str, Any] = {"model": info.id, "dense": [float(s) for s in scores.dense]}
    for key, values in (
        ("sparse", scores.sparse),
        ("colbert", scores.colbert),
        ("sparse+dense", scores.sparse_dense),
        ("colbert+sparse+dense", scores.colbert_sparse_dense),
    ):
        if values is not None:
            out[key] = [float(s) for s in values]
    out["usage"] = usage(sum(scores.token_counts))
    return FastJSONResponse(out)


@router.get(
    "/models",
    summary="List the served models with dims, max length and capabilities",
    response_model=None,
    responses={200: {"model": NativeModelList}},
)
def list_models(request: Request) -> FastJSONResponse:
    registry = registry_of(state_of(request))
    return FastJSONResponse({"object": "list", "data": [model_card(e.info) for e in registry]})


@router.get(
    "/models/{model_id:path}",
    summary="Describe one served model (id or alias)",
    response_model=None,
    responses={200: {"model": NativeModel}},
)
def get_model(request: Request, model_id: str) -> FastJSONResponse:
    return FastJSONResponse(model_card(find_model(state_of(request), model_id).info))
