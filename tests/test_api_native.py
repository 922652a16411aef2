"""Native BGE-M3 dialect and the public routes on the fake engines: /embeddings,
/score, /models, /models/{id}, /health, /."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from fakes import FakeEngine, bge_m3_like, dense_only, make_app, settings
from fastapi.testclient import TestClient

from handler.app import create_app


def client(*engines: FakeEngine, **overrides: Any) -> TestClient:
    return TestClient(make_app(*engines, **overrides))


def assert_native_error(response: Any, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    if code is not None:
        assert body["error"]["code"] == code, body
    return dict(body["error"])


# ---- /embeddings ---------------------------------------------------------------------------------


def test_embeddings_default_dense_and_sparse() -> None:
    fake = bge_m3_like()
    r = client(fake).post("/embeddings", json={"input": ["Hello world", "文本 1"]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"model", "dense_vecs", "sparse_vecs", "usage"}
    np.testing.assert_array_equal(
        np.array(body["dense_vecs"][1], dtype=np.float32), fake.expected_dense("文本 1")
    )
    assert set(body["sparse_vecs"][0]) == {"Hello", "world"}
    assert body["usage"] == {"prompt_tokens": 8, "total_tokens": 8}


def test_embeddings_single_string_with_colbert() -> None:
    fake = bge_m3_like()
    r = client(fake).post(
        "/embeddings",
        json={"input": "a b c", "input_type": {"dense": False, "sparse": False, "colbert": True}},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"model", "colbert_vecs", "usage"}
    colbert = np.array(body["colbert_vecs"][0], dtype=np.float32)
    assert colbert.shape == (4, fake.dims)  # <s> a b c </s>: every token after <s>
    np.testing.assert_array_equal(colbert, fake.colbert_of(fake.tokenize("a b c")))


def test_sparse_formats() -> None:
    fake = bge_m3_like()
    weights = fake.sparse_of(fake.tokenize("z y x"))
    app = client(fake)
    by_id = app.post("/embeddings", json={"input": "z y x", "sparse_format": "id"}).json()
    assert by_id["sparse_vecs"][0] == pytest.approx({str(k): v for k, v in weights.items()})
    iv = app.post("/embeddings", json={"input": "z y x", "sparse_format": "indices_values"}).json()
    assert iv["sparse_vecs"][0]["indices"] == sorted(weights)
    assert iv["sparse_vecs"][0]["values"] == pytest.approx([weights[i] for i in sorted(weights)])
    bad = app.post("/embeddings", json={"input": "z", "sparse_format": "csr"})
    assert_native_error(bad, 400)


def test_max_length_and_batch_size() -> None:
    fake = bge_m3_like(max_length=64)
    app = client(fake)
    r = app.post("/embeddings", json={"input": "a b c d e f", "max_length": 4, "batch_size": 2})
    assert r.status_code == 200 and r.json()["usage"]["total_tokens"] == 4
    assert fake.calls[-1][1]["max_length"] == 4
    # More than the model allows is capped at the model's limit, as FlagEmbedding does.
    r = app.post("/embeddings", json={"input": "a", "max_length": 8192})
    assert r.status_code == 200 and fake.calls[-1][1]["max_length"] == 64
    r = app.post("/embeddings", json={"input": "a b c d e f", "max_length": 4, "truncate": False})
    assert_native_error(r, 400, "context_length_exceeded")


def test_dense_only_model_defaults_and_errors() -> None:
    app = client(dense_only())
    r = app.post("/embeddings", json={"input": "a"})
    assert r.status_code == 200 and set(r.json()) == {"model", "dense_vecs", "usage"}
    for asked in ({"sparse": True}, {"colbert": True}):
        error = assert_native_error(
            app.post("/embeddings", json={"input": "a", "input_type": asked}),
            400,
            "unsupported_output",
        )
        assert next(iter(asked)) in error["message"]


def test_nothing_asked_is_400() -> None:
    r = client().post(
        "/embeddings",
        json={"input": "a", "input_type": {"dense": False, "sparse": False, "colbert": False}},
    )
    assert_native_error(r, 400)


@pytest.mark.parametrize(
    ("payload", "code"),
    [({"input": ""}, "empty_input"), ({"input": ["a", ""]}, "empty_input"), ({}, None)],
)
def test_embeddings_bad_input(payload: dict[str, Any], code: str | None) -> None:
    assert_native_error(client().post("/embeddings", json=payload), 400, code)


def test_embeddings_input_limit_is_configurable() -> None:
    r = client(max_inputs_native=2).post("/embeddings", json={"input": ["a", "b", "c"]})
    assert_native_error(r, 400, "too_many_inputs")


def test_embeddings_unknown_model_is_404() -> None:
    r = client().post("/embeddings", json={"input": "a", "model": "nope"})
    assert_native_error(r, 404, "model_not_found")


# ---- /score --------------------------------------------------------------------------------------


def test_score_keys_and_values() -> None:
    fake = bge_m3_like()
    payload = {
        "sentences_1": ["What is BGE M3?", "x y"],
        "sentences_2": ["BGE M3 is an embedding model", "y z"],
        "weights": [0.4, 0.2, 0.4],
    }
    r = client(fake).post("/score", json=payload)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {
        "model",
        "dense",
        "sparse",
        "colbert",
        "sparse+dense",
        "colbert+sparse+dense",
        "usage",
    }
    expected = fake.score(payload["sentences_1"], payload["sentences_2"], weights=[0.4, 0.2, 0.4])
    assert body["dense"] == pytest.approx(expected.dense)
    assert body["sparse"] == pytest.approx(expected.sparse)
    assert body["colbert"] == pytest.approx(expected.colbert)
    assert body["sparse+dense"] == pytest.approx(expected.sparse_dense)
    assert body["colbert+sparse+dense"] == pytest.approx(expected.colbert_sparse_dense)


def test_score_dense_only_model_answers_dense_only() -> None:
    r = client(dense_only()).post("/score", json={"sentences_1": "a", "sentences_2": "a"})
    assert r.status_code == 200, r.text
    assert set(r.json()) == {"model", "dense", "usage"}
    assert r.json()["dense"] == pytest.approx([1.0])


@pytest.mark.parametrize(
    "payload",
    [
        {"sentences_1": ["a", "b"], "sentences_2": ["a"]},
        {"sentences_1": ["a"], "sentences_2": ["a"], "weights": [1, 1]},
        {"sentences_1": ["a"], "sentences_2": ["a"], "weights": [-1, 1, 1]},
        {"sentences_1": [""], "sentences_2": ["a"]},
        {"sentences_1": ["a"]},
    ],
)
def test_score_bad_requests(payload: dict[str, Any]) -> None:
    assert_native_error(client().post("/score", json=payload), 400)


# ---- /models -------------------------------------------------------------------------------------


def test_models_and_model_card() -> None:
    app = client(bge_m3_like(), dense_only())
    listing = app.get("/models").json()
    assert [m["id"] for m in listing["data"]] == ["bge-m3", "all-MiniLM-L6-v2"]
    card = app.get("/models/bge-m3").json()
    assert card["embedding_dims"] == 32 and card["max_length"] == 64
    assert card["capabilities"] == {"dense": True, "sparse": True, "colbert": True}
    assert card["object"] == "model"
    minilm = app.get("/models/sentence-transformers/all-MiniLM-L6-v2").json()
    assert minilm["capabilities"] == {"dense": True, "sparse": False, "colbert": False}
    assert_native_error(app.get("/models/gpt-4"), 404, "model_not_found")


# ---- /health and / -------------------------------------------------------------------------------


def test_health_is_public_and_lists_models() -> None:
    fake = bge_m3_like()
    r = client(fake, api_key="k").get("/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "healthy" and body["model_loaded"] is True
    assert body["device"] == "cpu"
    assert body["models"][0]["id"] == "bge-m3"
    assert body["models"][0]["sha256"] == fake.info.fingerprint


def test_load_failure_health_503_and_other_routes_503_in_their_envelope() -> None:
    app = TestClient(create_app(settings(), None, load_error="ModelLoadError: model.onnx missing"))
    r = app.get("/health")
    assert r.status_code == 503
    assert r.json()["status"] == "unhealthy" and r.json()["model_loaded"] is False
    assert "model.onnx missing" in r.json()["error"]
    r = app.post("/v1/embeddings", json={"input": "a", "model": "bge-m3"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_loaded"
    assert "model.onnx missing" in r.json()["error"]["message"]
    r = app.post(
        "/api/data/embedding/version/2",
        json={"model": {"model_name": "bge-m3"}, "data": [{"data_type": "text", "text": "a"}]},
    )
    assert r.status_code == 503 and r.json()["code"] == 1000028
    assert_native_error(app.post("/embeddings", json={"input": "a"}), 503, "model_not_loaded")
    assert_native_error(app.get("/models"), 503)
    assert app.get("/").status_code == 200


def test_root_describes_the_service() -> None:
    body = client().get("/").json()
    assert body["service"] == "bge-m3-serverless"
    assert body["models"] == ["bge-m3"]
    assert "POST /v1/embeddings" in body["routes"]["openai"]


def test_unknown_url_is_native_404() -> None:
    assert_native_error(client().get("/nope"), 404, "unknown_url")


def test_root_describes_the_models_really_served() -> None:
    body = client(dense_only()).get("/").json()
    assert body["models"] == ["all-MiniLM-L6-v2"]
    assert body["outputs"] == {"all-MiniLM-L6-v2": ["dense"]}
    assert "all-MiniLM-L6-v2 (dense)" in body["description"]
    assert "sparse" not in body["description"] and "ColBERT" not in body["description"]
    full = client().get("/").json()
    assert "bge-m3 (dense, sparse, ColBERT)" in full["description"]
    down = TestClient(create_app(settings(), None, load_error="model.onnx missing")).get("/")
    assert "no model loaded: model.onnx missing" in down.json()["description"]


@pytest.mark.parametrize("path", ["/health", "/"])
def test_head_answers_like_get_without_a_body(path: str) -> None:
    # Uptime checkers send HEAD.
    app = client(api_key="k")
    get, head = app.get(path), app.head(path)
    assert head.status_code == get.status_code == 200
    assert head.content == b"" and head.headers["content-type"] == "application/json"


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("DELETE", "/health", "GET, HEAD"),
        ("POST", "/", "GET, HEAD"),
        ("GET", "/score", "POST"),
        ("PUT", "/models/bge-m3", "GET"),
        ("DELETE", "/api/data/embedding/version/2", "GET, POST"),
        ("GET", "/v1/embeddings", "POST"),
    ],
)
def test_405_says_which_methods_are_allowed(method: str, path: str, allow: str) -> None:
    r = client(route_prefix="/embed").request(method, "/embed" + path)
    assert r.status_code == 405 and r.headers["allow"] == allow
    assert allow in r.text


def test_score_without_sentences_2_says_it_is_required() -> None:
    error = assert_native_error(client().post("/score", json={"sentences_1": ["a"]}), 400)
    assert error["param"] == "sentences_2"
    assert error["message"] == "'sentences_2' is required."


def test_docs_load_everything_from_the_app_itself() -> None:
    # GIVEN no internet WHEN /docs opens THEN every script and style it loads is served here
    import re

    app = client(route_prefix="/embed")
    page = app.get("/embed/docs")
    assert page.status_code == 200
    assets = re.findall(r"""(?:src|href)=["']([^"']+)["']""", page.text)
    assert assets and not [a for a in assets if "//" in a], assets
    for asset in assets:
        r = app.get(asset)
        assert r.status_code == 200 and len(r.content) > 1000, asset
    assert app.get("/embed/openapi.json").json()["paths"]


@pytest.mark.parametrize(
    "weights",
    [[1e308, 1e308, 1.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0], [-1.0, 1.0, 1.0]],
    ids=["overflowing", "no-dense-or-sparse", "all-zero", "negative"],
)
def test_score_refuses_weights_whose_means_are_undefined(weights: list[float]) -> None:
    """Weights that would make a hybrid score NaN (inf / inf, or 0 / 0) are a 400, never a null
    score or a 500."""
    client = TestClient(make_app(bge_m3_like()))
    response = client.post(
        "/score", json={"sentences_1": ["a b"], "sentences_2": ["c d"], "weights": weights}
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "weights"
