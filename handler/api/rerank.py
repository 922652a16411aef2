"""Rerank dialects: POST /v1/rerank (and /v2/rerank) in the shape Cohere's and Jina's rerank APIs
share, and POST /rerank in text-embeddings-inference's shape.

The score is BGE-M3's own (handler/engine/scoring.py, `rank_documents`): by default
`colbert+sparse+dense` with /score's default weights [0.4, 0.2, 0.4], for a dense-only model the
dense cosine. Two extensions on both shapes choose it per request: `mode` (`dense`, `sparse`,
`colbert` or a combination joined by `+`) and `weights` ([dense, sparse, colbert]). The query and
the documents are encoded in one engine call, so the query is encoded once.

Scores are similarities, not calibrated probabilities: Cohere describes `relevance_score` as in
[0, 1]; BGE-M3's hybrid lies within [-1, 1] and, in practice, mostly within [0, 1]. TEI's
`raw_scores` is accepted and changes nothing, since these scores are not logits to squash.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request

from handler.api.body import WEIGHTS_HINT, PositiveInt, Weight, json_body
from handler.api.docs import body_doc
from handler.api.render import FastJSONResponse, usage
from handler.api.routing import compute, record_of, service_of
from handler.engine.types import DEFAULT_SCORE_WEIGHTS
from handler.errors import dialect_for
from handler.service import Reranked, RerankRequest

router = APIRouter(tags=["rerank"])

MODE_DOC = (
    "Extension: the score's components, `dense`, `sparse`, `colbert` or several joined by `+`. "
    "Default: every component the model has (`colbert+sparse+dense` for BGE-M3)."
)
WEIGHTS_DOC = "Extension: [dense, sparse, colbert] weights of a combined mode, as in /score."


class RerankDocument(BaseModel):
    model_config = ConfigDict(extra="ignore")

    text: str


class CohereRerankRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    query: str
    documents: list[str | RerankDocument] = Field(
        description="Strings, or objects with a `text` field (Cohere v1's document objects)."
    )
    model: str | None = Field(default=None, description="Omitted: the default model.")
    top_n: PositiveInt | None = Field(default=None, description="Return only the best N.")
    return_documents: bool = Field(
        default=False, description="true: each result carries `document: {text}`."
    )
    max_tokens_per_doc: PositiveInt | None = Field(
        default=None, description="Tokens per text (Cohere v2); capped at the model's limit."
    )
    mode: str | None = Field(default=None, description=MODE_DOC)
    weights: list[Weight] = Field(
        default_factory=lambda: list(DEFAULT_SCORE_WEIGHTS), description=WEIGHTS_DOC
    )
    truncate: bool = Field(
        default=True, description="Extension: false makes an over-long text a 400."
    )


class TeiRerankRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    query: str
    texts: list[str]
    raw_scores: bool = Field(default=False, description="Accepted; the scores are the same.")
    return_text: bool = False
    truncate: bool = Field(
        default=True, description="false makes an over-long text a 400 (TEI's default is false)."
    )
    model: str | None = Field(default=None, description="Extension: a served model id or alias.")
    mode: str | None = Field(default=None, description=MODE_DOC)
    weights: list[Weight] = Field(
        default_factory=lambda: list(DEFAULT_SCORE_WEIGHTS), description=WEIGHTS_DOC
    )


COHERE_HINTS = {
    "query": "'query' must be a string.",
    "documents": "'documents' must be an array of strings or of objects with a 'text' string.",
    "weights": WEIGHTS_HINT,
}
TEI_HINTS = {
    "query": "'query' must be a string.",
    "texts": "'texts' must be an array of strings.",
    "weights": WEIGHTS_HINT,
}


class RerankResultDocument(BaseModel):
    text: str


class RerankResult(BaseModel):
    index: int
    relevance_score: float
    document: RerankResultDocument | None = None


class RerankUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class CohereRerankResponse(BaseModel):
    id: str
    model: str
    results: list[RerankResult]
    usage: RerankUsage


class TeiRank(BaseModel):
    index: int
    score: float
    text: str | None = None


def _texts(documents: list[str | RerankDocument]) -> list[str]:
    return [d if isinstance(d, str) else d.text for d in documents]


@router.post(
    "/v1/rerank",
    summary="Rerank documents against a query (Cohere / Jina shape, BGE-M3's own scores)",
    response_model=None,
    responses={200: {"model": CohereRerankResponse}},
    openapi_extra=body_doc(CohereRerankRequest),
)
@router.post(
    "/v2/rerank",
    summary="Rerank (Cohere v2 path; same shape as /v1/rerank)",
    response_model=None,
    responses={200: {"model": CohereRerankResponse}},
    openapi_extra=body_doc(CohereRerankRequest),
)
@compute
def cohere_rerank(
    request: Request,
    body: Annotated[CohereRerankRequest, Depends(json_body(CohereRerankRequest, COHERE_HINTS))],
) -> FastJSONResponse:
    service = service_of(request)
    record = record_of(request)
    documents = _texts(body.documents)
    reranked = service.rerank(
        record,
        RerankRequest(
            dialect=dialect_for(request.url.path, service.settings.route_prefix),
            model=body.model,
            query=body.query,
            documents=documents,
            weights=body.weights,
            mode=body.mode,
            max_length=body.max_tokens_per_doc,
            truncate=body.truncate,
        ),
    )
    scores = reranked.ranking.scores
    results: list[dict[str, Any]] = []
    for index in reranked.order(body.top_n):
        result: dict[str, Any] = {"index": index, "relevance_score": scores[index]}
        if body.return_documents:
            result["document"] = {"text": documents[index]}
        results.append(result)
    return FastJSONResponse(
        {
            "id": record.request_id,
            "model": reranked.info.id,
            "results": results,
            "usage": usage(sum(reranked.ranking.token_counts)),
        }
    )


@router.post(
    "/rerank",
    summary="Rerank texts against a query (text-embeddings-inference shape)",
    response_model=None,
    responses={200: {"model": list[TeiRank]}},
    openapi_extra=body_doc(TeiRerankRequest),
)
@compute
def tei_rerank(
    request: Request,
    body: Annotated[TeiRerankRequest, Depends(json_body(TeiRerankRequest, TEI_HINTS))],
) -> FastJSONResponse:
    reranked: Reranked = service_of(request).rerank(
        record_of(request),
        RerankRequest(
            dialect="native",
            model=body.model,
            query=body.query,
            documents=body.texts,
            weights=body.weights,
            mode=body.mode,
            truncate=body.truncate,
            param="texts",
        ),
    )
    scores = reranked.ranking.scores
    ranks: list[dict[str, Any]] = []
    for index in reranked.order():
        rank: dict[str, Any] = {"index": index, "score": scores[index]}
        if body.return_text:
            rank["text"] = body.texts[index]
        ranks.append(rank)
    return FastJSONResponse(ranks)
