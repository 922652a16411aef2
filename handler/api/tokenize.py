"""Tokenizer routes in text-embeddings-inference's shapes: POST /tokenize and POST /decode.

They answer with the served model's own tokenizer (the one every embedding request is encoded
with), so a client counts tokens and chunks text exactly as the model will. An extension `model`
picks a served model (default: the default model).

/tokenize: `{"inputs": str | [str], "add_special_tokens": true}` -> one list of tokens per input
(also for a single string), each `{id, text, special, start, stop}`. `start`/`stop` are character
offsets into the input (Python string indices: `input[start:stop] == text`); TEI, written in
Rust, reports UTF-8 byte offsets, which are the same for ASCII text. Tokens the template adds
(`<s>`, `</s>`) are `special` with `start`/`stop` null. Nothing is cut: the count is the model's
view before `max_length` truncation.

/decode: `{"ids": [int] | [[int]], "skip_special_tokens": true}` -> one string per id list.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request

from handler.api.body import JsonInt, json_body
from handler.api.docs import body_doc
from handler.api.render import FastJSONResponse
from handler.api.routing import compute, record_of, service_of

router = APIRouter(tags=["tokenizer"])


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    inputs: str | list[str]
    add_special_tokens: bool = True
    model: str | None = Field(default=None, description="Extension: a served model id or alias.")


class DecodeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    ids: list[JsonInt] | list[list[JsonInt]]
    skip_special_tokens: bool = True
    model: str | None = Field(default=None, description="Extension: a served model id or alias.")


class SimpleToken(BaseModel):
    id: int
    text: str
    special: bool
    start: int | None
    stop: int | None


def _sequences(ids: list[int] | list[list[int]]) -> list[list[int]]:
    """One id list is one sequence; a list of lists is several."""
    return (
        [[i for i in ids if isinstance(i, int)]]
        if all(isinstance(i, int) for i in ids)
        else [list(s) for s in ids if isinstance(s, list)]
    )


TOKENIZE_HINTS = {"inputs": "'inputs' must be a string or an array of strings."}
DECODE_HINTS = {"ids": "'ids' must be an array of token ids or an array of token-id arrays."}


@router.post(
    "/tokenize",
    summary="The model's own tokens, with character offsets (text-embeddings-inference shape)",
    response_model=None,
    responses={200: {"model": list[list[SimpleToken]]}},
    openapi_extra=body_doc(TokenizeRequest),
)
@compute  # no forward pass, but CPU work that grows with the input, like the tokenize stage
def tokenize(
    request: Request,
    body: Annotated[TokenizeRequest, Depends(json_body(TokenizeRequest, TOKENIZE_HINTS))],
) -> FastJSONResponse:
    texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
    tokenized = service_of(request).tokenize(
        record_of(request),
        model=body.model,
        texts=texts,
        add_special_tokens=body.add_special_tokens,
    )
    out: list[list[dict[str, Any]]] = [
        [
            {"id": t.id, "text": t.text, "special": t.special, "start": t.start, "stop": t.stop}
            for t in tokens
        ]
        for tokens in tokenized.tokens
    ]
    return FastJSONResponse(out)


@router.post(
    "/decode",
    summary="Token ids back to text (text-embeddings-inference shape)",
    response_model=None,
    responses={200: {"model": list[str]}},
    openapi_extra=body_doc(DecodeRequest),
)
@compute
def decode(
    request: Request,
    body: Annotated[DecodeRequest, Depends(json_body(DecodeRequest, DECODE_HINTS))],
) -> FastJSONResponse:
    sequences = _sequences(body.ids)
    decoded = service_of(request).decode(
        record_of(request),
        model=body.model,
        ids=sequences,
        skip_special_tokens=body.skip_special_tokens,
    )
    return FastJSONResponse(decoded.texts)
