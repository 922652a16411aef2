"""OpenAI dialect: POST /v1/embeddings, GET /v1/models, GET /v1/models/{id}.

Request and response follow OpenAI's `CreateEmbeddingRequest` / `CreateEmbeddingResponse`. Three
opt-in extensions, absent from the response unless asked: `return_sparse` (adds `sparse` to each
item, as the self-hosted BGE-M3 service seed does), `sparse_format`, and `truncate: false` (an
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
from pydantic import BaseModel, ConfigDict, Field, StrictInt
from starlette.requests import Request

from handler.api.common import (
    FastJSONResponse,
    ServiceState,
    SparseFormat,
    body_doc,
    check_count,
    check_request_tokens,
    check_texts,
    find_model,
    json_body,
    max_length_for,
    raise_too_many_tokens,
    record_encoded,
    record_of,
    registry_of,
    resolve_model,
    sparse_out,
    state_of,
    usage,
)
from handler.engine.heads import truncate_dims
from handler.engine.types import EmbeddingEngine, Encoded, ModelInfo
from handler.errors import invalid

router = APIRouter(tags=["OpenAI"])

TOKEN_IDS_REFUSED = (
    "This service does not accept token-id input: 'input' must be a string or an array of "
    "strings. Arrays of integers are usually tiktoken ids sent by LangChain's OpenAIEmbeddings, "
    "which mean nothing to this model's tokenizer. Fix: OpenAIEmbeddings(..., "
    "check_embedding_ctx_length=False) sends the text itself."
)


class OpenAIEmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    input: str | list[str] | list[StrictInt] | list[list[StrictInt]] = Field(
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
    dimensions: int | None = Field(
        default=None, ge=1, description="Keep the first N dimensions, then renormalise."
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
) -> tuple[list[str] | None, list[list[int]] | None]:
    if isinstance(value, str):
        return [value], None
    if not value:
        return [], None
    if all(isinstance(v, str) for v in value):
        return [str(v) for v in value], None
    if all(isinstance(v, int) for v in value):
        return None, [[int(v) for v in value]]  # type: ignore[arg-type]
    return None, [list(v) for v in value]  # type: ignore[arg-type]


def _encode_ids(
    state: ServiceState, engine: EmbeddingEngine, ids: list[list[int]], body: OpenAIEmbeddingRequest
) -> tuple[Encoded, int]:
    settings = state.settings
    if not settings.allow_token_ids:
        raise invalid(TOKEN_IDS_REFUSED, param="input", code="token_ids_not_accepted")
    info = engine.info
    check_count(len(ids), limit=settings.max_inputs_openai, param="input")
    for index, seq in enumerate(ids):
        if not seq:
            raise invalid(f"input[{index}] is an empty list of token ids.", param="input")
        bad = next((t for t in seq if not 0 <= t < info.vocab_size), None)
        if bad is not None:
            raise invalid(
                f"input[{index}] has token id {bad}, outside this model's vocabulary "
                f"[0, {info.vocab_size}). Token ids must come from this model's tokenizer.",
                param="input",
                code="token_id_out_of_range",
            )
    max_length = max_length_for(state, info, None)
    total = sum(min(len(s), max_length) for s in ids)
    if total > settings.max_tokens_per_request:
        raise_too_many_tokens(total, settings.max_tokens_per_request, "input")
    encoded = engine.encode_ids(
        ids, dense=True, sparse=body.return_sparse, max_length=max_length, truncate=body.truncate
    )
    return encoded, len(ids)


@router.post(
    "/v1/embeddings",
    summary="Create embeddings (OpenAI-compatible)",
    response_model=None,
    responses={200: {"model": OpenAIEmbeddingResponse}},
    openapi_extra=body_doc(OpenAIEmbeddingRequest),
)
def create_embeddings(
    request: Request,
    body: Annotated[OpenAIEmbeddingRequest, Depends(json_body(OpenAIEmbeddingRequest, HINTS))],
) -> FastJSONResponse:
    state = state_of(request)
    engine = resolve_model(state, body.model)
    info = engine.info
    if body.dimensions is not None and body.dimensions > info.dims:
        raise invalid(
            f"'dimensions' is {body.dimensions}, but model '{info.id}' has {info.dims}.",
            param="dimensions",
            code="invalid_dimensions",
        )
    texts, ids = _split_input(body.input)
    if ids is not None:
        encoded, n = _encode_ids(state, engine, ids, body)
    else:
        assert texts is not None
        check_texts(
            texts,
            limit=state.settings.max_inputs_openai,
            param="input",
            item="input[{index}]" if not isinstance(body.input, str) else "input",
        )
        max_length = max_length_for(state, info, None)
        check_request_tokens(state, engine, texts, max_length, param="input")
        encoded = engine.encode(
            texts,
            dense=True,
            sparse=body.return_sparse,
            max_length=max_length,
            truncate=body.truncate,
        )
        n = len(texts)
    record_encoded(record_of(request), info, n, encoded)

    dense = encoded.dense
    assert dense is not None
    if body.dimensions is not None and body.dimensions < dense.shape[1]:
        dense = truncate_dims(dense, body.dimensions)
    as_base64 = body.encoding_format == "base64"
    items: list[dict[str, Any]] = []
    for i in range(n):
        vector = dense[i]
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
            item["sparse"] = sparse_out(engine, encoded.sparse[i], body.sparse_format)
        items.append(item)
    tokens = encoded.total_tokens
    return FastJSONResponse(
        {"object": "list", "data": items, "model": info.id, "usage": usage(tokens)}
    )


@router.get(
    "/v1/models",
    summary="List the served models",
    response_model=None,
    responses={200: {"model": OpenAIModelList}},
)
def list_models(request: Request) -> FastJSONResponse:
    registry = registry_of(state_of(request))
    return FastJSONResponse(
        {"object": "list", "data": [model_card(engine.info) for engine in registry]}
    )


@router.get(
    "/v1/models/{model_id:path}",
    summary="Describe one served model (id or alias)",
    response_model=None,
    responses={200: {"model": OpenAIModel}},
)
def get_model(request: Request, model_id: str) -> FastJSONResponse:
    engine = find_model(state_of(request), model_id)
    return FastJSONResponse(model_card(engine.info))
