"""Native BGE-M3 dialect: POST /embeddings, POST /score, GET /models, GET /models/{id}.

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

from handler.api.body import WEIGHTS_HINT, PositiveInt, Weight, json_body
from handler.api.docs import body_doc
from handler.api.render import (
    FastJSONResponse,
    SparseFormat,
    sparse_out,
    truncated_flags,
    usage,
)
from handler.api.routing import compute, record_of, service_of
from handler.engine.compact import EmbeddingType
from handler.engine.types import DEFAULT_SCORE_WEIGHTS, ModelInfo
from handler.service import EmbedRequest

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
    batch_size: PositiveInt | None = Field(
        default=None, description="Accepted and ignored (the engine batches by tokens)."
    )
    max_length: PositiveInt | None = Field(
        default=None, description="Tokens per input; capped at the model's own limit."
    )
    truncate: bool = Field(default=True, description="false: an over-long input is a 400.")
    sparse_format: SparseFormat = "token"
    embedding_types: list[EmbeddingType] | None = Field(
        default=None,
        description="Compact dense vectors, Cohere's names (float, int8, uint8, binary, "
        "ubinary), several at once: the response's `embeddings` is keyed by type and replaces "
        "`dense_vecs`.",
    )


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    sentences_1: str | list[str]
    sentences_2: str | list[str]
    weights: list[Weight] = Field(
        default_factory=lambda: list(DEFAULT_SCORE_WEIGHTS),
        description="[dense, sparse, colbert] weights of the hybrid scores.",
    )
    model: str | None = None
    max_length: PositiveInt | None = None


EMBED_HINTS = {
    "input": "'input' must be a non-empty string or an array of strings.",
    "embedding_types": "'embedding_types' must be an array of: float, int8, uint8, binary, "
    "ubinary.",
}
SCORE_HINTS = {
    "sentences_1": "'sentences_1' must be a string or an array of strings.",
    "sentences_2": "'sentences_2' must be a string or an array of strings.",
    "weights": WEIGHTS_HINT,
}


class NativeUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class NativeEmbeddingResponse(BaseModel):
    model: str
    dense_vecs: list[list[float]] | None = None
    embeddings: dict[str, list[list[float]] | list[list[int]]] | None = None
    sparse_vecs: list[dict[str, Any]] | None = None
    colbert_vecs: list[list[list[float]]] | None = None
    truncated: list[bool] | None = Field(
        default=None, description="Per input: cut to max_length. Present only when one was."
    )
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
@compute
def embeddings(
    request: Request,
    body: Annotated[
        NativeEmbeddingRequest, Depends(json_body(NativeEmbeddingRequest, EMBED_HINTS))
    ],
) -> FastJSONResponse:
    wanted = body.input_type
    embedded = service_of(request).embed(
        record_of(request),
        EmbedRequest(
            dialect="native",
            model=body.model,
            texts=_as_list(body.input),
            dense=wanted.dense,
            sparse=wanted.sparse,
            colbert=wanted.colbert,
            max_length=body.max_length,
            truncate=body.truncate,
            embedding_types=body.embedding_types,
            item="input" if isinstance(body.input, str) else "input[{index}]",
        ),
    )
    encoded = embedded.encoded
    out: dict[str, Any] = {"model": embedded.info.id}
    if embedded.compact is not None:
        out["embeddings"] = embedded.compact
    elif encoded.dense is not None:
        out["dense_vecs"] = encoded.dense
    if encoded.sparse is not None:
        out["sparse_vecs"] = [
            sparse_out(embedded.engine, w, body.sparse_format) for w in encoded.sparse
        ]
    if encoded.colbert is not None:
        out["colbert_vecs"] = encoded.colbert
    truncated = truncated_flags(encoded.truncated)
    if truncated is not None:
        out["truncated"] = truncated
    out["usage"] = usage(encoded.total_tokens)
    return FastJSONResponse(out)


@router.post(
    "/score",
    summary="Pairwise dense, sparse, ColBERT and hybrid scores",
    response_model=None,
    responses={200: {"model": ScoreResponse}},
    openapi_extra=body_doc(ScoreRequest),
)
@compute
def score(
    request: Request,
    body: Annotated[ScoreRequest, Depends(json_body(ScoreRequest, SCORE_HINTS))],
) -> FastJSONResponse:
    scored = service_of(request).score(
        record_of(request),
        model=body.model,
        sentences_1=_as_list(body.sentences_1),
        sentences_2=_as_list(body.sentences_2),
        weights=body.weights,
        max_length=body.max_length,
    )
    scores = scored.scores
    out: dict[str, Any] = {"model": scored.info.id, "dense": [float(s) for s in scores.dense]}
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
async def list_models(request: Request) -> FastJSONResponse:
    registry = service_of(request).models()
    return FastJSONResponse({"object": "list", "data": [model_card(e.info) for e in registry]})


@router.get(
    "/models/{model_id:path}",
    summary="Describe one served model (id or alias)",
    response_model=None,
    responses={200: {"model": NativeModel}},
)
async def get_model(request: Request, model_id: str) -> FastJSONResponse:
    return FastJSONResponse(model_card(service_of(request).find(model_id).info))
