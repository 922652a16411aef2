"""The official `openai` client against the app on a real uvicorn server on 127.0.0.1.

openai-python asks for `encoding_format: base64` when the caller does not set it and decodes the
reply as little-endian float32; with `float` it takes the JSON numbers. Either way the vectors it
hands back must be exactly the engine's.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator

import numpy as np
import openai
import pytest
from fakes import FakeEngine, LiveServer, bge_m3_like, dense_only, make_app

from handler.engine.heads import truncate_dims

KEY = "sk-test-key"


@pytest.fixture(scope="module")
def fake() -> FakeEngine:
    return bge_m3_like()


@pytest.fixture(scope="module")
def server(fake: FakeEngine) -> Iterator[LiveServer]:
    with LiveServer(make_app(fake, dense_only(), api_key=KEY)) as live:
        yield live


@pytest.fixture(scope="module")
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)


def vectors(response: openai.types.CreateEmbeddingResponse) -> list[np.ndarray]:
    out = []
    for item in response.data:
        value = item.embedding
        if isinstance(value, str):  # explicit base64: the client hands back the string as sent
            out.append(np.frombuffer(base64.b64decode(value), dtype="<f4"))
        else:  # float, or unset (the client asked for base64 and decoded it itself)
            out.append(np.asarray(value, dtype=np.float32))
    return out


@pytest.mark.parametrize("encoding_format", [None, "float", "base64"])
@pytest.mark.parametrize("inputs", ["The food was delicious", ["one", "two words", "the third"]])
def test_vectors_decode_equal_to_the_engine(
    client: openai.OpenAI,
    fake: FakeEngine,
    encoding_format: str | None,
    inputs: str | list[str],
) -> None:
    kwargs = {} if encoding_format is None else {"encoding_format": encoding_format}
    response = client.embeddings.create(model="bge-m3", input=inputs, **kwargs)  # type: ignore[arg-type]
    texts = [inputs] if isinstance(inputs, str) else inputs
    assert response.model == "bge-m3"
    assert [item.index for item in response.data] == list(range(len(texts)))
    for got, text in zip(vectors(response), texts, strict=True):
        np.testing.assert_array_equal(got, fake.expected_dense(text))
    assert response.usage.prompt_tokens == sum(len(t.split()) + 2 for t in texts)
    assert response.usage.total_tokens == response.usage.prompt_tokens


def test_default_request_is_base64_on_the_wire(client: openai.OpenAI) -> None:
    raw = client.embeddings.with_raw_response.create(model="bge-m3", input="x")
    assert isinstance(json.loads(raw.http_response.text)["data"][0]["embedding"], str)
    assert raw.http_response.headers["x-request-id"]


@pytest.mark.parametrize("encoding_format", ["float", "base64"])
def test_dimensions(client: openai.OpenAI, fake: FakeEngine, encoding_format: str) -> None:
    response = client.embeddings.create(
        model="bge-m3",
        input=["a b", "c"],
        dimensions=8,
        encoding_format=encoding_format,  # type: ignore[arg-type]
    )
    for got, text in zip(vectors(response), ["a b", "c"], strict=True):
        assert got.shape == (8,)
        np.testing.assert_array_equal(got, truncate_dims(fake.expected_dense(text)[None], 8)[0])


def test_errors_become_the_clients_exceptions(server: LiveServer, client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as not_found:
        client.embeddings.create(model="text-embedding-3-small", input="x")
    assert not_found.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        client.embeddings.create(model="bge-m3", input=[[1, 2, 3]])
    assert "check_embedding_ctx_length=False" in str(bad.value.message)
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="bge-m3", input="x", dimensions=4096)
    wrong_key = openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong_key.embeddings.create(model="bge-m3", input="x")


def test_models_via_the_client(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == ["bge-m3", "all-MiniLM-L6-v2"]
    assert client.models.retrieve("minilm").id == "all-MiniLM-L6-v2"
