"""Probes, deadlines, client disconnects and graceful shutdown, through real boundaries: uvicorn on
127.0.0.1 (in a thread, or as its own process for SIGTERM), the Lambda entry point with captured
events, and the real micro-batcher on the tiny BGE-M3 build where queued work must be dropped.

No verdict depends on timing: requests are held inside the engine by gates until the test has
seen what it waits for; every wait is a bounded guard against a hang."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from fakes import LiveServer, bge_m3_like, make_app, registry, settings
from prometheus_client.parser import text_string_to_metric_families

from handler.app import create_app
from handler.auth import KeyChecker
from handler.engine import Engine, EngineConfig, ModelRegistry, micro_batched
from handler.engine.microbatch import MicroBatcher
from handler.metrics import PrometheusMetrics

HANG_GUARD_S = 60
# REQUEST_TIMEOUT_S where a test needs a request answered at its deadline. The deadline applies to
# every request of the app, the test's own /metrics probes and follow-up requests included, so it
# is long next to those (at 50 ms a probe on a busy 2-core machine met it and got a 504 of its
# own); the held request waits for it whatever its length, held by a gate until the test looks.
DEADLINE_S = 1.0
TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
V2 = "/api/data/embedding/version/2"

# One embedding request per dialect, and how its envelope names the error code.
DIALECT_REQUESTS: list[tuple[str, dict[str, Any], Callable[[Any], Any]]] = [
    ("/v1/embeddings", {"model": "bge-m3", "input": "held"}, lambda b: b["error"]["code"]),
    (
        V2,
        {"model": {"model_name": "bge-m3"}, "data": [{"data_type": "text", "text": "held"}]},
        lambda b: b["code"],
    ),
    ("/embeddings", {"input": "held"}, lambda b: b["error"]["code"]),
]
V2_SERVER_ERROR = 1000028


def wait_until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + HANG_GUARD_S
    while not condition():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.005)


def metric(url: str, name: str, **labels: str) -> float:
    """A sample's value from /metrics (0 when absent), parsed by prometheus_client's parser."""
    text = httpx.get(f"{url}/metrics", timeout=HANG_GUARD_S).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


# ---- probes --------------------------------------------------------------------------------------


def test_live_and_ready_answer_with_models_and_keys() -> None:
    with LiveServer(make_app()) as server:
        for path in ("/health/live", "/health/ready", "/health", "/"):
            r = httpx.get(server.url + path)
            assert r.status_code == 200, (path, r.text)
            head = httpx.head(server.url + path)
            assert head.status_code == 200 and head.content == b"", path
        assert httpx.get(server.url + "/health/live").json() == {"status": "alive"}
        assert httpx.get(server.url + "/health/ready").json()["status"] == "healthy"


@pytest.mark.parametrize(
    ("engine", "load_error", "checker", "reason"),
    [
        (None, "ModelLoadError: model.onnx is missing", None, "model.onnx is missing"),
        (
            registry(),
            None,
            KeyChecker((), unavailable_reason="API key unavailable: AccessDenied"),
            "AccessDenied",
        ),
    ],
    ids=["model-missing", "key-source-unreadable"],
)
def test_ready_is_503_with_the_reason_while_live_stays_200(
    engine: Any, load_error: str | None, checker: KeyChecker | None, reason: str
) -> None:
    app = create_app(settings(), engine, load_error, checker)
    with LiveServer(app) as server:
        ready = httpx.get(server.url + "/health/ready")
        assert ready.status_code == 503 and reason in ready.json()["error"]
        assert httpx.head(server.url + "/health/ready").status_code == 503
        assert httpx.get(server.url + "/health/live").status_code == 200


# ---- deadlines -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "code_of"), DIALECT_REQUESTS, ids=["openai", "v2", "native"]
)
def test_past_the_deadline_the_answer_is_504_in_the_dialects_envelope(
    path: str, body: dict[str, Any], code_of: Callable[[Any], Any]
) -> None:
    gate = threading.Event()
    fake = bge_m3_like(gate=gate)
    with LiveServer(make_app(fake, request_timeout_s=DEADLINE_S)) as server:
        r = httpx.post(server.url + path, json=body, timeout=HANG_GUARD_S)
        assert r.status_code == 504, r.text
        assert code_of(r.json()) == ("request_timeout" if path != V2 else V2_SERVER_ERROR)
        assert r.headers["x-request-id"]
        # The held work ends when the engine returns; the in-flight count comes back to zero.
        assert metric(server.url, "bge_m3_in_flight_requests") == 1
        gate.set()
        wait_until(lambda: metric(server.url, "bge_m3_in_flight_requests") == 0)
        assert metric(server.url, "bge_m3_requests_total", status="504") == 1
        ok = httpx.post(server.url + path, json=body, timeout=HANG_GUARD_S)
        assert ok.status_code == 200


def test_a_request_answered_at_its_deadline_sends_nothing_more_on_its_connection() -> None:
    """The route of a request answered 504 goes on in its thread until the engine returns; its
    own response must then go nowhere. On a keep-alive connection it would be taken for the
    answer to the client's next request."""
    gate = threading.Event()
    with LiveServer(make_app(bge_m3_like(gate=gate), request_timeout_s=DEADLINE_S)) as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=HANG_GUARD_S)
        body = json.dumps({"input": "held"})
        conn.request("POST", "/v1/embeddings", body, {"content-type": "application/json"})
        answered = conn.getresponse()
        assert answered.status == 504 and answered.getheader("connection") != "close"
        assert json.loads(answered.read())["error"]["code"] == "request_timeout"
        gate.set()
        # The route has returned once its request is no longer in flight (counted until then).
        wait_until(lambda: metric(server.url, "bge_m3_in_flight_requests") == 0)
        assert conn.sock is not None
        readable, _, _ = select.select([conn.sock], [], [], 0)
        assert readable == [], "bytes after the 504 on its keep-alive connection"
        conn.request("GET", "/health/live")  # the same connection: http.client reuses it
        reply = conn.getresponse()
        assert (reply.status, json.loads(reply.read())) == (200, {"status": "alive"})
        conn.close()


class HeldExposition(PrometheusMetrics):
    """Prometheus metrics whose exposition (GET /metrics) waits for a gate."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()

    def exposition(self) -> tuple[bytes, str]:
        assert self.gate.wait(HANG_GUARD_S), "the test never opened the gate"
        return super().exposition()


def test_the_deadline_covers_every_route_metrics_included() -> None:
    """REQUEST_TIMEOUT_S is per request, whatever the route: a /metrics that has not answered by
    then is a 504 too. (Why DEADLINE_S leaves room for a test's own probes.)"""
    metrics = HeldExposition()
    app = create_app(settings(request_timeout_s=DEADLINE_S), registry(), metrics=metrics)
    with LiveServer(app) as server:
        late = httpx.get(server.url + "/metrics", timeout=HANG_GUARD_S)
        assert late.status_code == 504
        assert late.json()["error"]["code"] == "request_timeout"
        metrics.gate.set()
        assert metric(server.url, "bge_m3_requests_total", route="/metrics", status="504") == 1


@pytest.fixture(scope="module")
def engine(tiny_fp32: Path) -> Engine:
    return Engine.load(tiny_fp32, EngineConfig(threads=1))


class PassGate:
    """Holds the micro-batcher's first forward pass until released; records every pass."""

    def __init__(self, engine: Engine):
        self.run_ids = engine.run_ids
        self.entered = threading.Event()
        self.release = threading.Event()
        self.rows: list[int] = []

    def __call__(self, ids: list[list[int]], *heads: bool, tokenize_ms: float = 0.0) -> Any:
        self.rows.append(len(ids))
        if len(self.rows) == 1:
            self.entered.set()
            assert self.release.wait(HANG_GUARD_S), "the test never released the gate"
        return self.run_ids(ids, *heads, tokenize_ms=tokenize_ms)


@pytest.fixture
def held(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[MicroBatcher, PassGate]]:
    gate = PassGate(engine)
    monkeypatch.setattr(engine, "run_ids", gate)
    served = micro_batched(ModelRegistry([engine]))
    batcher = served.default
    assert isinstance(batcher, MicroBatcher)
    yield batcher, gate
    gate.release.set()
    batcher.close(timeout=HANG_GUARD_S)


def test_a_queued_request_past_its_deadline_is_dropped_before_it_runs(
    held: tuple[MicroBatcher, PassGate],
) -> None:
    batcher, gate = held
    app = create_app(settings(request_timeout_s=DEADLINE_S), ModelRegistry([batcher]))
    with LiveServer(app) as server, ThreadPoolExecutor(1) as pool:
        url = server.url + "/v1/embeddings"
        first = pool.submit(httpx.post, url, json={"input": "first"}, timeout=HANG_GUARD_S)
        assert gate.entered.wait(HANG_GUARD_S)
        # The second request queues behind the held pass, and its deadline passes there.
        second = httpx.post(url, json={"input": "second"}, timeout=HANG_GUARD_S)
        assert second.status_code == 504
        assert batcher.queued == 0  # withdrawn, not left waiting for a pass
        # The first is inside the pass: answered 504 too, its pass runs to the end unseen.
        assert first.result().status_code == 504
        gate.release.set()
        wait_until(lambda: metric(server.url, "bge_m3_in_flight_requests") == 0)
    assert gate.rows == [1]  # the withdrawn request never cost a forward pass


def test_a_client_that_disconnects_has_its_queued_work_dropped(
    held: tuple[MicroBatcher, PassGate],
) -> None:
    batcher, gate = held
    app = create_app(settings(), ModelRegistry([batcher]))
    with LiveServer(app) as server, ThreadPoolExecutor(1) as pool:
        url = server.url + "/v1/embeddings"
        first = pool.submit(httpx.post, url, json={"input": "first"}, timeout=HANG_GUARD_S)
        assert gate.entered.wait(HANG_GUARD_S)
        body = json.dumps({"input": "gone"}).encode()
        with socket.create_connection(("127.0.0.1", server.port), timeout=HANG_GUARD_S) as sock:
            sock.sendall(
                b"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            wait_until(lambda: batcher.queued == 1)
        wait_until(lambda: batcher.queued == 0)  # withdrawn when the client went away
        gate.release.set()
        assert first.result().status_code == 200
        wait_until(lambda: metric(server.url, "bge_m3_in_flight_requests") == 0)
        assert metric(server.url, "bge_m3_requests_total", status="499") == 1
    assert gate.rows == [1]


# ---- Lambda: the invocation's remaining time is the deadline -------------------------------------


def test_lambda_answers_504_before_the_invocation_runs_out() -> None:
    from test_lambda import Context, load_event, with_request

    import handler.lambda_function as entry

    class ShortContext(Context):
        def get_remaining_time_in_millis(self) -> int:
            return 1050  # LAMBDA_DEADLINE_MARGIN_S (1 s) leaves 50 ms for the request

    gate = threading.Event()
    app = make_app(bge_m3_like(gate=gate), metrics="off")
    event = with_request(
        load_event("http_api_v2_post_json_powertools.json"),
        "POST",
        "/v1/embeddings",
        {"model": "bge-m3", "input": "held"},
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(entry.handler, "app", app)
        result = entry.handler(event, ShortContext())
        gate.set()
        assert result["statusCode"] == 504
        assert json.loads(result["body"])["error"]["code"] == "request_timeout"
        # The next invocation (a full time budget) is served as usual.
        ok = entry.handler(event, Context())
        assert ok["statusCode"] == 200


# ---- SIGTERM under uvicorn, in its own process ---------------------------------------------------


def start_server(env: dict[str, str]) -> tuple[subprocess.Popen[str], str]:
    """The holding server on a free port. Its stderr is kept drained, and printed when the test
    ends (pytest shows it when the test fails: what the server logged before a hang or a
    refused connection)."""
    proc = subprocess.Popen(
        [sys.executable, str(TESTS_DIR / "holding_server.py")],
        cwd=REPO_ROOT,
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(TESTS_DIR)]),
            "PORT": "0",
            "HOST": "127.0.0.1",
            "MODEL_PATH": "",
            **env,
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    deadline = time.monotonic() + HANG_GUARD_S
    for line in proc.stderr:
        if "serving on http://" in line:
            url = line.split("serving on ", 1)[1].split(" ", 1)[0]
            stream = proc.stderr
            threading.Thread(target=_echo, args=(stream,), daemon=True).start()
            return proc, url
        assert time.monotonic() < deadline, "the server did not start"
    raise AssertionError(f"the server exited: {proc.wait()}")


def _echo(stream: Any) -> None:
    for line in stream:
        print(f"[holding server] {line}", end="")


def test_sigterm_finishes_what_it_can_answers_503_for_the_rest_and_exits_0() -> None:
    proc, url = start_server({"SHUTDOWN_GRACE_S": "1", "API_KEY": "k"})
    auth = {"Authorization": "Bearer k"}
    try:
        with ThreadPoolExecutor(3) as pool:
            finishing = pool.submit(
                httpx.post, f"{url}/embeddings", json={"input": "until-drain"}, headers=auth,
                timeout=HANG_GUARD_S,
            )  # fmt: skip
            stuck_openai = pool.submit(
                httpx.post, f"{url}/v1/embeddings", json={"input": "hold"}, headers=auth,
                timeout=HANG_GUARD_S,
            )  # fmt: skip
            stuck_v2 = pool.submit(
                httpx.post,
                f"{url}{V2}",
                json={
                    "model": {"model_name": "bge-m3"},
                    "data": [{"data_type": "text", "text": "hold"}],
                },
                headers=auth,
                timeout=HANG_GUARD_S,
            )
            wait_until(lambda: metric_authed(url, auth) == 3)
            proc.send_signal(signal.SIGTERM)
            done = finishing.result()
            assert done.status_code == 200 and "dense_vecs" in done.json()
            openai_503 = stuck_openai.result()
            assert openai_503.status_code == 503
            assert openai_503.json()["error"]["code"] == "shutting_down"
            v2_503 = stuck_v2.result()
            assert v2_503.status_code == 503 and v2_503.json()["code"] == V2_SERVER_ERROR
        assert proc.wait(timeout=HANG_GUARD_S) == 0
        with pytest.raises(httpx.ConnectError):  # no longer accepting
            httpx.get(f"{url}/health/live")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---- uvicorn's connections -----------------------------------------------------------------------


def test_connections_are_accepted_with_nagle_off() -> None:
    """handler.main.serve turns TCP_NODELAY on on its listening socket, and the connections it
    accepts inherit it: without it a response's body, written after its head, waited for the
    client's delayed ACK on every request but the first of a keep-alive connection."""
    proc, url = start_server({})
    try:
        with httpx.Client(base_url=url, timeout=HANG_GUARD_S) as client:
            for _ in range(2):  # a fresh connection, then the same one kept alive
                r = client.get("/test/connection")
                assert r.status_code == 200, r.text
                assert r.json()["tcp_nodelay"] != 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=HANG_GUARD_S) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def metric_authed(url: str, auth: dict[str, str]) -> float:
    text = httpx.get(f"{url}/metrics", headers=auth, timeout=HANG_GUARD_S).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "bge_m3_in_flight_requests":
                return sample.value
    return 0.0


def test_a_second_sigterm_inside_the_first_ones_handler_does_not_deadlock() -> None:
    # Python runs a signal handler in the main thread between two bytecodes, possibly while that
    # thread holds the drain's lock: inside `begin` for the first of two SIGTERMs (`make serve`
    # under a process-group kill gets two), or inside `waiter`. Holding the lock and calling
    # `begin` from the same thread is that moment; with a non-reentrant lock it never returns.
    from handler.middleware import Drain

    drain = Drain()

    def signal_while_the_lock_is_held() -> None:
        with drain._lock:
            drain.begin(5.0)

    thread = threading.Thread(target=signal_while_the_lock_is_held, daemon=True)
    thread.start()
    thread.join(timeout=10)
    assert not thread.is_alive(), "Drain.begin deadlocked on its own lock"
    assert drain.draining


def test_a_waiter_registered_while_draining_begins_is_settled() -> None:
    # `begin` can run (from a signal handler) between a waiter's registration and its check:
    # the waiter must still learn that draining began.
    from handler.middleware import Drain

    async def scenario() -> bool:
        drain = Drain()
        with drain._lock:  # as if the signal came while `waiter` held the lock
            drain.begin(5.0)
        with drain.waiter() as future:
            await asyncio.wait_for(asyncio.shield(future), timeout=5)
            return future.done()

    settled: list[bool] = []
    # In a thread of its own, so that a lock that deadlocks fails this test instead of hanging it.
    thread = threading.Thread(target=lambda: settled.append(asyncio.run(scenario())), daemon=True)
    thread.start()
    thread.join(timeout=10)
    assert settled == [True]
