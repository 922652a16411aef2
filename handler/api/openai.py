"""OpenAI dialect: POST /v1/embeddings, GET /v1/models, GET /v1/models/{id}.

Request and response follow OpenAI's `CreateEmbeddingRequest` / `CreateEmbeddingResponse`. Three
opt-in extensions, absent from the response unless asked: `return_sparse` (adds `sparse` to each
item, as self-hosted BGE-M3 services do), `sparse_format`, and `truncate: false` (an
over-long input is a 400 instead of being cut).

Token-id input (`list[int]`, `list[list[int]]`) is refused unless ALLOW_TOKEN_IDS=true: LangChain's
OpenAIEmbeddings sends tiktoken ids by default, which are valid-looking numbers that mean nothing
to this model's vocabulary and would silently give garbage vectors.
"""

from __future__ import annotations

import base64
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request

from handler.api.body import JsonInt, PositiveInt, json_body
from handler.api.docs import body_doc
from handler.api.render import (
    FastJSONResponse,
    SparseFormat,
    sparse_out,
    truncated_header,
    usage,
)
from handler.api.routing import compute, record_of, service_of
from handler.engine.compact import EmbeddingType
from handler.engine.types import ModelInfo
from handler.service import EmbedRequest

router = APIRouter(tags=["OpenAI"])


class OpenAIEmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    input: str | list[str] | list[JsonInt] | list[list[JsonInt]] = Field(
        description="A string, an array of strings, or (with ALLOW_TOKEN_IDS=true) token ids of "
        "this model's vocabulary: an array of ids or an array of id arrays."
    )
    model: str | None = Field(
        default=None,
        description="A served model id or alias (GET /v1/models). Omitted: the default model.",
    )
    encoding_format: Literal["float", "base64"] | None = Field(
        default="float", description="`base64`: little-endian float32 bytes, base64-encoded."
    )
    # Strict, as OpenAI's schema says integer: "64" is refused, not read as 64.
    dimensions: PositiveInt | None = Field(
        default=None, description="Keep the first N dimensions, then renormalise."
    )
    user: str | None = None
    return_sparse: bool = Field(
        default=False, description="Extension: add `sparse` (lexical weights) to each item."
    )
    sparse_format: SparseFormat = Field(
        default="token",
        description="Extension: `token` (token-string keys), `id` (token-id keys) or "
        "`indices_values` ({indices, values}).",
    )
    truncate: bool = Field(
        default=True, description="Extension: false makes an over-long input a 400."
    )
    embedding_types: list[EmbeddingType] | None = Field(
        default=None,
        description="Extension: add `embeddings` to each item, the vector in each of these "
        "types (float, int8, uint8, binary, ubinary) keyed by type; `embedding` stays as "
        "`encoding_format` says.",
    )


HINTS = {
    "input": "'input' must be a non-empty string or an array of strings (or, where enabled, an "
    "array of token ids or of token-id arrays).",
    "encoding_format": "'encoding_format' must be 'float' or 'base64'.",
}


class EmbeddingItem(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str
    sparse: dict[str, Any] | None = None
    embeddings: dict[str, list[float] | list[int]] | None = None


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class OpenAIEmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingItem]
    model: str
    usage: Usage


class OpenAIModel(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class OpenAIModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIModel]


def _owned_by(info: ModelInfo) -> str:
    source = info.source
    # A hub id ("BAAI/bge-m3") is owned by its organisation; a local build by whoever runs it.
    if source.count("/") == 1 and not source.startswith((".", "/", "~")):
        return source.split("/", 1)[0]
    return "local"


def model_card(info: ModelInfo) -> dict[str, Any]:
    return {"id": info.id, "object": "model", "created": info.created, "owned_by": _owned_by(info)}


def _split_input(
    value: str | list[str] | list[int] | list[list[int]],
) -> tuple[list[str], list[list[int]] | None]:
    if isinstance(value, str):
        return [value], None
    if not value:
        return [], None
    if all(isinstance(v, str) for v in value):
        return [str(v) for v in value], None
    if all(isinstance(v, int) for v in value):
        return [], [[int(v) for v in value]]  # type: ignore[arg-type]
    return [], [list(v) for v in value]  # type: ignore[arg-type]


@router.post(
    "/v1/embeddings",
    summary="Create embeddings (OpenAI-compatible)",
    response_model=None,
    responses={200: {"model": OpenAIEmbeddingResponse}},
    openapi_extra=body_doc(OpenAIEmbeddingRequest),
)
@compute
def create_embeddings(
    request: Request,
    body: Annotated[OpenAIEmbeddingRequest, Depends(json_body(OpenAIEmbeddingRequest, HINTS))],
) -> FastJSONResponse:
    texts, ids = _split_input(body.input)
    embedded = service_of(request).embed(
        record_of(request),
        EmbedRequest(
            dialect="openai",
            model=body.model,
            texts=texts,
            token_ids=ids,
            sparse=body.return_sparse,
            truncate=body.truncate,
            dimensions=body.dimensions,
            embedding_types=body.embedding_types,
            item="input" if isinstance(body.input, str) else "input[{index}]",
        ),
    )
    encoded = embedded.encoded
    dense = encoded.dense
    assert dense is not None
    as_base64 = body.encoding_format == "base64"
    items: list[dict[str, Any]] = []
    for i, vector in enumerate(dense):
        item: dict[str, Any] = {
            "object": "embedding",
            "index": i,
            "embedding": (
                base64.b64encode(vector.astype("<f4", copy=False).tobytes()).decode("ascii")
                if as_base64
                else np.ascontiguousarray(vector)
            ),
        }
        if encoded.sparse is not None:
            item["sparse"] = sparse_out(embedded.engine, encoded.sparse[i], body.sparse_format)
        if embedded.compact is not None:
            item["embeddings"] = {kind: rows[i] for kind, rows in embedded.compact.items()}
        items.append(item)
    return FastJSONResponse(
        {
            "object": "list",
            "data": items,
            "model": embedded.info.id,
            "usage": usage(encoded.total_tokens),
        },
        headers=truncated_header(encoded.truncated),
    )


@router.get(
    "/v1/models",
    summary="List the served models",
    response_model=None,
    responses={200: {"model": OpenAIModelList}},
)
async def list_models(request: Request) -> FastJSONResponse:
    registry = service_of(request).models()
    return FastJSONResponse(
        {"object": "list", "data": [model_card(engine.info) for engine in registry]}
    )


@router.get(
    "/v1/models/{model_id:path}",
    summary="Describe one served model (id or alias)",
    response_model=None,
    responses={200: {"model": OpenAIModel}},
)
async def get_model(request: Request, model_id: str) -> FastJSONResponse:
    return FastJSONResponse(model_card(service_of(request).find(model_id).info))
