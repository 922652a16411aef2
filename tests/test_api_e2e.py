"""End to end with the real ONNX engine: artifacts built by `python -m model_build` (conftest's
`tiny_fp32`, a BGE-M3-layout model, and `minilm_fp32`, real all-MiniLM-L6-v2 weights, dense only)
loaded through `load_registry`, served by the app in every dialect, through the official openai
client on uvicorn, and through the Lambda entry point."""

from __future__ import annotations

import base64
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
from fakes import LiveServer, settings
from fastapi.testclient import TestClient

from handler.app import create_app
from handler.engine import EngineConfig, ModelRegistry, load_registry

pytestmark = pytest.mark.slow

V2 = "/api/data/embedding/version/2"
TEXTS = ["What is BGE M3?", "BGE M3 is an embedding model", "如何使用torchserve部署模型"]


@pytest.fixture(scope="module")
def models(tiny_fp32: Path, minilm_fp32: Path) -> ModelRegistry:
    return load_registry([tiny_fp32, minilm_fp32], EngineConfig())


@pytest.fixture(scope="module")
def client(models: ModelRegistry) -> TestClient:
    return TestClient(create_app(settings(), models))


def bge(models: ModelRegistry) -> Any:
    engine = models.default
    assert engine.info.capabilities.sparse and engine.info.capabilities.colbert
    return engine


def minilm(models: ModelRegistry) -> Any:
    (engine,) = [e for e in models if e is not models.default]
    assert not engine.info.capabilities.sparse
    return engine


# ---- OpenAI dialect ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def live(models: ModelRegistry) -> Iterator[LiveServer]:
    with LiveServer(create_app(settings(api_key="e2e-key"), models)) as server:
        yield server


@pytest.mark.parametrize("encoding_format", [None, "float"])
def test_openai_client_on_the_real_engine(
    live: LiveServer, models: ModelRegistry, encoding_format: str | None
) -> None:
    engine = bge(models)
    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="e2e-key", max_retries=0)
    kwargs = {} if encoding_format is None else {"encoding_format": encoding_format}
    response = client.embeddings.create(model=engine.info.id, input=TEXTS, **kwargs)  # type: ignore[arg-type]
    expected = engine.encode(TEXTS)
    got = np.array([item.embedding for item in response.data], dtype=np.float32)
    np.testing.assert_allclose(got, expected.dense, rtol=0, atol=1e-6)
    assert response.usage.prompt_tokens == expected.total_tokens
    single = client.embeddings.create(model=engine.info.id, input=TEXTS[0], dimensions=16)
    vector = np.asarray(single.data[0].embedding, dtype=np.float32)
    assert vector.shape == (16,) and abs(float(np.linalg.norm(vector)) - 1) < 1e-5


def test_openai_sparse_extension_and_minilm(client: TestClient, models: ModelRegistry) -> None:
    engine = bge(models)
    r = client.post(
        "/v1/embeddings",
        json={"model": engine.info.id, "input": TEXTS[:1], "return_sparse": True},
    )
    assert r.status_code == 200, r.text
    expected = engine.token_strings(engine.encode(TEXTS[:1], sparse=True).sparse[0])
    assert r.json()["data"][0]["sparse"] == pytest.approx(expected)

    small = minilm(models)
    r = client.post(
        "/v1/embeddings",
        json={"model": small.info.id, "input": TEXTS, "encoding_format": "base64"},
    )
    assert r.status_code == 200, r.text
    vectors = np.stack(
        [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in r.json()["data"]]
    )
    np.testing.assert_allclose(vectors, small.encode(TEXTS).dense, rtol=0, atol=1e-6)
    # GIVEN the dense-only model WHEN sparse is asked THEN a clear 400, not a crash
    r = client.post(
        "/v1/embeddings", json={"model": small.info.id, "input": "x", "return_sparse": True}
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "unsupported_output"
    assert "sparse" in r.json()["error"]["message"]


# ---- v2 dialect ----------------------------------------------------------------------------------


def test_v2_on_the_real_engine(client: TestClient, models: ModelRegistry) -> None:
    engine = bge(models)
    body = {
        "model": {"model_name": engine.info.id, "params": {"return_token_usage": True}},
        "data": [{"data_type": "text", "text": t} for t in TEXTS],
    }
    r = client.post(V2, json=body)
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    expected = engine.encode(TEXTS, sparse=True)
    np.testing.assert_allclose(
        np.array(data["sentence_dense_embedding"], dtype=np.float32),
        expected.dense,
        rtol=0,
        atol=1e-6,
    )
    for got, weights in zip(data["sentence_sparse_embedding"], expected.sparse, strict=True):
        assert got == pytest.approx(engine.token_strings(weights))
        assert all(isinstance(k, str) for k in got)
    assert data["token_usage"]["total_tokens"] == expected.total_tokens


def test_v2_dense_only_model_asked_for_sparse(client: TestClient, models: ModelRegistry) -> None:
    name = minilm(models).info.id
    body: dict[str, Any] = {
        "model": {"model_name": name},
        "data": [{"data_type": "text", "text": "hello"}],
    }
    r = client.post(V2, json=body)
    assert r.status_code == 200 and set(r.json()["data"]) == {"sentence_dense_embedding"}
    body["model"]["params"] = {"return_sparse": True}
    r = client.post(V2, json=body)
    assert r.status_code == 400 and r.json()["code"] == 1000003
    assert "sparse" in r.json()["message"]


# ---- native dialect ------------------------------------------------------------------------------


def test_native_embeddings_and_score(client: TestClient, models: ModelRegistry) -> None:
    engine = bge(models)
    r = client.post(
        "/embeddings",
        json={"input": TEXTS, "input_type": {"colbert": True}, "sparse_format": "indices_values"},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    expected = engine.encode(TEXTS, sparse=True, colbert=True)
    np.testing.assert_allclose(
        np.array(body["dense_vecs"], dtype=np.float32), expected.dense, rtol=0, atol=1e-6
    )
    for got, want in zip(body["colbert_vecs"], expected.colbert, strict=True):
        np.testing.assert_allclose(np.array(got, dtype=np.float32), want, rtol=0, atol=1e-6)
    for got, weights in zip(body["sparse_vecs"], expected.sparse, strict=True):
        assert got["indices"] == sorted(weights)

    r = client.post("/score", json={"sentences_1": TEXTS[:2], "sentences_2": TEXTS[1:]})
    assert r.status_code == 200, r.text
    scores = engine.score(TEXTS[:2], TEXTS[1:])
    assert r.json()["dense"] == pytest.approx(scores.dense, abs=1e-6)
    assert r.json()["colbert+sparse+dense"] == pytest.approx(scores.colbert_sparse_dense, abs=1e-5)

    card = client.get(f"/models/{engine.info.id}").json()
    assert card["capabilities"] == {"dense": True, "sparse": True, "colbert": True}
    assert card["embedding_dims"] == engine.info.dims


def test_native_dense_only_model(client: TestClient, models: ModelRegistry) -> None:
    name = minilm(models).info.id
    r = client.post("/embeddings", json={"input": "hello", "model": name})
    assert r.status_code == 200 and "sparse_vecs" not in r.json()
    r = client.post(
        "/embeddings", json={"input": "hello", "model": name, "input_type": {"sparse": True}}
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_output"
    r = client.post("/score", json={"sentences_1": "a", "sentences_2": "b", "model": name})
    assert r.status_code == 200 and set(r.json()) == {"model", "dense", "usage"}
    health = client.get("/health").json()
    assert health["status"] == "healthy"
    assert [m["id"] for m in health["models"]] == [e.info.id for e in models]


def test_each_request_is_tokenized_once(
    client: TestClient, models: ModelRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN the real tokenizer, counted WHEN a request runs, or is refused by the token cap,
    # THEN its texts went through the tokenizer once: the cap counts the engine's own tokens.
    engine = bge(models)
    backend = engine.tokenizer.backend
    calls: list[int] = []
    encode_batch = backend.encode_batch

    def counted(texts: list[str]) -> list[list[int]]:
        calls.append(len(texts))
        return encode_batch(texts)

    monkeypatch.setattr(backend, "encode_batch", counted)
    r = client.post("/v1/embeddings", json={"model": engine.info.id, "input": TEXTS})
    assert r.status_code == 200, r.text
    assert calls == [len(TEXTS)]
    total = r.json()["usage"]["total_tokens"]
    capped = TestClient(create_app(settings(max_tokens_per_request=total - 1), models))
    r = capped.post("/v1/embeddings", json={"model": engine.info.id, "input": TEXTS})
    assert r.status_code == 400 and r.json()["error"]["code"] == "max_tokens_per_request"
    assert str(total) in r.json()["error"]["message"]
    assert calls == [len(TEXTS), len(TEXTS)]


# ---- the Lambda entry point with the real engine -------------------------------------------------


def test_lambda_entry_point_with_the_real_model(
    monkeypatch: pytest.MonkeyPatch, tiny_fp32: Path
) -> None:
    monkeypatch.setenv("MODEL_PATH", str(tiny_fp32))
    monkeypatch.delenv("API_KEY", raising=False)
    for name in ("handler.lambda_function", "handler.main"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    import handler.lambda_function as entry

    event = json.loads(
        (
            Path(__file__).parent / "data" / "lambda_events" / "function_url_get_powertools.json"
        ).read_text(encoding="utf-8-sig")
    )
    event["requestContext"]["http"]["method"] = "POST"
    event["requestContext"]["http"]["path"] = event["rawPath"] = "/v1/embeddings"
    event["body"] = json.dumps({"model": "bge-m3", "input": TEXTS})

    class Context:
        aws_request_id = "e2e-lambda"

    result = entry.handler(event, Context())
    assert result["statusCode"] == 200, result["body"]
    data = json.loads(result["body"])["data"]
    assert len(data) == 3 and result["headers"]["x-request-id"] == "e2e-lambda"
