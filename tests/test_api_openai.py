"""OpenAI dialect on the fake engines: POST /v1/embeddings, GET /v1/models, and every error case in
OpenAI's envelope ({"error": {"message", "type", "param", "code"}}, never FastAPI's "detail")."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import pytest
from fakes import FakeEngine, bge_m3_like, dense_only, make_app
from fastapi.testclient import TestClient

from handler.engine.heads import truncate_dims


def client(*engines: FakeEngine, **settings: Any) -> TestClient:
    return TestClient(make_app(*engines, **settings))


def assert_openai_error(response: Any, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    if code is not None:
        assert error["code"] == code, error
    return dict(error)


def test_single_string_float_is_exactly_openai_shape() -> None:
    fake = bge_m3_like()
    r = client(fake).post(
        "/v1/embeddings", json={"model": "bge-m3", "input": "hello world", "user": "u-1"}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"object", "data", "model", "usage"}
    assert body["object"] == "list" and body["model"] == "bge-m3"
    (item,) = body["data"]
    assert set(item) == {"object", "index", "embedding"}
    assert item["object"] == "embedding" and item["index"] == 0
    got = np.array(item["embedding"], dtype=np.float32)
    np.testing.assert_array_equal(got, fake.expected_dense("hello world"))
    # <s> hello world </s>: usage counts real tokens, specials included
    assert body["usage"] == {"prompt_tokens": 4, "total_tokens": 4}


def test_batch_keeps_order_and_counts_tokens() -> None:
    fake = bge_m3_like()
    texts = ["one", "two words", "three words here"]
    r = client(fake).post("/v1/embeddings", json={"model": "bge-m3", "input": texts})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert [d["index"] for d in data] == [0, 1, 2]
    for text, item in zip(texts, data, strict=True):
        np.testing.assert_array_equal(
            np.array(item["embedding"], dtype=np.float32), fake.expected_dense(text)
        )
    assert r.json()["usage"]["prompt_tokens"] == 3 + 4 + 5


def test_base64_is_little_endian_float32() -> None:
    fake = bge_m3_like()
    r = client(fake).post(
        "/v1/embeddings",
        json={"model": "bge-m3", "input": ["a b", "c"], "encoding_format": "base64"},
    )
    assert r.status_code == 200, r.text
    for text, item in zip(["a b", "c"], r.json()["data"], strict=True):
        assert isinstance(item["embedding"], str)
        vector = np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4")
        np.testing.assert_array_equal(vector, fake.expected_dense(text))


def test_dimensions_truncates_then_renormalises() -> None:
    fake = bge_m3_like()
    r = client(fake).post(
        "/v1/embeddings", json={"model": "bge-m3", "input": "x y", "dimensions": 8}
    )
    assert r.status_code == 200, r.text
    vector = np.array(r.json()["data"][0]["embedding"], dtype=np.float32)
    assert vector.shape == (8,)
    assert abs(float(np.linalg.norm(vector)) - 1.0) < 1e-6
    np.testing.assert_array_equal(vector, truncate_dims(fake.expected_dense("x y")[None], 8)[0])


def test_dimensions_equal_to_model_dims_is_unchanged() -> None:
    fake = bge_m3_like()
    r = client(fake).post(
        "/v1/embeddings", json={"model": "bge-m3", "input": "x", "dimensions": fake.dims}
    )
    np.testing.assert_array_equal(
        np.array(r.json()["data"][0]["embedding"], dtype=np.float32), fake.expected_dense("x")
    )


@pytest.mark.parametrize("dimensions", [33, 4096])
def test_dimensions_above_model_dims_is_400(dimensions: int) -> None:
    r = client().post(
        "/v1/embeddings", json={"model": "bge-m3", "input": "x", "dimensions": dimensions}
    )
    error = assert_openai_error(r, 400, "invalid_dimensions")
    assert error["param"] == "dimensions" and "32" in error["message"]


def test_dimensions_zero_is_a_validation_error_in_openai_envelope() -> None:
    r = client().post("/v1/embeddings", json={"model": "bge-m3", "input": "x", "dimensions": 0})
    assert assert_openai_error(r, 400)["param"] == "dimensions"


def test_model_alias_answers_with_canonical_id() -> None:
    r = client().post("/v1/embeddings", json={"model": "BAAI/bge-m3", "input": "x"})
    assert r.status_code == 200 and r.json()["model"] == "bge-m3"


def test_model_omitted_uses_default() -> None:
    r = client(dense_only(), bge_m3_like()).post("/v1/embeddings", json={"input": "x"})
    assert r.status_code == 200 and r.json()["model"] == "all-MiniLM-L6-v2"


def test_unknown_model_is_404_model_not_found() -> None:
    r = client().post("/v1/embeddings", json={"model": "text-embedding-3-small", "input": "x"})
    error = assert_openai_error(r, 404, "model_not_found")
    assert error["param"] == "model" and "bge-m3" in error["message"]


def test_allow_any_model_serves_the_default() -> None:
    r = client(allow_any_model=True).post(
        "/v1/embeddings", json={"model": "any-value", "input": "x"}
    )
    assert r.status_code == 200 and r.json()["model"] == "bge-m3"


def test_two_models_are_routed_by_name() -> None:
    minilm = dense_only()
    r = client(bge_m3_like(), minilm).post("/v1/embeddings", json={"model": "minilm", "input": "x"})
    assert r.status_code == 200 and r.json()["model"] == "all-MiniLM-L6-v2"
    assert len(r.json()["data"][0]["embedding"]) == minilm.dims


def test_return_sparse_adds_token_keyed_weights() -> None:
    fake = bge_m3_like()
    r = client(fake).post(
        "/v1/embeddings", json={"model": "bge-m3", "input": "alpha beta", "return_sparse": True}
    )
    assert r.status_code == 200, r.text
    item = r.json()["data"][0]
    assert set(item) == {"object", "index", "embedding", "sparse"}
    ids = fake.tokenize("alpha beta")[1:-1]
    assert item["sparse"] == pytest.approx(
        {"alpha": fake.sparse_of(ids)[ids[0]], "beta": fake.sparse_of(ids)[ids[1]]}
    )


@pytest.mark.parametrize("fmt", ["id", "indices_values"])
def test_return_sparse_formats(fmt: str) -> None:
    fake = bge_m3_like()
    r = client(fake).post(
        "/v1/embeddings",
        json={"model": "bge-m3", "input": "b a", "return_sparse": True, "sparse_format": fmt},
    )
    sparse = r.json()["data"][0]["sparse"]
    weights = fake.sparse_of(fake.tokenize("b a"))
    if fmt == "id":
        assert sparse == pytest.approx({str(k): v for k, v in weights.items()})
    else:
        assert sparse["indices"] == sorted(weights)
        assert sparse["values"] == pytest.approx([weights[i] for i in sorted(weights)])


def test_sparse_from_dense_only_model_is_a_clear_400() -> None:
    r = client(dense_only()).post("/v1/embeddings", json={"input": "x", "return_sparse": True})
    error = assert_openai_error(r, 400, "unsupported_output")
    assert "sparse" in error["message"]


def test_token_ids_are_refused_by_default_naming_the_langchain_fix() -> None:
    for ids in ([1212, 318, 257], [[1212, 318], [257, 1332]]):
        r = client().post("/v1/embeddings", json={"model": "bge-m3", "input": ids})
        error = assert_openai_error(r, 400, "token_ids_not_accepted")
        assert "check_embedding_ctx_length=False" in error["message"]
        assert error["param"] == "input"


def test_token_ids_when_allowed_are_used_as_given() -> None:
    fake = bge_m3_like()
    app = client(fake, allow_token_ids=True)
    r = app.post("/v1/embeddings", json={"model": "bge-m3", "input": [0, 100, 200, 2]})
    assert r.status_code == 200, r.text
    np.testing.assert_array_equal(
        np.array(r.json()["data"][0]["embedding"], dtype=np.float32),
        fake.dense_of([0, 100, 200, 2]),
    )
    assert r.json()["usage"]["total_tokens"] == 4
    r = app.post("/v1/embeddings", json={"model": "bge-m3", "input": [[0, 5, 2], [0, 6, 7, 2]]})
    assert r.status_code == 200 and len(r.json()["data"]) == 2
    assert fake.calls[-1] == ("encode_ids", {"ids": [[0, 5, 2], [0, 6, 7, 2]], "truncate": True})


@pytest.mark.parametrize("ids", [[0, 250_002], [[0, 1], [-1]], [[]]])
def test_token_ids_out_of_range_or_empty_are_400(ids: Any) -> None:
    r = client(allow_token_ids=True).post("/v1/embeddings", json={"model": "bge-m3", "input": ids})
    assert_openai_error(r, 400)


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        ({"input": ""}, "empty"),
        ({"input": []}, "empty"),
        ({"input": ["a", ""]}, "input[1]"),
    ],
)
def test_empty_input_is_400(payload: dict[str, Any], fragment: str) -> None:
    r = client().post("/v1/embeddings", json={"model": "bge-m3", **payload})
    error = assert_openai_error(r, 400, "empty_input")
    assert fragment in error["message"] and error["param"] == "input"


def test_too_many_inputs_is_400() -> None:
    r = client(max_inputs_openai=3).post(
        "/v1/embeddings", json={"model": "bge-m3", "input": ["a", "b", "c", "d"]}
    )
    error = assert_openai_error(r, 400, "too_many_inputs")
    assert "3" in error["message"]


def test_default_input_limit_is_openais_2048() -> None:
    r = client().post("/v1/embeddings", json={"model": "bge-m3", "input": ["a"] * 2049})
    assert_openai_error(r, 400, "too_many_inputs")


def test_tokens_per_request_limit_counts_after_truncation() -> None:
    fake = bge_m3_like(max_length=8)
    words = " ".join(["w"] * 50)  # 52 tokens, cut to 8
    ok = client(fake, max_tokens_per_request=16).post(
        "/v1/embeddings", json={"model": "bge-m3", "input": [words, words]}
    )
    assert ok.status_code == 200 and ok.json()["usage"]["total_tokens"] == 16
    r = client(fake, max_tokens_per_request=16).post(
        "/v1/embeddings", json={"model": "bge-m3", "input": [words, words, "x"]}
    )
    error = assert_openai_error(r, 400, "max_tokens_per_request")
    assert "19" in error["message"] and "16" in error["message"]


def test_long_input_is_truncated_by_default_and_400_with_truncate_false() -> None:
    fake = bge_m3_like(max_length=8)
    long_text = " ".join(["w"] * 20)
    app = client(fake)
    r = app.post("/v1/embeddings", json={"model": "bge-m3", "input": long_text})
    assert r.status_code == 200 and r.json()["usage"]["total_tokens"] == 8
    r = app.post("/v1/embeddings", json={"model": "bge-m3", "input": long_text, "truncate": False})
    error = assert_openai_error(r, 400, "context_length_exceeded")
    assert "22" in error["message"] and "8" in error["message"]


def test_max_input_tokens_setting_caps_the_model_limit() -> None:
    fake = bge_m3_like(max_length=64)
    r = client(fake, max_input_tokens=5).post(
        "/v1/embeddings", json={"model": "bge-m3", "input": "a b c d e f g"}
    )
    assert r.status_code == 200 and r.json()["usage"]["total_tokens"] == 5


@pytest.mark.parametrize(
    ("content", "param"),
    [
        (b'{"model": "bge-m3", "input": ', None),
        (b"not json at all", None),
        (b"", None),
        (b"[1, 2]", None),
        (b'{"model": "bge-m3"}', "input"),
        (b'{"model": "bge-m3", "input": 5}', "input"),
        (b'{"model": "bge-m3", "input": ["a", 1]}', "input"),
        (b'{"model": "bge-m3", "input": "a", "encoding_format": "hex"}', "encoding_format"),
        (b'{"model": 3, "input": "a"}', "model"),
    ],
)
def test_malformed_and_invalid_bodies_use_the_openai_envelope(
    content: bytes, param: str | None
) -> None:
    r = client().post(
        "/v1/embeddings", content=content, headers={"content-type": "application/json"}
    )
    error = assert_openai_error(r, 400)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert "detail" not in r.text


def test_body_is_parsed_as_json_whatever_the_content_type() -> None:
    # curl -d without -H sends application/x-www-form-urlencoded
    r = client().post(
        "/v1/embeddings",
        content=b'{"model": "bge-m3", "input": "x"}',
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert r.status_code == 200, r.text


def test_models_list_and_get() -> None:
    app = client(bge_m3_like(), dense_only())
    r = app.get("/v1/models")
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["bge-m3", "all-MiniLM-L6-v2"]
    assert set(body["data"][0]) == {"id", "object", "created", "owned_by"}
    assert body["data"][0]["owned_by"] == "BAAI"
    r = app.get("/v1/models/BAAI/bge-m3")  # an alias with a slash
    assert r.status_code == 200 and r.json()["id"] == "bge-m3"
    assert_openai_error(app.get("/v1/models/nope"), 404, "model_not_found")


def test_unknown_v1_url_and_wrong_method_use_openai_envelope() -> None:
    app = client()
    assert_openai_error(app.post("/v1/completions", json={}), 404, "unknown_url")
    assert_openai_error(app.get("/v1/embeddings"), 405, "method_not_allowed")


def test_dimensions_as_a_string_is_refused() -> None:
    # OpenAI's schema says integer; "64" is not read as 64.
    r = client().post("/v1/embeddings", json={"model": "bge-m3", "input": "x", "dimensions": "8"})
    error = assert_openai_error(r, 400)
    assert error["param"] == "dimensions" and "integer" in error["message"]


def test_a_request_is_tokenized_once_by_the_engine() -> None:
    # GIVEN a token cap small enough to matter WHEN requests come in THEN the engine's one call
    # both counts and encodes: nothing tokenizes the texts beforehand just to count them.
    fake = bge_m3_like(max_length=8)
    app = client(fake, max_tokens_per_request=16)
    words = " ".join(["w"] * 50)
    assert app.post("/v1/embeddings", json={"input": [words, words]}).status_code == 200
    r = app.post("/v1/embeddings", json={"input": [words, words, "x"]})
    assert_openai_error(r, 400, "max_tokens_per_request")
    assert [name for name, _ in fake.calls] == ["encode", "encode"]


def test_an_integral_number_is_an_integer_and_a_fraction_is_not() -> None:
    # JSON Schema's integer, as the OpenAPI document says: 8.0 is 8; 8.5 is a 400.
    app = client()
    r = app.post("/v1/embeddings", json={"input": "x", "dimensions": 8.0})
    assert r.status_code == 200, r.text
    assert len(r.json()["data"][0]["embedding"]) == 8
    error = assert_openai_error(
        app.post("/v1/embeddings", json={"input": "x", "dimensions": 8.5}), 400
    )
    assert error["param"] == "dimensions"
