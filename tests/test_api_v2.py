"""v2 dialect (Volcengine embedding v2) on the fake engines: request and response shape,
defaults, and every error as {"code", "message", "request_id"} with Volcengine's codes."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from fakes import FakeEngine, bge_m3_like, dense_only, make_app
from fastapi.testclient import TestClient

PATH = "/api/data/embedding/version/2"


def client(*engines: FakeEngine, **settings: Any) -> TestClient:
    return TestClient(make_app(*engines, **settings))


def request(texts: list[str], model: str = "bge-m3", **params: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": {"model_name": model},
        "data": [{"data_type": "text", "text": t} for t in texts],
    }
    if params:
        body["model"]["params"] = params
    return body


def assert_v2_error(response: Any, status: int, code: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"code", "message", "request_id"}, body
    assert body["code"] == code
    assert body["request_id"] == response.headers["x-request-id"]
    return dict(body)


def test_defaults_dense_and_token_keyed_sparse() -> None:
    fake = bge_m3_like()
    texts = ["如何 使用 torchserve 部署 模型", "怎么 使用 训练"]
    r = client(fake).post(PATH, json=request(texts))
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"code", "message", "request_id", "data"}
    assert body["code"] == 0 and body["message"] == "success"
    assert set(body["data"]) == {"sentence_dense_embedding", "sentence_sparse_embedding"}
    dense = np.array(body["data"]["sentence_dense_embedding"], dtype=np.float32)
    assert dense.shape == (2, fake.dims)
    np.testing.assert_array_equal(dense[0], fake.expected_dense(texts[0]))
    sparse = body["data"]["sentence_sparse_embedding"]
    assert set(sparse[0]) == {"如何", "使用", "torchserve", "部署", "模型"}
    assert set(sparse[1]) == {"怎么", "使用", "训练"}


def test_request_id_is_unique_and_sent_as_header() -> None:
    app = client()
    ids = set()
    for _ in range(3):
        r = app.post(PATH, json=request(["x"]))
        assert r.json()["request_id"] == r.headers["x-request-id"]
        ids.add(r.json()["request_id"])
    assert len(ids) == 3


def test_token_usage_when_asked() -> None:
    r = client().post(PATH, json=request(["a b", "c"], return_token_usage=True))
    assert r.json()["data"]["token_usage"] == {
        "prompt_tokens": 7,
        "completion_tokens": 0,
        "total_tokens": 7,
    }


def test_sparse_only() -> None:
    r = client().post(PATH, json=request(["a b"], return_dense=False, return_sparse=True))
    assert r.status_code == 200
    assert set(r.json()["data"]) == {"sentence_sparse_embedding"}


def test_dense_only_model_defaults_to_dense_and_refuses_sparse() -> None:
    app = client(dense_only())
    r = app.post(PATH, json=request(["a"], model="all-MiniLM-L6-v2"))
    assert r.status_code == 200, r.text
    assert set(r.json()["data"]) == {"sentence_dense_embedding"}
    r = app.post(PATH, json=request(["a"], model="all-MiniLM-L6-v2", return_sparse=True))
    body = assert_v2_error(r, 400, 1000003)
    assert body["message"].startswith("invalid request: ") and "sparse" in body["message"]


@pytest.mark.parametrize("data_type", ["image", "text-image"])
def test_images_are_not_supported(data_type: str) -> None:
    body = request(["a"])
    body["data"].append({"data_type": data_type, "image": "aGVsbG8=", "text": "t"})
    r = client().post(PATH, json=body)
    error = assert_v2_error(r, 400, 1000003)
    assert "images are not supported" in error["message"]
    assert "data[1]" in error["message"]


def test_unknown_data_type_and_missing_text() -> None:
    app = client()
    r = app.post(PATH, json={"model": {"model_name": "bge-m3"}, "data": [{"data_type": "audio"}]})
    assert_v2_error(r, 400, 1000003)
    r = app.post(PATH, json={"model": {"model_name": "bge-m3"}, "data": [{"data_type": "text"}]})
    assert "data[0].text" in assert_v2_error(r, 400, 1000003)["message"]


def test_at_most_100_items_by_default() -> None:
    app = client()
    assert app.post(PATH, json=request(["a"] * 100)).status_code == 200
    error = assert_v2_error(app.post(PATH, json=request(["a"] * 101)), 400, 1000003)
    assert "100" in error["message"]


def test_empty_data_and_empty_text_are_400() -> None:
    app = client()
    assert_v2_error(app.post(PATH, json=request([])), 400, 1000003)
    error = assert_v2_error(app.post(PATH, json=request(["a", ""])), 400, 1000003)
    assert "data[1].text" in error["message"]


def test_unknown_model_is_1000025_404() -> None:
    r = client().post(PATH, json=request(["a"], model="bge-large-zh"))
    error = assert_v2_error(r, 404, 1000025)
    assert "bge-large-zh" in error["message"]
    assert error["message"].startswith("failed to calcTextEmbedding")


def test_any_model_name_when_allowed() -> None:
    r = client(allow_any_model=True).post(PATH, json=request(["a"], model="whatever"))
    assert r.status_code == 200 and r.json()["code"] == 0


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b'{"data": [{"data_type": "text", "text": "a"}]}',
        b'{"model": {"params": {}}, "data": []}',
        b'{"model": {"model_name": "bge-m3"}, "data": "a"}',
        b'{"model": {"model_name": "bge-m3", "params": {"return_dense": "maybe"}}, "data": []}',
    ],
)
def test_invalid_requests_are_1000003(content: bytes) -> None:
    r = client().post(PATH, content=content, headers={"content-type": "application/json"})
    assert_v2_error(r, 400, 1000003)


def test_too_long_with_truncate_false_is_400() -> None:
    app = client(bge_m3_like(max_length=4))
    assert app.post(PATH, json=request(["a b c d e"])).status_code == 200
    r = app.post(PATH, json=request(["a b c d e"], truncate=False))
    assert_v2_error(r, 400, 1000003)


def test_get_is_accepted_as_volcengine_documents() -> None:
    r = client().request("GET", PATH, json=request(["a"]))
    assert r.status_code == 200 and r.json()["code"] == 0


def test_unauthorized_is_1000001() -> None:
    app = client(api_key="secret")
    error = assert_v2_error(app.post(PATH, json=request(["a"])), 401, 1000001)
    assert error["message"].startswith("unauthorized")
    r = app.post(PATH, json=request(["a"]), headers={"Authorization": "Bearer secret"})
    assert r.status_code == 200


@pytest.mark.parametrize(
    ("engine", "params"),
    [
        (dense_only(), {"return_dense": False}),
        (bge_m3_like(), {"return_dense": False, "return_sparse": False}),
    ],
)
def test_nothing_asked_names_the_v2_switches(engine: FakeEngine, params: dict[str, Any]) -> None:
    r = client(engine).post(PATH, json=request(["a"], model=engine.model_id, **params))
    message = assert_v2_error(r, 400, 1000003)["message"]
    assert "return_dense" in message and "return_sparse" in message
    assert "colbert" not in message.lower()
