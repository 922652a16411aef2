"""Rerank on the fake engines: POST /v1/rerank and /v2/rerank (Cohere / Jina shape) through the
official `cohere` SDK on a loopback uvicorn server, POST /rerank (text-embeddings-inference
shape), and every score checked against /score for the same (query, document) pairs."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import cohere
import pytest
from fakes import FakeEngine, LiveServer, bge_m3_like, dense_only, make_app
from fastapi.testclient import TestClient

KEY = "sk-rerank-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
QUERY = "what is the capital of france"
DOCS = [
    "berlin is the capital of germany",
    "paris is the capital of france",
    "the capital of france is a large city",
    "bananas are yellow",
]


@pytest.fixture(scope="module")
def fake() -> FakeEngine:
    return bge_m3_like()


@pytest.fixture(scope="module")
def app_client(fake: FakeEngine) -> TestClient:
    return TestClient(make_app(fake, dense_only(), api_key=KEY, max_inputs_openai=8))


@pytest.fixture(scope="module")
def server(fake: FakeEngine) -> Iterator[LiveServer]:
    with LiveServer(make_app(fake, dense_only(), api_key=KEY)) as live:
        yield live


def reference(
    client: TestClient, query: str, docs: list[str], key: str, **extra: Any
) -> list[float]:
    """The scores /score gives for (query, doc) pairs: what every rerank score must equal."""
    r = client.post(
        "/score",
        json={"sentences_1": [query] * len(docs), "sentences_2": docs, **extra},
        headers=AUTH,
    )
    assert r.status_code == 200, r.text
    return [float(s) for s in r.json()[key]]


def best_first(scores: list[float]) -> list[int]:
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))


# ---- through the cohere SDK ----------------------------------------------------------------------


def test_cohere_v1_client_rerank_equals_score(server: LiveServer, app_client: TestClient) -> None:
    # GIVEN the cohere SDK pointed at the loopback server WHEN it reranks
    co = cohere.Client(api_key=KEY, base_url=server.url, timeout=60)
    response = co.rerank(
        model="bge-m3", query=QUERY, documents=DOCS, top_n=3, return_documents=True
    )
    # THEN the results are the /score colbert+sparse+dense values, best first, cut to top_n
    expected = reference(app_client, QUERY, DOCS, "colbert+sparse+dense")
    assert [r.index for r in response.results] == best_first(expected)[:3]
    for result in response.results:
        assert result.relevance_score == pytest.approx(expected[result.index], abs=1e-6)
        assert result.document is not None and result.document.text == DOCS[result.index]


def test_cohere_v2_client_rerank(server: LiveServer, app_client: TestClient) -> None:
    co = cohere.ClientV2(api_key=KEY, base_url=server.url, timeout=60)
    response = co.rerank(model="BAAI/bge-m3", query=QUERY, documents=DOCS)
    expected = reference(app_client, QUERY, DOCS, "colbert+sparse+dense")
    assert [r.index for r in response.results] == best_first(expected)
    assert [r.relevance_score for r in response.results] == pytest.approx(
        sorted(expected, reverse=True), abs=1e-6
    )


def test_cohere_client_sees_errors_as_its_exceptions(server: LiveServer) -> None:
    co = cohere.Client(api_key="wrong", base_url=server.url, timeout=60)
    with pytest.raises(cohere.UnauthorizedError):
        co.rerank(model="bge-m3", query=QUERY, documents=DOCS)
    co = cohere.Client(api_key=KEY, base_url=server.url, timeout=60)
    with pytest.raises(cohere.BadRequestError):
        co.rerank(model="bge-m3", query=QUERY, documents=[])


# ---- the Cohere / Jina shape ---------------------------------------------------------------------


def test_response_shape_and_usage(app_client: TestClient, fake: FakeEngine) -> None:
    r = app_client.post("/v1/rerank", json={"query": QUERY, "documents": DOCS}, headers=AUTH)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"id", "model", "results", "usage"}
    assert body["id"] == r.headers["x-request-id"] and body["model"] == "bge-m3"
    assert all(set(item) == {"index", "relevance_score"} for item in body["results"])
    tokens = sum(len(fake.tokenize(t)) for t in [QUERY, *DOCS])
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}


def test_query_is_encoded_once(app_client: TestClient, fake: FakeEngine) -> None:
    # WHEN four documents are ranked THEN the engine is called once, the query first and once
    app_client.post("/v1/rerank", json={"query": QUERY, "documents": DOCS}, headers=AUTH)
    name, call = fake.calls[-1]
    assert name == "encode" and call["texts"] == [QUERY, *DOCS]


@pytest.mark.parametrize(
    ("mode", "score_key", "weights"),
    [
        ("dense", "dense", [0.4, 0.2, 0.4]),
        ("sparse", "sparse", [0.4, 0.2, 0.4]),
        ("colbert", "colbert", [0.4, 0.2, 0.4]),
        ("sparse+dense", "sparse+dense", [1.0, 0.3, 0.0]),
        ("dense+sparse+colbert", "colbert+sparse+dense", [0.1, 0.7, 0.2]),
    ],
)
def test_modes_and_weights_equal_score(
    app_client: TestClient, mode: str, score_key: str, weights: list[float]
) -> None:
    r = app_client.post(
        "/v1/rerank",
        json={"query": QUERY, "documents": DOCS, "mode": mode, "weights": weights},
        headers=AUTH,
    )
    assert r.status_code == 200, r.text
    got = {item["index"]: item["relevance_score"] for item in r.json()["results"]}
    expected = reference(app_client, QUERY, DOCS, score_key, weights=weights)
    assert [got[i] for i in range(len(DOCS))] == pytest.approx(expected, abs=1e-6)


def test_document_objects_and_max_tokens_per_doc(app_client: TestClient, fake: FakeEngine) -> None:
    docs = [{"text": d, "title": "ignored"} for d in DOCS]
    r = app_client.post(
        "/v1/rerank",
        json={"query": QUERY, "documents": docs, "max_tokens_per_doc": 4, "top_n": 1},
        headers=AUTH,
    )
    assert r.status_code == 200, r.text
    assert fake.calls[-1][1]["max_length"] == 4 and len(r.json()["results"]) == 1


def test_dense_only_model_ranks_by_dense(app_client: TestClient) -> None:
    r = app_client.post(
        "/v1/rerank", json={"model": "minilm", "query": QUERY, "documents": DOCS}, headers=AUTH
    )
    assert r.status_code == 200, r.text
    got = {item["index"]: item["relevance_score"] for item in r.json()["results"]}
    expected = reference(app_client, QUERY, DOCS, "dense", model="minilm")
    assert [got[i] for i in range(len(DOCS))] == pytest.approx(expected, abs=1e-6)
    bad = app_client.post(
        "/v1/rerank",
        json={"model": "minilm", "query": QUERY, "documents": DOCS, "mode": "sparse"},
        headers=AUTH,
    )
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "unsupported_output"


@pytest.mark.parametrize(
    ("body", "code", "param"),
    [
        ({"query": QUERY, "documents": []}, "empty_input", "documents"),
        ({"query": QUERY, "documents": ["a", ""]}, "empty_input", "documents"),
        ({"query": "", "documents": ["a"]}, "empty_input", "query"),
        ({"query": QUERY, "documents": ["a"] * 9}, "too_many_inputs", "documents"),
        ({"query": QUERY, "documents": ["a"], "mode": "lexical"}, "invalid_input", "mode"),
        ({"query": QUERY, "documents": ["a"], "weights": [1, 1]}, "invalid_input", "weights"),
        (
            {"query": QUERY, "documents": ["a"], "weights": [1e301, 0, 1]},
            "invalid_request",
            "weights",
        ),
        ({"query": QUERY, "documents": [1]}, "invalid_request", "documents"),
        ({"query": QUERY, "documents": ["a"], "model": "nope"}, "model_not_found", "model"),
        (
            {"query": QUERY, "documents": ["a " * 80], "truncate": False},
            "context_length_exceeded",
            "input",
        ),
    ],
)
def test_errors_in_the_openai_envelope(
    app_client: TestClient, body: dict[str, Any], code: str, param: str
) -> None:
    r = app_client.post("/v1/rerank", json=body, headers=AUTH)
    assert 400 <= r.status_code < 500, r.text
    error = r.json()["error"]
    assert (error["code"], error["param"]) == (code, param), error


def test_auth_and_token_cap() -> None:
    client = TestClient(make_app(bge_m3_like(), api_key=KEY, max_tokens_per_request=10))
    assert client.post("/v1/rerank", json={"query": "q", "documents": ["a"]}).status_code == 401
    assert client.post("/rerank", json={"query": "q", "texts": ["a"]}).status_code == 401
    r = client.post(
        "/v1/rerank", json={"query": "a b c", "documents": ["d e f", "g h i"]}, headers=AUTH
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "max_tokens_per_request"
    assert r.json()["error"]["param"] == "documents"


# ---- text-embeddings-inference's shape -----------------------------------------------------------


def test_tei_rerank(app_client: TestClient) -> None:
    r = app_client.post(
        "/rerank",
        json={"query": QUERY, "texts": DOCS, "return_text": True, "raw_scores": True},
        headers=AUTH,
    )
    assert r.status_code == 200, r.text
    ranks = r.json()
    expected = reference(app_client, QUERY, DOCS, "colbert+sparse+dense")
    assert [rank["index"] for rank in ranks] == best_first(expected)
    for rank in ranks:
        assert set(rank) == {"index", "score", "text"} and rank["text"] == DOCS[rank["index"]]
        assert rank["score"] == pytest.approx(expected[rank["index"]], abs=1e-6)
    plain = app_client.post("/rerank", json={"query": QUERY, "texts": DOCS}, headers=AUTH).json()
    assert all(set(rank) == {"index", "score"} for rank in plain)
    bad = app_client.post("/rerank", json={"query": QUERY, "texts": []}, headers=AUTH)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "texts"


def test_rerank_routes_are_compute_routes(fake: FakeEngine) -> None:
    from handler.api import rerank
    from handler.api.routing import compute_paths

    assert {"/v1/rerank", "/v2/rerank", "/rerank"} <= compute_paths(rerank.router.routes, "")


# ---- the real engine, behind the micro-batcher ---------------------------------------------------


@pytest.mark.slow
def test_real_engine_rerank_equals_score(tiny_fp32: Any) -> None:
    from fakes import settings

    from handler.app import create_app
    from handler.engine import EngineConfig, load_registry
    from handler.engine.microbatch import micro_batched

    models = micro_batched(load_registry([tiny_fp32], EngineConfig()))
    client = TestClient(create_app(settings(api_key=KEY), models))
    query, docs = "What is BGE M3?", ["BGE M3 is an embedding model", "如何使用torchserve部署模型"]
    r = client.post("/rerank", json={"query": query, "texts": docs}, headers=AUTH)
    assert r.status_code == 200, r.text
    got = {rank["index"]: rank["score"] for rank in r.json()}
    expected = reference(client, query, docs, "colbert+sparse+dense")
    assert [got[0], got[1]] == pytest.approx(expected, abs=1e-6)
