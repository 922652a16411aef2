"""v2 dialect: POST /api/data/embedding/version/2, as Volcengine's embedding v2.

Request: `{"model": {"model_name", "params": {return_dense, return_sparse, return_token_usage}},
"data": [{"data_type": "text", "text"}]}` with at most MAX_INPUTS_V2 (100) items.
Response: `{"code": 0, "message": "success", "request_id", "data": {"sentence_dense_embedding",
"sentence_sparse_embedding", "token_usage"}}`; each key only when asked for. Sparse maps are keyed
by token string, as Volcengine documents them. `request_id` is this request's id, also sent as
`X-Request-Id`.

Defaults as in Volcengine's documentation and SDKs: dense on; sparse on for a model that has sparse
weights and off otherwise (asking a dense-only model for sparse is a 400); token usage off.
Images (`data_type` image / text-image) are a 400: this service embeds text only.
Auth is a Bearer key like the other dialects; Volcengine's HMAC request signing is not supported.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request

from handler.api.body import json_body
from handler.api.docs import body_doc
from handler.api.render import FastJSONResponse, sparse_out, truncated_flags
from handler.api.routing import compute, record_of, service_of
from handler.errors import invalid
from handler.service import EmbedRequest

router = APIRouter(tags=["v2"])

PATH = "/api/data/embedding/version/2"


class V2Params(BaseModel):
    model_config = ConfigDict(extra="ignore")

    return_dense: bool = True
    return_sparse: bool | None = Field(
        default=None, description="Default: true for a model with sparse weights (bge-m3)."
    )
    return_token_usage: bool = False
    truncate: bool = Field(
        default=True, description="Extension: false makes an over-long text a 400."
    )


class V2Model(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model_name: str
    params: V2Params | None = None


class V2Item(BaseModel):
    model_config = ConfigDict(extra="ignore")

    data_type: str
    text: str | None = None
    image: str | None = None


class V2EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: V2Model
    data: list[V2Item]


class V2TokenUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class V2Result(BaseModel):
    sentence_dense_embedding: list[list[float]] | None = None
    sentence_sparse_embedding: list[dict[str, float]] | None = None
    truncated: list[bool] | None = Field(
        default=None, description="Extension: per text, cut to max_length; only when one was."
    )
    token_usage: V2TokenUsage | None = None


class V2EmbeddingResponse(BaseModel):
    code: Literal[0] = 0
    message: str = "success"
    request_id: str
    data: V2Result


def _texts(items: list[V2Item]) -> list[str]:
    texts: list[str] = []
    for index, item in enumerate(items):
        kind = item.data_type.strip().lower()
        if kind in ("image", "text-image"):
            raise invalid(
                f"images are not supported: data[{index}].data_type is '{item.data_type}', but "
                "this service embeds text only; send data_type 'text'",
                param=f"data[{index}].data_type",
                code="unsupported_data_type",
            )
        if kind != "text":
            raise invalid(
                f"data[{index}].data_type must be 'text', not '{item.data_type}'",
                param=f"data[{index}].data_type",
                code="unsupported_data_type",
            )
        if item.text is None:
            raise invalid(
                f"data[{index}].text is required when data_type is 'text'",
                param=f"data[{index}].text",
            )
        texts.append(item.text)
    return texts


# Volcengine lists POST and GET (its SDKs send POST); both are documented, so that a 405's Allow
# header names only documented methods.
@router.get(
    PATH,
    summary="The same as POST (Volcengine lists GET too)",
    response_model=None,
    responses={200: {"model": V2EmbeddingResponse}},
    openapi_extra=body_doc(V2EmbeddingRequest),
)
@router.post(
    PATH,
    summary="Embed texts (Volcengine embedding v2 wire format)",
    response_model=None,
    responses={200: {"model": V2EmbeddingResponse}},
    openapi_extra=body_doc(V2EmbeddingRequest),
)
@compute
def embedding_v2(
    request: Request,
    body: Annotated[V2EmbeddingRequest, Depends(json_body(V2EmbeddingRequest))],
) -> FastJSONResponse:
    record = record_of(request)
    params = body.model.params or V2Params()
    embedded = service_of(request).embed(
        record,
        EmbedRequest(
            dialect="v2",
            model=body.model.model_name,
            texts=_texts(body.data),
            dense=params.return_dense,
            sparse=params.return_sparse,
            truncate=params.truncate,
            model_param="model.model_name",
            param="data",
            item="data[{index}].text",
            outputs_named="return_dense or return_sparse",
        ),
    )
    encoded = embedded.encoded
    result: dict[str, Any] = {}
    if encoded.dense is not None:
        result["sentence_dense_embedding"] = encoded.dense
    if encoded.sparse is not None:
        result["sentence_sparse_embedding"] = [
            sparse_out(embedded.engine, weights, "token") for weights in encoded.sparse
        ]
    truncated = truncated_flags(encoded.truncated)
    if truncated is not None:
        result["truncated"] = truncated
    if params.return_token_usage:
        tokens = encoded.total_tokens
        result["token_usage"] = {
            "prompt_tokens": tokens,
            "completion_tokens": 0,
            "total_tokens": tokens,
        }
    return FastJSONResponse(
        {"code": 0, "message": "success", "request_id": record.request_id, "data": result}
    )
