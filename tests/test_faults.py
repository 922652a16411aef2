"""Faults, each through the path production takes: a damaged or missing model file at start
(`handler.main.build_app`, the app uvicorn and Lambda serve), onnxruntime failing inside a request,
a key source that cannot be read (moto's Secrets Manager), and a micro-batch pass that fails for
every request merged into it. In each case the service answers in the dialect's envelope, says why
on /health/ready, and keeps serving what it can."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from fakes import LiveServer, settings
from fastapi.testclient import TestClient
from onnxruntime.capi.onnxruntime_pybind11_state import RuntimeException

from handler.app import create_app
from handler.engine import Engine, EngineConfig, ModelRegistry, micro_batched
from handler.engine.manifest import MANIFEST_NAME
from handler.engine.microbatch import MicroBatcher
from handler.main import build_app

HANG_GUARD_S = 60
V2 = "/api/data/embedding/version/2"
V2_SERVER_ERROR = 1000028
OPENAI = ("POST", "/v1/embeddings", {"input": "hello"})
V2_REQUEST = (
    "POST",
    V2,
    {"model": {"model_name": "bge-m3"}, "data": [{"data_type": "text", "text": "hello"}]},
)
NATIVE = ("POST", "/embeddings", {"input": "hello"})
# Every route that needs the model or the keys, with a valid request.
ROUTES: list[tuple[str, str, dict[str, Any] | None]] = [
    OPENAI,
    V2_REQUEST,
    NATIVE,
    ("POST", "/score", {"sentences_1": ["a"], "sentences_2": ["b"]}),
    ("GET", "/v1/models", None),
    ("GET", "/models", None),
    ("GET", "/models/bge-m3", None),
]


def wait_until(condition: Callable[[], bool]) -> None:
    """Readiness poll, bounded; no verdict depends on how long it took."""
    deadline = time.monotonic() + HANG_GUARD_S
    while not condition():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.005)


def envelope_code(path: str, body: dict[str, Any]) -> Any:
    return body["code"] if path.startswith(V2) else body["error"]["code"]


def assert_all_routes_503(client: TestClient, expected_code: str, headers: Any = None) -> None:
    for method, path, body in ROUTES:
        r = client.request(method, path, json=body, headers=headers)
        assert r.status_code == 503, (path, r.text)
        code = envelope_code(path, r.json())
        assert code == (V2_SERVER_ERROR if path.startswith(V2) else expected_code), path


# ---- the model at start --------------------------------------------------------------------------


def damaged_copy(source: Path, tmp: Path, damage: Callable[[Path], None]) -> Path:
    target = tmp / "model"
    shutil.copytree(source, target)
    damage(target)
    return target


def flip_bytes(model_dir: Path) -> None:
    onnx = next(p for p in model_dir.iterdir() if p.suffix == ".onnx")
    data = bytearray(onnx.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    onnx.write_bytes(bytes(data))


def remove_onnx(model_dir: Path) -> None:
    for p in model_dir.iterdir():
        if p.suffix == ".onnx":
            p.unlink()


@pytest.mark.parametrize(
    ("damage", "reason"),
    [(flip_bytes, "sha256"), (remove_onnx, "")],
    ids=["corrupted", "missing"],
)
def test_a_damaged_model_at_start_makes_every_route_503_with_the_reason(
    tiny_fp32: Path, tmp_path: Path, damage: Callable[[Path], None], reason: str
) -> None:
    assert (tiny_fp32 / MANIFEST_NAME).is_file()
    model = damaged_copy(tiny_fp32, tmp_path, damage)
    app = build_app(settings(model_path=str(model), warmup=False))
    client = TestClient(app)
    ready = client.get("/health/ready")
    assert ready.status_code == 503
    error = ready.json()["error"]
    assert "model not loaded" in error and reason in error
    assert client.get("/health/live").status_code == 200
    assert_all_routes_503(client, "model_not_loaded")


def test_an_unreadable_key_source_fails_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    from fakes import bge_m3_like
    from moto import mock_aws

    from handler.engine.types import ModelRegistry as Registry

    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    arn = "arn:aws:secretsmanager:us-east-1:123456789012:secret:absent-AbCdEf"
    with mock_aws():
        app = create_app(settings(api_key_secret_arn=arn), Registry([bge_m3_like()]))
    client = TestClient(app)
    ready = client.get("/health/ready")
    assert ready.status_code == 503 and "ResourceNotFoundException" in ready.json()["error"]
    # No key works, and no request is served without one.
    assert_all_routes_503(client, "auth_unavailable")
    assert_all_routes_503(client, "auth_unavailable", headers={"Authorization": "Bearer x"})


# ---- onnxruntime failing inside a request --------------------------------------------------------


class FailingOnce:
    """The real session, whose next run raises what onnxruntime raises when a kernel fails."""

    def __init__(self, session: Any):
        self._session = session
        self.fail_next = True

    def run(self, *args: Any, **kwargs: Any) -> Any:
        if self.fail_next:
            self.fail_next = False
            raise RuntimeException("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : injected")
        return self._session.run(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)


@pytest.fixture(scope="module")
def engine(tiny_fp32: Path) -> Engine:
    return Engine.load(tiny_fp32, EngineConfig(threads=1))


@pytest.mark.parametrize("batched", [False, True], ids=["direct", "micro-batched"])
@pytest.mark.parametrize(
    ("method", "path", "body"), [OPENAI, V2_REQUEST, NATIVE], ids=["openai", "v2", "native"]
)
def test_a_session_failing_mid_request_is_a_500_and_the_next_request_succeeds(
    engine: Engine,
    monkeypatch: pytest.MonkeyPatch,
    batched: bool,
    method: str,
    path: str,
    body: dict[str, Any],
) -> None:
    monkeypatch.setattr(engine, "session", FailingOnce(engine.session))
    served = ModelRegistry([engine])
    if batched:
        served = micro_batched(served)
    client = TestClient(create_app(settings(), served))
    failed = client.request(method, path, json=body)
    assert failed.status_code == 500
    code = envelope_code(path, failed.json())
    assert code == (V2_SERVER_ERROR if path == V2 else "internal_error")
    assert client.request(method, path, json=body).status_code == 200
    if batched:
        batcher = served.default
        assert isinstance(batcher, MicroBatcher)
        batcher.close(timeout=HANG_GUARD_S)


# ---- a micro-batch pass failing ------------------------------------------------------------------


class FailSecondPass:
    """Holds the first pass until released, then makes the second (the merged one) fail."""

    def __init__(self, engine: Engine):
        self.run_ids = engine.run_ids
        self.entered = threading.Event()
        self.release = threading.Event()
        self.passes = 0

    def __call__(self, ids: list[list[int]], *heads: bool, tokenize_ms: float = 0.0) -> Any:
        self.passes += 1
        if self.passes == 1:
            self.entered.set()
            assert self.release.wait(HANG_GUARD_S)
        if self.passes == 2:
            raise RuntimeException("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : injected")
        return self.run_ids(ids, *heads, tokenize_ms=tokenize_ms)


@pytest.fixture
def failing_batcher(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[MicroBatcher, FailSecondPass]]:
    gate = FailSecondPass(engine)
    monkeypatch.setattr(engine, "run_ids", gate)
    batcher = micro_batched(ModelRegistry([engine])).default
    assert isinstance(batcher, MicroBatcher)
    yield batcher, gate
    gate.release.set()
    batcher.close(timeout=HANG_GUARD_S)


def test_a_failing_pass_fails_every_request_in_it_and_the_worker_keeps_serving(
    failing_batcher: tuple[MicroBatcher, FailSecondPass],
) -> None:
    batcher, gate = failing_batcher
    merged = [OPENAI, V2_REQUEST, NATIVE]
    with LiveServer(create_app(settings(), ModelRegistry([batcher]))) as server:
        post = lambda path, body: httpx.post(server.url + path, json=body, timeout=HANG_GUARD_S)  # noqa: E731
        with ThreadPoolExecutor(len(merged) + 1) as pool:
            first = pool.submit(post, "/embeddings", {"input": "first"})
            assert gate.entered.wait(HANG_GUARD_S)
            futures = [pool.submit(post, path, body) for _, path, body in merged]
            wait_until(lambda: batcher.queued == len(merged))
            gate.release.set()
            assert first.result().status_code == 200
            for (_, path, _), future in zip(merged, futures, strict=True):
                r = future.result()
                assert r.status_code == 500, r.text
                assert envelope_code(path, r.json()) == (
                    V2_SERVER_ERROR if path == V2 else "internal_error"
                )
        assert gate.passes == 2  # the three were one pass, and it failed
        after = post("/v1/embeddings", {"input": "after"})
        assert after.status_code == 200 and gate.passes == 3
