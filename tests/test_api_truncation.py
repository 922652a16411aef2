"""Truncation reported: a per-input `truncated` list in the native and v2 responses (present only
when an input was cut, so other responses are unchanged), `X-Truncated-Inputs` on the OpenAI
route (read through the official openai client), and the count in the request's log line."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import openai
import pytest
from fakes import LiveServer, bge_m3_like, make_app
from fastapi.testclient import TestClient

from handler import logging as request_logging

LONG = " ".join(f"w{i}" for i in range(100))  # 102 tokens with <s> and </s>; the fake allows 64
V2 = "/api/data/embedding/version/2"


@pytest.fixture
def client() -> TestClient:
    return TestClient(make_app(bge_m3_like()))


def test_native_flags_only_when_cut(client: TestClient) -> None:
    cut = client.post("/embeddings", json={"input": ["short", LONG, "also short"]}).json()
    assert cut["truncated"] == [False, True, False]
    assert cut["usage"]["total_tokens"] == 3 + 64 + 4
    whole = client.post("/embeddings", json={"input": ["short", "also short"]}).json()
    assert "truncated" not in whole
    # max_length set by the request counts too
    asked = client.post("/embeddings", json={"input": ["a b c d"], "max_length": 4}).json()
    assert asked["truncated"] == [True]


def test_v2_flags_only_when_cut(client: TestClient) -> None:
    def body(*texts: str) -> dict[str, object]:
        return {
            "model": {"model_name": "bge-m3"},
            "data": [{"data_type": "text", "text": t} for t in texts],
        }

    cut = client.post(V2, json=body(LONG, "x")).json()
    assert cut["code"] == 0 and cut["data"]["truncated"] == [True, False]
    assert "truncated" not in client.post(V2, json=body("x")).json()["data"]


@pytest.fixture
def log_lines() -> Iterator[list[str]]:
    lines: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(request_logging._JsonLineFormatter().format(record))

    logger = logging.getLogger(request_logging.REQUEST_LOGGER)
    handler = Capture()
    logger.addHandler(handler)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)


def test_openai_header_through_the_client_and_log_count(log_lines: list[str]) -> None:
    with LiveServer(make_app(bge_m3_like())) as live:
        client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)
        raw = client.embeddings.with_raw_response.create(
            model="bge-m3", input=[LONG, "x", LONG], encoding_format="float"
        )
        assert raw.headers["x-truncated-inputs"] == "0,2"
        assert len(raw.parse().data) == 3  # the body is OpenAI's, unchanged
        plain = client.embeddings.with_raw_response.create(model="bge-m3", input="x")
        assert "x-truncated-inputs" not in plain.headers
    counts = [json.loads(line).get("truncated") for line in log_lines]
    assert counts == [2, 0]


@pytest.mark.slow
def test_real_engine_behind_the_micro_batcher_reports_cuts(tiny_fp32: object) -> None:
    from pathlib import Path

    from fakes import settings

    from handler.app import create_app
    from handler.engine import EngineConfig, load_registry
    from handler.engine.microbatch import micro_batched

    assert isinstance(tiny_fp32, Path)
    models = micro_batched(load_registry([tiny_fp32], EngineConfig(warmup=False)))
    app = TestClient(create_app(settings(), models))
    body = {"input": ["What is BGE M3? " * 4, "BGE"], "max_length": 8}
    r = app.post("/embeddings", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["truncated"] == [True, False]
    (bge,) = app.post("/tokenize", json={"inputs": "BGE"}).json()
    assert r.json()["usage"]["total_tokens"] == 8 + len(bge)
