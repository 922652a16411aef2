"""Captured Lambda events through the entry point itself, `handler.lambda_function.handler`
(REST v1, HTTP API v2 and v1.0 payloads, Function URL, ALB single- and multi-value headers, base64
bodies).

Each event (tests/data/lambda_events/, sources in SOURCES.txt there) keeps everything as captured
except its method, path and body, which become one of our routes. Events captured with
`isBase64Encoded: true` get our JSON body base64-encoded, so the decoding path runs too.

The handler object is the one Lambda calls, with its own adapters and options; only the ASGI app
it wraps (Mangum's `app`) is swapped for one that create_app built on a fake engine, so that
these tests need no model and still fail if the entry point loses its strict base64 adapters.
"""

from __future__ import annotations

import base64
import copy
import json
import logging
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fakes import FakeEngine, bge_m3_like, make_app, registry
from mangum import Mangum

import handler.lambda_function as entry
import handler.logging as request_logging

REPO_ROOT = Path(__file__).resolve().parent.parent
EVENTS_DIR = Path(__file__).resolve().parent / "data" / "lambda_events"
BAD_BASE64 = "rest_v1_isBase64Encoded_true_but_body_not_base64_powertools.json"
EVENT_FILES = sorted(p.name for p in EVENTS_DIR.glob("*.json"))
GOOD_EVENTS = [name for name in EVENT_FILES if name != BAD_BASE64]
V2 = "/api/data/embedding/version/2"


def load_event(name: str) -> dict[str, Any]:
    # Some captures start with a UTF-8 BOM (alb_put_base64_body..., http_api_v2_put_json...).
    event: dict[str, Any] = json.loads((EVENTS_DIR / name).read_text(encoding="utf-8-sig"))
    return event


@dataclass
class Context:
    aws_request_id: str = "c6af9ac6-7b61-11e6-9a41-93e812345678"
    function_name: str = "bge-m3"
    function_version: str = "$LATEST"
    invoked_function_arn: str = "arn:aws:lambda:us-east-1:123456789012:function:bge-m3"
    memory_limit_in_mb: int = 3008
    log_group_name: str = "/aws/lambda/bge-m3"
    log_stream_name: str = "2024/01/01/[$LATEST]abc"

    def get_remaining_time_in_millis(self) -> int:
        return 900_000


def with_request(
    event: dict[str, Any],
    method: str,
    path: str,
    body: dict[str, Any] | None,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The captured event with our method, path and body; everything else as captured."""
    e = copy.deepcopy(event)
    http = e.get("requestContext", {}).get("http")
    if http is not None:  # HTTP API payload 2.0 and Function URLs
        http["method"] = method
        http["path"] = path
        e["rawPath"] = path
    else:  # REST v1, HTTP API payload 1.0, ALB
        e["httpMethod"] = method
        e["path"] = path
    if body is not None:
        raw = json.dumps(body).encode()
        e["body"] = base64.b64encode(raw).decode() if e.get("isBase64Encoded") else raw.decode()
    for name, value in (headers or {}).items():
        if "multiValueHeaders" in e and e["multiValueHeaders"] is not None:
            e["multiValueHeaders"][name] = [value]
        if e.get("headers") is not None or "multiValueHeaders" not in e:
            e.setdefault("headers", {})[name] = value
    return e


def response_headers(result: dict[str, Any]) -> dict[str, str]:
    out = {k.lower(): v for k, v in (result.get("headers") or {}).items()}
    for k, values in (result.get("multiValueHeaders") or {}).items():
        out[k.lower()] = values[-1]
    return out


def invoke(
    handler: Any, event: dict[str, Any], context: Context
) -> tuple[int, Any, dict[str, str]]:
    result = handler(event, context)
    assert result["isBase64Encoded"] is False
    return result["statusCode"], json.loads(result["body"]), response_headers(result)


@pytest.fixture(scope="module")
def fake() -> FakeEngine:
    return bge_m3_like()


@pytest.fixture(scope="module")
def lambda_handler(fake: FakeEngine) -> Iterator[Mangum]:
    with pytest.MonkeyPatch.context() as patch:
        yield serving(patch, make_app(fake))


def serving(patch: pytest.MonkeyPatch, app: Any) -> Mangum:
    """The entry point's own handler, wrapping `app` for the test's duration."""
    patch.setattr(entry.handler, "app", app)
    return entry.handler


ROUTES: list[tuple[str, str, dict[str, Any] | None]] = [
    ("POST", "/v1/embeddings", {"model": "bge-m3", "input": ["hello lambda", "x"]}),
    (
        "POST",
        V2,
        {"model": {"model_name": "bge-m3"}, "data": [{"data_type": "text", "text": "hi"}]},
    ),
    ("POST", "/embeddings", {"input": "hello lambda", "input_type": {"colbert": True}}),
    ("POST", "/score", {"sentences_1": ["a b"], "sentences_2": ["a c"]}),
    ("GET", "/health", None),
    ("GET", "/v1/models", None),
]


@pytest.mark.parametrize("event_name", GOOD_EVENTS)
@pytest.mark.parametrize(("method", "path", "body"), ROUTES, ids=[f"{m} {p}" for m, p, _ in ROUTES])
def test_captured_events_reach_every_route(
    lambda_handler: Mangum,
    fake: FakeEngine,
    event_name: str,
    method: str,
    path: str,
    body: dict[str, Any] | None,
) -> None:
    context = Context(aws_request_id=f"req-{event_name}-{path}")
    event = with_request(load_event(event_name), method, path, body)
    status, payload, headers = invoke(lambda_handler, event, context)
    assert status == 200, payload
    # The Lambda request id is the request id: header, v2 body, log line.
    assert headers["x-request-id"] == context.aws_request_id
    assert headers["content-type"] == "application/json"
    if path == "/v1/embeddings":
        np.testing.assert_array_equal(
            np.array(payload["data"][0]["embedding"], dtype=np.float32),
            fake.expected_dense("hello lambda"),
        )
    elif path == V2:
        assert payload["code"] == 0 and payload["request_id"] == context.aws_request_id
    elif path == "/embeddings":
        assert {"dense_vecs", "sparse_vecs", "colbert_vecs"} <= set(payload)
    elif path == "/score":
        assert "colbert+sparse+dense" in payload
    elif path == "/health":
        assert payload["status"] == "healthy"
    else:
        assert payload["data"][0]["id"] == "bge-m3"


@pytest.mark.parametrize("event_name", GOOD_EVENTS)
def test_response_header_style_follows_the_event(lambda_handler: Mangum, event_name: str) -> None:
    event = load_event(event_name)
    result = lambda_handler(with_request(event, "GET", "/health", None), Context())
    if "elb" in event["requestContext"]:
        # ALB answers in the style it was asked in: multiValueHeaders iff the event had them.
        assert ("multiValueHeaders" in result) == ("multiValueHeaders" in event)
        assert ("headers" in result) != ("multiValueHeaders" in event)
    elif event.get("version") == "2.0":
        assert "headers" in result and "multiValueHeaders" not in result
    else:
        assert "headers" in result and "multiValueHeaders" in result


@pytest.mark.parametrize(
    ("method", "path", "check"),
    [
        ("POST", "/v1/embeddings", lambda p: p["error"]["code"] == "invalid_base64_body"),
        ("POST", V2, lambda p: p["code"] == 1000003 and "base64" in p["message"]),
        ("POST", "/embeddings", lambda p: p["error"]["type"] == "invalid_request_error"),
        ("GET", "/health", lambda p: "base64" in p["error"]["message"]),
    ],
)
def test_body_that_is_not_base64_is_400_not_500(
    lambda_handler: Mangum, method: str, path: str, check: Any
) -> None:
    # GIVEN the captured event whose body says base64 but is "Hello from Lambda!"
    event = with_request(load_event(BAD_BASE64), method, path, None)
    assert event["isBase64Encoded"] is True and event["body"] == "Hello from Lambda!"
    # THEN plain Mangum raises binascii.Error; ours answers 400 in the dialect's envelope
    status, payload, headers = invoke(lambda_handler, event, Context(aws_request_id="bad-b64"))
    assert status == 400 and check(payload), payload
    assert headers["x-request-id"] == "bad-b64"


def test_plain_mangum_would_have_crashed_on_that_event() -> None:
    import binascii

    plain = Mangum(make_app(), lifespan="off")
    event = with_request(load_event(BAD_BASE64), "GET", "/health", None)
    with pytest.raises(binascii.Error):
        plain(event, Context())


@pytest.mark.parametrize("event_name", GOOD_EVENTS)
def test_api_key_through_every_event_source(
    monkeypatch: pytest.MonkeyPatch, event_name: str
) -> None:
    handler = serving(monkeypatch, make_app(api_key="lambda-key"))
    body = {"model": "bge-m3", "input": "x"}
    event = load_event(event_name)
    status, payload, _ = invoke(
        handler, with_request(event, "POST", "/v1/embeddings", body), Context()
    )
    assert status == 401 and payload["error"]["code"] == "missing_api_key"
    authorized = with_request(
        event, "POST", "/v1/embeddings", body, {"authorization": "Bearer lambda-key"}
    )
    status, payload, _ = invoke(handler, authorized, Context())
    assert status == 200, payload


def test_response_over_lambdas_limit_is_413_not_an_opaque_502(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    handler = serving(monkeypatch, make_app(max_response_bytes=6000))
    texts = [f"word{i} other{i}" for i in range(40)]
    body = {
        "model": {"model_name": "bge-m3"},
        "data": [{"data_type": "text", "text": t} for t in texts],
    }
    event = with_request(load_event("http_api_v2_post_json_powertools.json"), "POST", V2, body)
    status, payload, _ = invoke(handler, event, Context())
    assert status == 413 and payload["code"] == 1000003
    assert "base64" in payload["message"] and "fewer inputs" in payload["message"]


# ---- the entry point -----------------------------------------------------------------------------


def test_entry_point_loads_the_model_once_across_invocations(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import handler.engine as engine_pkg

    loads: list[tuple[list[Path], Any]] = []
    served = bge_m3_like()

    def counting_load_registry(paths: list[Path], config: Any) -> Any:
        loads.append((list(paths), config))
        return registry(served)

    monkeypatch.setattr(engine_pkg, "load_registry", counting_load_registry)
    monkeypatch.setenv("MODEL_PATH", str(tmp_path / "bge-m3-int8"))
    monkeypatch.setenv("MODEL_VERIFY", "size")
    monkeypatch.delenv("API_KEY", raising=False)
    # A fresh import, as in a new container: handler.main builds the app (and loads) at import.
    for name in ("handler.lambda_function", "handler.main"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    import handler.lambda_function as entry

    assert len(loads) == 1
    assert loads[0][0] == [tmp_path / "bge-m3-int8"]
    assert loads[0][1].verify == "size" and loads[0][1].device == "cpu"

    routes = [r for r in ROUTES if r[0] == "POST"]
    for i in range(25):
        method, path, body = routes[i % len(routes)]
        event = with_request(load_event(GOOD_EVENTS[i % len(GOOD_EVENTS)]), method, path, body)
        status, payload, _ = invoke(entry.handler, event, Context(aws_request_id=f"r{i}"))
        assert status == 200, payload
    assert len(loads) == 1


def test_model_routes_keep_their_thread_from_one_invocation_to_the_next(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Mangum runs every invocation as a task of its own, and anyio's worker threads end with
    the task that started them; the model routes run on the service's threads instead, which
    outlive the invocations (a new thread per invocation, onnxruntime included, cost
    milliseconds: docs/overhead.md). Which of the pool's threads takes a call is the pool's
    business: one just done may not yet count as idle when the next call comes."""
    fake = bge_m3_like()
    seen: list[threading.Thread] = []
    encode = fake.encode

    def recording_encode(texts: Any, **options: Any) -> Any:
        seen.append(threading.current_thread())
        return encode(texts, **options)

    monkeypatch.setattr(fake, "encode", recording_encode)
    handler = serving(monkeypatch, make_app(fake))
    embedding_routes = [r for r in ROUTES if r[0] == "POST" and r[1] != "/score"]
    captured = load_event("http_api_v2_post_json_powertools.json")
    for i in range(2 * len(embedding_routes)):
        method, path, body = embedding_routes[i % len(embedding_routes)]
        event = with_request(captured, method, path, body)
        status, payload, _ = invoke(handler, event, Context(aws_request_id=f"r{i}"))
        assert status == 200, payload
    assert len(seen) == 2 * len(embedding_routes)
    for thread in seen:
        assert thread.name.startswith("model-call") and thread.is_alive(), thread


def test_routes_that_read_the_process_state_start_no_thread_per_invocation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Health, readiness, liveness, the service description and the model lists only read the
    process's own state: they run on the event loop. As plain functions they ran on an anyio
    worker thread, which under Mangum is started and ended by every invocation (GET /health
    through the entry point, full-size model: 0.78 ms p50 that way, 0.19 ms on the loop)."""
    handler = serving(monkeypatch, make_app(bge_m3_like()))
    captured = load_event("http_api_v2_post_json_powertools.json")
    started: list[str] = []
    start = threading.Thread.start

    def recording_start(thread: threading.Thread) -> None:
        started.append(thread.name)
        start(thread)

    monkeypatch.setattr(threading.Thread, "start", recording_start)
    paths = ["/health", "/health/live", "/health/ready", "/", "/v1/models", "/v1/models/bge-m3"]
    paths += ["/models", "/models/bge-m3"]
    for i, path in enumerate(paths * 2):
        event = with_request(captured, "GET", path, None)
        status, payload, _ = invoke(handler, event, Context(aws_request_id=f"r{i}"))
        assert status == 200, (path, payload)
    assert started == []


def test_a_load_in_progress_is_joined_not_repeated(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """handler.main starts loading in a thread, then build_app() asks for the same models: the
    second caller must wait for the first load, not start another."""
    import threading

    import handler.engine as engine_pkg
    import handler.main as main
    from handler.settings import Settings

    started, release = threading.Event(), threading.Event()
    loads: list[list[Path]] = []
    served = bge_m3_like()

    def slow_load_registry(paths: list[Path], config: Any) -> Any:
        loads.append(list(paths))
        started.set()
        assert release.wait(60)
        return registry(served)

    monkeypatch.setattr(engine_pkg, "load_registry", slow_load_registry)
    settings = Settings(model_path=str(tmp_path / "fresh-model"), model_verify="size")
    loader = main.start_loading(settings)
    assert started.wait(60)  # the loader thread is inside the load now
    answers: list[Any] = []
    second = threading.Thread(target=lambda: answers.append(main.load_models(settings)))
    second.start()
    # Give it the chance to reach the loader (it cannot finish before release: correct code
    # blocks on the load in progress, broken code in a second slow load).
    second.join(0.5)
    assert second.is_alive()
    release.set()
    second.join(60)
    loader.join(60)
    assert len(loads) == 1
    assert answers and answers[0][0] is not None and answers[0][1] is None


def test_api_keys_are_read_while_the_model_loads(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """With a secret configured, reading the keys (boto3's import and a network call) overlaps the
    model load instead of following it: the load here only finishes once the keys were read."""
    import threading

    import handler.auth as auth
    import handler.engine as engine_pkg
    import handler.main as main
    from handler.settings import Settings

    keys_read = threading.Event()
    order: list[str] = []

    def load_registry_waiting_for_keys(paths: list[Path], config: Any) -> Any:
        order.append("load started")
        # Correct code reads the keys meanwhile; broken code would wait here for nothing.
        order.append("load saw the keys" if keys_read.wait(30) else "load timed out")
        return registry(bge_m3_like())

    def resolve_api_keys(settings: Settings) -> tuple[str, ...]:
        order.append("keys read")
        keys_read.set()
        return ("secret-key",)

    monkeypatch.setattr(engine_pkg, "load_registry", load_registry_waiting_for_keys)
    monkeypatch.setattr(auth, "resolve_api_keys", resolve_api_keys)
    settings = Settings(model_path=str(tmp_path / "keyed-model"), model_verify="size")
    main.start_loading(settings)
    app = main.build_app(settings)

    assert "load saw the keys" in order and "load timed out" not in order
    handler = serving(monkeypatch, app)
    event = load_event("function_url_get_powertools.json")
    body = {"model": "bge-m3", "input": "x"}
    status, _, _ = invoke(handler, with_request(event, "POST", "/v1/embeddings", body), Context())
    assert status == 401
    authorized = with_request(
        event, "POST", "/v1/embeddings", body, {"authorization": "Bearer secret-key"}
    )
    status, payload, _ = invoke(handler, authorized, Context())
    assert status == 200, payload


def test_the_metrics_backend_is_built_while_the_model_loads(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Importing the metrics library (prometheus-client) overlaps the model load instead of
    following it: the load only finishes once it is built."""
    import threading

    import handler.engine as engine_pkg
    import handler.main as main
    import handler.metrics as metrics
    from handler.settings import Settings

    built = threading.Event()
    order: list[str] = []
    real_metrics_for = metrics.metrics_for

    def load_registry_waiting_for_metrics(paths: list[Path], config: Any) -> Any:
        order.append("load saw the metrics" if built.wait(30) else "load timed out")
        return registry(bge_m3_like())

    def metrics_for(settings: Settings) -> Any:
        backend = real_metrics_for(settings)
        built.set()
        return backend

    monkeypatch.setattr(engine_pkg, "load_registry", load_registry_waiting_for_metrics)
    monkeypatch.setattr(metrics, "metrics_for", metrics_for)
    settings = Settings(model_path=str(tmp_path / "metered-model"), model_verify="size")
    main.start_loading(settings)
    app = main.build_app(settings)

    assert order == ["load saw the metrics"]
    assert isinstance(app.state.metrics, metrics.PrometheusMetrics)


def test_importing_the_entry_point_starts_the_load_before_the_web_framework(
    tiny_int8: Path,
) -> None:
    """In a fresh interpreter, as Lambda starts one: the model-load thread starts before FastAPI
    and Mangum are imported (their imports then overlap the load), with the engine's imports
    already done (so the thread goes straight to the session and the tokenizer), and the
    entry point then answers."""
    code = """
import importlib.abc, json, sys, threading

events = []

class Watch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name in ("fastapi", "mangum") and name not in events:
            events.append(name)
        return None

sys.meta_path.insert(0, Watch())
real_start = threading.Thread.start

def start(self):
    if self.name == "model-load":
        imported = "handler.engine.engine" in sys.modules
        events.extend(["model-load", "engine imported" if imported else "engine not imported"])
    real_start(self)

threading.Thread.start = start
import handler.lambda_function as entry

class Context:
    aws_request_id = "fresh-process"

event = json.loads(open(sys.argv[1], encoding="utf-8-sig").read())
event["requestContext"]["http"]["method"] = "POST"
event["requestContext"]["http"]["path"] = event["rawPath"] = "/v1/embeddings"
event["body"] = json.dumps({"model": "bge-m3", "input": "hello"})
print(json.dumps({"events": events, "status": entry.handler(event, Context())["statusCode"]}))
"""
    env = {
        "MODEL_PATH": str(tiny_int8),
        "MODEL_VERIFY": "size",
        "LOG_LEVEL": "WARNING",
        "PATH": "/usr/bin:/bin",
    }
    proc = subprocess.run(
        [sys.executable, "-c", code, str(EVENTS_DIR / "function_url_get_powertools.json")],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["events"] == ["model-load", "engine imported", "fastapi", "mangum"]
    assert result["status"] == 200


def test_entry_point_starts_and_reports_when_loading_fails(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # GIVEN a MODEL_PATH that is not a model directory, and the real loader
    monkeypatch.setenv("MODEL_PATH", str(tmp_path / "missing"))
    for name in ("handler.lambda_function", "handler.main"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    import handler.lambda_function as entry

    event = load_event("function_url_get_powertools.json")
    status, payload, _ = invoke(
        entry.handler, with_request(event, "GET", "/health", None), Context()
    )
    assert status == 503 and payload["model_loaded"] is False
    assert "manifest.json" in payload["error"]
    status, payload, _ = invoke(
        entry.handler,
        with_request(event, "POST", "/v1/embeddings", {"model": "bge-m3", "input": "x"}),
        Context(),
    )
    assert status == 503 and payload["error"]["code"] == "model_not_loaded"


def test_log_line_carries_the_lambda_request_id(lambda_handler: Mangum) -> None:
    lines: list[dict[str, Any]] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.payload)  # type: ignore[attr-defined]

    logger = logging.getLogger(request_logging.REQUEST_LOGGER)
    capture = Capture()
    logger.addHandler(capture)
    try:
        event = with_request(
            load_event("rest_v1_post_json_real_capture_aws_lambda_dotnet.json"),
            "POST",
            "/v1/embeddings",
            {"model": "bge-m3", "input": "x y"},
        )
        invoke(lambda_handler, event, Context(aws_request_id="93432dd3-lambda"))
    finally:
        logger.removeHandler(capture)
    (line,) = lines
    assert line["request_id"] == "93432dd3-lambda"
    assert line["route"] == "/v1/embeddings" and line["tokens"] == 4
