"""Micro-batching (handler/engine/microbatch.py) on the real engine with the tiny BGE-M3 build.

No test relies on timing for its verdict: merging is forced by holding the first pass (a gate
around Engine.run_ids; with wait_ms 0 a request that finds the model idle runs that pass on its own
thread) until the other jobs are queued; every wait is only a bounded guard against a hang.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fakes import LiveServer, bge_m3_like, settings

from handler.app import create_app
from handler.engine import Encoded, Engine, EngineConfig, ModelRegistry
from handler.engine import microbatch as microbatch_module
from handler.engine.errors import CapabilityError, EngineError, InputError, InputTooLongError
from handler.engine.microbatch import MicroBatcher, micro_batched

HANG_GUARD_S = 60
MAX_LENGTH = 48
LONG_TEXT = " ".join(f"sentence {i} talks about retrieval and vector databases." for i in range(40))
TEXTS = [
    "What is BGE M3?",
    "BGE-M3 是一個支援稠密檢索、詞彙匹配與多向量互動的嵌入模型。",
    "日本語のテキストをトークン化する。",
    "Русский текст для проверки токенизатора.",
    "trailing spaces and\ttabs   ",
    "a",
    LONG_TEXT,
]
HEADS = [  # dense, sparse, colbert
    {"dense": True},
    {"dense": False, "sparse": True},
    {"dense": False, "colbert": True},
    {"dense": True, "sparse": True, "colbert": True},
    {"dense": True, "colbert": True},
]


@pytest.fixture(scope="module")
def engine(tiny_fp32: Path) -> Engine:
    return Engine.load(tiny_fp32, EngineConfig(threads=1))


@pytest.fixture
def batcher(engine: Engine) -> Iterator[MicroBatcher]:
    b = MicroBatcher(engine)
    yield b
    b.close(timeout=HANG_GUARD_S)


class Gate:
    """Stands in for Engine.run_ids: records the rows of every pass and holds the first pass
    until `release` is set; `fail_pass` makes that pass (1-based) raise instead."""

    def __init__(self, engine: Engine, *, fail_pass: int | None = None):
        self.run_ids = engine.run_ids
        self.entered = threading.Event()
        self.release = threading.Event()
        self.rows: list[int] = []
        self.threads: list[str] = []  # the thread each pass ran on
        self.fail_pass = fail_pass

    def __call__(self, ids: list[list[int]], *heads: bool, tokenize_ms: float = 0.0) -> Encoded:
        self.rows.append(len(ids))
        self.threads.append(threading.current_thread().name)
        if len(self.rows) == 1:
            self.entered.set()
            assert self.release.wait(HANG_GUARD_S), "the test never released the gate"
        if len(self.rows) == self.fail_pass:
            raise RuntimeError("boom in the pass")
        return self.run_ids(ids, *heads, tokenize_ms=tokenize_ms)


@pytest.fixture
def gate(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> Gate:
    g = Gate(engine)
    monkeypatch.setattr(engine, "run_ids", g)
    return g


def wait_until(condition: Callable[[], bool]) -> None:
    """Readiness poll, bounded; the verdicts never depend on how long it took."""
    deadline = time.monotonic() + HANG_GUARD_S
    while not condition():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.001)


def hold_first_pass(pool: ThreadPoolExecutor, gate: Gate, first: Callable[[], Any]) -> Future[Any]:
    """Start `first` and return once its pass has begun (held by the gate)."""
    future = pool.submit(first)
    assert gate.entered.wait(HANG_GUARD_S)
    return future


def assert_same(got: Encoded, want: Encoded, heads: dict[str, bool]) -> None:
    assert got.token_counts == want.token_counts
    for head in ("dense", "sparse", "colbert"):
        assert (getattr(got, head) is None) == (not heads.get(head, head == "dense")), head
    if got.dense is not None:
        assert want.dense is not None
        np.testing.assert_allclose(got.dense, want.dense, rtol=0, atol=1e-5)
    if got.sparse is not None:
        assert want.sparse is not None
        for a, b in zip(got.sparse, want.sparse, strict=True):
            assert a.keys() == b.keys()
            np.testing.assert_allclose([a[k] for k in b], list(b.values()), rtol=0, atol=1e-5)
    if got.colbert is not None:
        assert want.colbert is not None
        for x, y in zip(got.colbert, want.colbert, strict=True):
            assert x.shape == y.shape
            np.testing.assert_allclose(x, y, rtol=0, atol=1e-5)


# ---- results -------------------------------------------------------------------------------------


def _jobs() -> list[dict[str, Any]]:
    """Mixed heads, sizes, lengths and limits: job i takes a rotating slice of TEXTS."""
    jobs = []
    for i in range(24):
        n = 1 + i % 4
        texts = [TEXTS[(i + k) % len(TEXTS)] for k in range(n)]
        max_length = (None, MAX_LENGTH, 12)[i % 3]
        jobs.append({"texts": texts, "max_length": max_length, **HEADS[i % len(HEADS)]})
    return jobs


def test_many_threads_get_the_engines_own_results(engine: Engine, batcher: MicroBatcher) -> None:
    jobs = _jobs()
    want = [engine.encode(**job) for job in jobs]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda job: batcher.encode(**job), jobs))
    for job, g, w in zip(jobs, got, want, strict=True):
        assert_same(g, w, job)
        assert set(g.timings_ms) == {"tokenize", "queue", "infer", "post"}


def test_merged_jobs_run_in_one_pass_with_their_own_results(
    engine: Engine, batcher: MicroBatcher, gate: Gate
) -> None:
    jobs = _jobs()[:9]
    want = [engine.encode(**job) for job in jobs]  # Engine.encode does not pass the gate
    with ThreadPoolExecutor(len(jobs)) as pool:
        first = hold_first_pass(pool, gate, lambda: batcher.encode(**jobs[0]))
        rest = [pool.submit(batcher.encode, **job) for job in jobs[1:]]
        wait_until(lambda: batcher.queued == len(rest))
        gate.release.set()
        got = [first.result(), *(f.result() for f in rest)]
    # THEN the first job ran alone, on its caller's thread (the model was idle), and the eight
    # queued behind it shared the second pass, on the worker, once the first was over
    assert gate.rows == [len(jobs[0]["texts"]), sum(len(j["texts"]) for j in jobs[1:])]
    assert gate.threads[0].startswith("ThreadPoolExecutor")
    assert gate.threads[1].startswith("microbatch-")
    assert batcher.passes == 2
    assert [g.batched_with for g in got] == [0] + [len(rest) - 1] * len(rest)
    for job, g, w in zip(jobs, got, want, strict=True):
        assert_same(g, w, job)


def test_groups_respect_the_row_cap_in_arrival_order(engine: Engine, gate: Gate) -> None:
    batcher = MicroBatcher(engine, max_rows=3)
    sizes = [1, 2, 1, 2, 3, 1]
    try:
        with ThreadPoolExecutor(len(sizes) + 1) as pool:
            first = hold_first_pass(pool, gate, lambda: batcher.encode(["x"]))
            rest = []
            for n in sizes:  # one at a time, so the queue order is known
                rest.append(pool.submit(batcher.encode, TEXTS[:n]))
                wait_until(lambda: batcher.queued == len(rest))
            gate.release.set()
            first.result()
            results = [f.result() for f in rest]
    finally:
        batcher.close(timeout=HANG_GUARD_S)
    # 1+2 fill a group of 3; 1+2 the next; 3 alone; the last 1 alone (nothing queued behind it)
    assert gate.rows == [1, 3, 3, 3, 1]
    assert [len(r.token_counts) for r in results] == sizes


def test_score_and_token_ids_go_through_the_batcher(engine: Engine, batcher: MicroBatcher) -> None:
    want = engine.score(TEXTS[:3], TEXTS[3:6], max_length=MAX_LENGTH)
    got = batcher.score(TEXTS[:3], TEXTS[3:6], max_length=MAX_LENGTH)
    for name in ("dense", "sparse", "colbert", "sparse_dense", "colbert_sparse_dense"):
        np.testing.assert_allclose(getattr(got, name), getattr(want, name), atol=1e-5)
    assert got.token_counts == want.token_counts
    ids = [[0, 35378, 8999, 38, 2], [0, 6, 2]]
    got_ids = batcher.encode_ids(ids, sparse=True)
    assert_same(got_ids, engine.encode_ids(ids, sparse=True), {"dense": True, "sparse": True})
    assert batcher.passes == 2


def test_a_lone_request_runs_its_pass_on_its_own_thread(engine: Engine, gate: Gate) -> None:
    # WHEN a request finds the model idle (nothing queued, no pass running, wait_ms 0)
    gate.release.set()
    batcher = MicroBatcher(engine)
    try:
        got = batcher.encode(TEXTS[:2], sparse=True, max_length=MAX_LENGTH)
        # THEN its pass ran on the caller's thread, no worker was started for it, and its
        # result and timings are those of a pass it had to itself
        assert gate.threads == [threading.current_thread().name]
        assert batcher._worker is None
        assert got.batched_with == 0 and got.timings_ms["queue"] == 0.0
        want = engine.encode(TEXTS[:2], sparse=True, max_length=MAX_LENGTH)
        assert_same(got, want, {"dense": True, "sparse": True})
    finally:
        batcher.close(timeout=HANG_GUARD_S)


def test_a_lone_request_with_wait_ms_is_joined_by_the_next(engine: Engine) -> None:
    # A long wait that the row cap cuts short: the verdict does not depend on the clock.
    batcher = MicroBatcher(engine, wait_ms=HANG_GUARD_S * 1000, max_rows=2)
    try:
        with ThreadPoolExecutor(2) as pool:
            a = pool.submit(batcher.encode, ["first"])
            b = pool.submit(batcher.encode, ["second"], sparse=True)
            got = [a.result(HANG_GUARD_S), b.result(HANG_GUARD_S)]
    finally:
        batcher.close(timeout=HANG_GUARD_S)
    assert batcher.passes == 1 and [g.batched_with for g in got] == [1, 1]
    assert got[0].sparse is None and got[1].sparse is not None


# ---- errors --------------------------------------------------------------------------------------


def test_an_error_in_a_pass_reaches_every_merged_caller(
    engine: Engine, batcher: MicroBatcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = Gate(engine, fail_pass=2)
    monkeypatch.setattr(engine, "run_ids", gate)
    with ThreadPoolExecutor(5) as pool:
        first = hold_first_pass(pool, gate, lambda: batcher.encode(["ok"]))
        merged = [pool.submit(batcher.encode, [t]) for t in TEXTS[:4]]
        wait_until(lambda: batcher.queued == len(merged))
        gate.release.set()
        assert first.result().dense is not None
        for f in merged:
            with pytest.raises(RuntimeError, match="boom in the pass"):
                f.result()
    assert gate.rows == [1, 4]
    # The worker survives a failed pass.
    assert batcher.encode(["after"]).dense is not None


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda b: b.encode(["x"], dense=False), InputError),
        (lambda b: b.encode(["x"], max_length=0), InputError),
        (lambda b: b.encode(["x"], max_length=2), InputError),
        (lambda b: b.encode(["short", LONG_TEXT], truncate=False, max_length=8), InputTooLongError),
        (lambda b: b.encode_ids([[0, 250002, 2]]), InputError),
        (lambda b: b.encode_ids([[]]), InputError),
        (lambda b: b.score(["a", "b"], ["c"]), InputError),
        (lambda b: b.score(["a"], ["c"], weights=(0, 0, 0)), InputError),
    ],
)
def test_bad_input_raises_in_the_caller_before_queuing(
    batcher: MicroBatcher, call: Callable[[MicroBatcher], Any], error: type[Exception]
) -> None:
    with pytest.raises(error) as raised:
        call(batcher)
    assert type(raised.value) is error  # the same type the engine raises, not a wrapper
    assert batcher.passes == 0 and batcher.queued == 0


def test_capability_error_raises_in_the_caller(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A model without a colbert output (the tiny build has all three; hide one).
    monkeypatch.setattr(Engine, "available_heads", property(lambda self: ("dense", "sparse")))
    batcher = MicroBatcher(engine)
    with pytest.raises(CapabilityError, match="colbert"):
        batcher.encode(["x"], colbert=True)
    assert batcher.passes == 0
    batcher.close()


def test_a_dead_worker_answers_its_jobs_and_a_new_one_takes_over(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Crash(BaseException):  # not an Exception: escapes the per-pass handler, ends the worker
        pass

    real_share = microbatch_module._share
    crashes = iter([True])

    def crashing_share(*args: Any, **kwargs: Any) -> Encoded:
        if next(crashes, False):
            raise Crash
        return real_share(*args, **kwargs)

    gate = Gate(engine)
    monkeypatch.setattr(engine, "run_ids", gate)
    monkeypatch.setattr(microbatch_module, "_share", crashing_share)
    # One job per group; wait_ms > 0 sends every job through the worker (no lone pass on the
    # caller's thread), and the row cap ends each group's wait at once.
    batcher = MicroBatcher(engine, max_rows=1, wait_ms=HANG_GUARD_S * 1000)
    try:
        with ThreadPoolExecutor(2) as pool:
            first = hold_first_pass(pool, gate, lambda: batcher.encode(["a"]))
            queued = pool.submit(batcher.encode, ["b"])
            wait_until(lambda: batcher.queued == 1)
            gate.release.set()
            # THEN the job in the crashed pass and the one still queued both get an EngineError
            for f in (first, queued):
                with pytest.raises(EngineError, match="worker stopped"):
                    f.result(HANG_GUARD_S)
        # AND the next request starts a fresh worker
        assert batcher.encode(["c"]).dense is not None
    finally:
        batcher.close(timeout=HANG_GUARD_S)


def test_close_answers_queued_jobs_then_refuses(engine: Engine, gate: Gate) -> None:
    batcher = MicroBatcher(engine)
    with ThreadPoolExecutor(2) as pool:
        first = hold_first_pass(pool, gate, lambda: batcher.encode(["a"]))
        queued = pool.submit(batcher.encode, ["b"])
        wait_until(lambda: batcher.queued == 1)
        batcher.close(timeout=0)  # closed now; the worker is still inside the held pass
        gate.release.set()
        assert first.result().dense is not None and queued.result().dense is not None
    with pytest.raises(EngineError, match="closed"):
        batcher.encode(["c"])


# ---- wiring --------------------------------------------------------------------------------------


def test_micro_batched_wraps_real_engines_only(engine: Engine) -> None:
    fake = bge_m3_like(model_id="fake", aliases=())
    wrapped = micro_batched(ModelRegistry([engine, fake]), wait_ms=2)
    first, second = list(wrapped)
    assert isinstance(first, MicroBatcher) and first.engine is engine and first.wait_s == 0.002
    assert second is fake
    assert wrapped.get(engine.info.id) is first
    first.close()


def test_settings_bound_the_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    assert settings().micro_batching is True and settings().micro_batch_wait_ms == 0
    monkeypatch.setenv("MICRO_BATCH", "false")
    monkeypatch.setenv("MICRO_BATCH_WAIT_MS", "2.5")
    assert settings().micro_batching is False and settings().micro_batch_wait_ms == 2.5
    monkeypatch.setenv("MICRO_BATCH_WAIT_MS", "51")
    with pytest.raises(ValidationError):
        settings()


def test_on_lambda_micro_batching_is_off_unless_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lambda hands an environment one request at a time: nothing to share a pass with."""
    monkeypatch.delenv("MICRO_BATCH", raising=False)
    monkeypatch.setenv("AWS_LAMBDA_FUNCTION_NAME", "bge-m3")
    assert settings().micro_batching is False
    monkeypatch.setenv("MICRO_BATCH", "true")
    assert settings().micro_batching is True
    monkeypatch.delenv("AWS_LAMBDA_FUNCTION_NAME")
    monkeypatch.setenv("K_SERVICE", "bge-m3")  # Cloud Run: concurrent requests, batching pays
    monkeypatch.delenv("MICRO_BATCH")
    assert settings().micro_batching is True


# ---- over HTTP -----------------------------------------------------------------------------------

V2 = "/api/data/embedding/version/2"


def _requests() -> list[tuple[str, dict[str, Any]]]:
    return [
        ("/v1/embeddings", {"model": "bge-m3", "input": TEXTS[:3]}),
        ("/embeddings", {"input": TEXTS[3:5], "input_type": {"colbert": True}}),
        ("/v1/embeddings", {"model": "bge-m3", "input": TEXTS[5]}),
        ("/embeddings", {"input": [LONG_TEXT], "sparse_format": "id"}),
        ("/score", {"sentences_1": TEXTS[:2], "sentences_2": TEXTS[2:4]}),
        (
            V2,
            {"model": {"model_name": "bge-m3"}, "data": [{"data_type": "text", "text": TEXTS[1]}]},
        ),
        ("/v1/embeddings", {"model": "bge-m3", "input": TEXTS}),
    ]


def test_concurrent_http_requests_share_passes_and_answer_correctly(
    engine: Engine, gate: Gate
) -> None:
    requests = _requests()
    with LiveServer(create_app(settings(), ModelRegistry([engine]))) as direct:
        direct_answers = [
            httpx.post(direct.url + path, json=body, timeout=HANG_GUARD_S)
            for path, body in requests
        ]
    assert [r.status_code for r in direct_answers] == [200] * len(requests)
    want = [r.json() for r in direct_answers]
    batcher = MicroBatcher(engine)
    try:
        with (
            LiveServer(create_app(settings(), ModelRegistry([batcher]))) as server,
            ThreadPoolExecutor(len(requests)) as pool,
        ):

            def post(item: tuple[str, dict[str, Any]]) -> httpx.Response:
                return httpx.post(server.url + item[0], json=item[1], timeout=HANG_GUARD_S)

            first = hold_first_pass(pool, gate, lambda: post(requests[0]))
            rest = [pool.submit(post, item) for item in requests[1:]]
            wait_until(lambda: batcher.queued == len(rest))
            gate.release.set()
            got = [first.result(), *(f.result() for f in rest)]
    finally:
        batcher.close(timeout=HANG_GUARD_S)
    assert batcher.passes == 2  # one for the held request, one for all the others
    for r, w in zip(got, want, strict=True):
        assert r.status_code == 200, r.text
        assert "x-queue-time" in r.headers
        _assert_close_json(r.json(), w)


def _assert_close_json(got: Any, want: Any, path: str = "") -> None:
    """Equal JSON, with numbers within 1e-5 (the passes were padded differently)."""
    if isinstance(want, dict):
        keys = want.keys() - {"request_id"}  # fresh per request
        assert isinstance(got, dict) and got.keys() - {"request_id"} == keys, path
        for key in keys:
            _assert_close_json(got[key], want[key], f"{path}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            _assert_close_json(g, w, f"{path}[{i}]")
    elif isinstance(want, int | float) and not isinstance(want, bool):
        # %.9g writes 0.0 as 0: compare every number with the tolerance
        assert got == pytest.approx(want, abs=1e-5), path
    else:
        assert got == want, path


def test_token_cap_and_dimensions_are_the_engines_through_the_batcher(
    engine: Engine, batcher: MicroBatcher
) -> None:
    from handler.engine.errors import TooManyTokensError

    want = engine.encode(TEXTS, dimensions=16, max_length=MAX_LENGTH)
    got = batcher.encode(TEXTS, dimensions=16, max_length=MAX_LENGTH)
    assert got.dense is not None and got.dense.shape == (len(TEXTS), 16)
    assert_same(got, want, {"dense": True})
    # The cap is counted on the request's own tokenization, in the caller's thread: no pass.
    passes = batcher.passes
    total = sum(want.token_counts)
    with pytest.raises(TooManyTokensError) as info:
        batcher.encode(TEXTS, max_length=MAX_LENGTH, max_tokens=total - 1)
    assert (info.value.total, info.value.limit) == (total, total - 1)
    assert batcher.encode(TEXTS, max_length=MAX_LENGTH, max_tokens=total).token_counts == (
        want.token_counts
    )
    assert batcher.passes == passes + 1
