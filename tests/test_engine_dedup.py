"""Identical inputs computed once, on the real engine (conftest's `tiny_fp32`): within a request,
within a micro-batched pass of several requests, and across requests through the optional LRU
cache (EMBED_CACHE_SIZE); the rows that really reach the ONNX session are counted."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
from fakes import LiveServer, settings

from handler import logging as request_logging
from handler.app import create_app
from handler.engine import Engine, EngineConfig, ModelRegistry
from handler.engine.microbatch import MicroBatcher
from tests.test_microbatch import HANG_GUARD_S, Gate, hold_first_pass, wait_until

pytestmark = pytest.mark.slow

PARIS = "Paris is the capital of France"  # the OpenAI-compatible seed sends it twice


class CountingSession:
    """The engine's ONNX session, counting the rows of every run."""

    def __init__(self, session: Any):
        self.session = session
        self.rows: list[int] = []

    def run(self, names: Any, feeds: dict[str, Any]) -> Any:
        self.rows.append(int(feeds["input_ids"].shape[0]))
        return self.session.run(names, feeds)

    def __getattr__(self, name: str) -> Any:  # everything else as the real session has it
        return getattr(self.session, name)


def load(tiny_fp32: Path, **config: Any) -> tuple[Engine, CountingSession]:
    engine = Engine.load(tiny_fp32, EngineConfig(threads=1, warmup=False, **config))
    counter = CountingSession(engine.session)
    engine.session = counter
    return engine, counter


def test_identical_inputs_in_one_request_run_once(tiny_fp32: Path) -> None:
    engine, counter = load(tiny_fp32)
    out = engine.encode([PARIS, "Berlin", PARIS], dense=True, sparse=True, colbert=True)
    assert sum(counter.rows) == 2
    assert out.sources == ["computed", "computed", "shared"]
    assert out.dense is not None and out.sparse is not None and out.colbert is not None
    np.testing.assert_array_equal(out.dense[0], out.dense[2])
    assert out.sparse[0] == out.sparse[2]
    np.testing.assert_array_equal(out.colbert[0], out.colbert[2])
    alone = engine.encode([PARIS], dense=True, sparse=True, colbert=True)
    assert alone.dense is not None
    np.testing.assert_allclose(out.dense[0], alone.dense[0], rtol=0, atol=1e-6)
    # Different ids (a shorter max_length) are different inputs
    cut = engine.encode([PARIS, PARIS], max_length=4)
    assert cut.sources == ["computed", "shared"]


def test_identical_inputs_of_different_requests_in_one_pass(
    tiny_fp32: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, counter = load(tiny_fp32)
    gate = Gate(engine)
    monkeypatch.setattr(engine, "run_ids", gate)
    batcher = MicroBatcher(engine)
    try:
        with ThreadPoolExecutor(4) as pool:
            first = hold_first_pass(pool, gate, lambda: batcher.encode(["held"]))
            b = pool.submit(batcher.encode, [PARIS])
            # b queues before c, so that b's PARIS is the one that runs and c's the one shared
            wait_until(lambda: batcher.queued == 1)
            c = pool.submit(batcher.encode, [PARIS, "Rome"], sparse=True)
            wait_until(lambda: batcher.queued == 2)
            gate.release.set()
            first.result(HANG_GUARD_S)
            got_b, got_c = b.result(HANG_GUARD_S), c.result(HANG_GUARD_S)
    finally:
        batcher.close(timeout=HANG_GUARD_S)
    # THEN the second pass held both requests, and PARIS ran once for both
    assert gate.rows == [1, 3] and counter.rows[-1] == 2
    assert got_b.sources == ["computed"] and got_c.sources == ["shared", "computed"]
    assert got_b.dense is not None and got_c.dense is not None and got_c.sparse is not None
    np.testing.assert_array_equal(got_b.dense[0], got_c.dense[0])


def test_the_lru_cache_across_requests(tiny_fp32: Path) -> None:
    engine, counter = load(tiny_fp32, cache_size=2)
    assert engine.cache is not None and engine.cache.model_digest == engine.info.fingerprint
    first = engine.encode([PARIS])
    again = engine.encode([PARIS])
    assert (first.sources, again.sources) == (["computed"], ["cached"])
    assert sum(counter.rows) == 1
    assert first.dense is not None and again.dense is not None
    np.testing.assert_array_equal(first.dense, again.dense)
    # dimensions are cut after the cache: a hit serves them too
    short = engine.encode([PARIS], dimensions=8)
    assert short.sources == ["cached"] and short.dense is not None and short.dense.shape[1] == 8
    # a head the entry lacks runs, and the entry keeps both afterwards
    assert engine.encode([PARIS], sparse=True).sources == ["computed"]
    assert engine.encode([PARIS], sparse=True).sources == ["cached"]
    # ColBERT rows are never cached
    assert engine.encode([PARIS], colbert=True).sources == ["computed"]
    # least recently used goes first
    engine.encode(["one"])
    engine.encode(["two"])
    assert engine.encode([PARIS]).sources == ["computed"]
    assert engine.encode(["two"]).sources == ["cached"]


@pytest.fixture
def log_lines() -> Iterator[list[dict[str, Any]]]:
    lines: list[dict[str, Any]] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(json.loads(request_logging._JsonLineFormatter().format(record)))

    logger = logging.getLogger(request_logging.REQUEST_LOGGER)
    handler = Capture()
    logger.addHandler(handler)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)


def test_the_log_line_counts_shared_inputs_and_cache_hits(
    tiny_fp32: Path, log_lines: list[dict[str, Any]]
) -> None:
    engine = Engine.load(tiny_fp32, EngineConfig(threads=1, warmup=False, cache_size=16))
    app = create_app(settings(embed_cache_size=16), ModelRegistry([MicroBatcher(engine)]))
    with LiveServer(app) as live:
        client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)
        one = client.embeddings.create(
            model="bge-m3", input=[PARIS, PARIS], encoding_format="float"
        )
        client.embeddings.create(model="bge-m3", input=[PARIS, "Lyon"], encoding_format="float")
    assert one.data[0].embedding == one.data[1].embedding
    first, second = log_lines
    assert (first["shared"], first["cache_hits"], first["cache_misses"]) == (1, 0, 1)
    assert (second["shared"], second["cache_hits"], second["cache_misses"]) == (0, 1, 1)
