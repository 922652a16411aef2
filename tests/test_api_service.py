"""Cross-cutting behaviour on the fake engines: auth per dialect, limits (body and response size,
in-flight requests), the per-request JSON log line and timing headers, ROUTE_PREFIX, unexpected
errors, and settings (env parsing, API keys from Secrets Manager / SSM via moto)."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fakes import LiveServer, bge_m3_like, make_app, settings
from fastapi.testclient import TestClient
from pydantic import ValidationError

import handler.logging as request_logging
from handler.app import create_app
from handler.middleware import carried_size
from handler.settings import (
    CLOUD_RUN_RESPONSE_LIMIT,
    LAMBDA_RESPONSE_LIMIT,
    Settings,
    resolve_api_keys,
)

V2 = "/api/data/embedding/version/2"
V2_BODY = {"model": {"model_name": "bge-m3"}, "data": [{"data_type": "text", "text": "a"}]}
OPENAI_BODY = {"model": "bge-m3", "input": "a"}


# ---- auth ----------------------------------------------------------------------------------------


@pytest.fixture
def secured() -> TestClient:
    return TestClient(make_app(api_key="key-one, key-two"))


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Basic a2V5LW9uZQ=="},
        {"Authorization": "Bearer"},
        {"Authorization": "key-one"},
    ],
)
def test_401_in_each_dialects_envelope(secured: TestClient, headers: dict[str, str]) -> None:
    r = secured.post("/v1/embeddings", json=OPENAI_BODY, headers=headers)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["code"] in {"invalid_api_key", "missing_api_key"}
    assert set(error) == {"message", "type", "param", "code"}

    r = secured.post(V2, json=V2_BODY, headers=headers)
    assert r.status_code == 401 and r.json()["code"] == 1000001
    assert set(r.json()) == {"code", "message", "request_id"}

    for method, path, body in (
        ("POST", "/embeddings", {"input": "a"}),
        ("POST", "/score", {"sentences_1": "a", "sentences_2": "b"}),
        ("GET", "/models", None),
        ("GET", "/models/bge-m3", None),
        ("GET", "/v1/models", None),
    ):
        r = secured.request(method, path, json=body, headers=headers)
        assert r.status_code == 401, (path, r.text)
        assert set(r.json()) == {"error"}


def test_every_configured_key_is_accepted(secured: TestClient) -> None:
    for key in ("key-one", "key-two"):
        r = secured.post(
            "/v1/embeddings", json=OPENAI_BODY, headers={"Authorization": f"bearer {key}"}
        )
        assert r.status_code == 200, r.text


def test_auth_is_checked_before_the_body(secured: TestClient) -> None:
    r = secured.post("/v1/embeddings", content=b"{broken")
    assert r.status_code == 401


def test_health_root_and_docs_are_public(secured: TestClient) -> None:
    assert secured.get("/health").status_code == 200
    assert secured.get("/").status_code == 200
    assert secured.get("/openapi.json").status_code == 200


def test_keys_never_appear_in_logs(caplog: pytest.LogCaptureFixture) -> None:
    lines: list[str] = []
    handler = _Capture(lines)
    logger = logging.getLogger(request_logging.REQUEST_LOGGER)
    logger.addHandler(handler)
    caplog.set_level(logging.DEBUG)
    try:
        app = TestClient(make_app(api_key="super-secret-key-123"))
        app.post("/v1/embeddings", json=OPENAI_BODY, headers={"Authorization": "Bearer nope-456"})
        app.post(
            "/v1/embeddings",
            json=OPENAI_BODY,
            headers={"Authorization": "Bearer super-secret-key-123"},
        )
    finally:
        logger.removeHandler(handler)
    everything = "\n".join(lines) + caplog.text
    assert len(lines) == 2
    assert "super-secret-key-123" not in everything and "nope-456" not in everything


def test_unreadable_key_source_fails_closed(aws: None) -> None:
    app = TestClient(
        create_app(
            settings(api_key_ssm_parameter="/no/such/parameter"),
            make_app().state.service.registry,
        )
    )
    # The parameter does not exist, so resolving fails: protected routes 503, never open.
    r = app.post("/v1/embeddings", json=OPENAI_BODY)
    assert r.status_code == 503 and r.json()["error"]["code"] == "auth_unavailable"
    health = app.get("/health")
    assert health.status_code == 503 and "API key unavailable" in health.json()["error"]


# ---- API keys from AWS ---------------------------------------------------------------------------


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    from moto import mock_aws

    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    with mock_aws():
        yield


@pytest.mark.parametrize(
    ("secret", "expected"),
    [
        ("k1", ("k1",)),
        ("k1,k2", ("k1", "k2")),
        ('{"API_KEY": "k1,k2"}', ("k1", "k2")),
        ('["k1", "k2"]', ("k1", "k2")),
    ],
)
def test_keys_from_secrets_manager(aws: None, secret: str, expected: tuple[str, ...]) -> None:
    import boto3

    arn = boto3.client("secretsmanager").create_secret(Name="api-key", SecretString=secret)["ARN"]
    assert resolve_api_keys(settings(api_key_secret_arn=arn)) == expected


def test_keys_from_ssm_securestring(aws: None) -> None:
    import boto3

    boto3.client("ssm").put_parameter(Name="/bge/api-key", Value="s1,s2", Type="SecureString")
    s = settings(api_key_ssm_parameter="/bge/api-key")
    assert resolve_api_keys(s) == ("s1", "s2")
    app = TestClient(create_app(s, make_app().state.service.registry))
    assert app.post("/v1/embeddings", json=OPENAI_BODY).status_code == 401
    ok = app.post("/v1/embeddings", json=OPENAI_BODY, headers={"Authorization": "Bearer s2"})
    assert ok.status_code == 200


def test_missing_secret_error_names_the_variable_not_a_key(aws: None) -> None:
    with pytest.raises(RuntimeError, match="API_KEY_SECRET_ARN") as info:
        resolve_api_keys(settings(api_key_secret_arn="arn:aws:secretsmanager:us-east-1:1:secret:x"))
    assert "ResourceNotFoundException" in str(info.value)


# ---- settings ------------------------------------------------------------------------------------


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {
        "MODEL_PATH": "/opt/models/bge-m3, /opt/models/minilm",
        "API_KEY": "a,b",
        "ROUTE_PREFIX": "embed/",
        "PORT": "9000",
        "DEVICE": "CUDA",
        "ALLOW_ANY_MODEL": "true",
        "ALLOW_TOKEN_IDS": "1",
        "MAX_INPUTS_V2": "50",
        "MAX_RESPONSE_BYTES": "",
        "THREADS": "",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    s = Settings()
    assert [str(p) for p in s.model_paths] == ["/opt/models/bge-m3", "/opt/models/minilm"]
    assert s.route_prefix == "/embed" and s.port == 9000 and s.device == "cuda"
    assert s.allow_any_model and s.allow_token_ids and s.max_inputs_v2 == 50
    assert s.max_response_bytes is None and s.threads is None
    assert resolve_api_keys(s) == ("a", "b")
    assert "a,b" not in repr(s)  # API_KEY is a SecretStr


@pytest.mark.parametrize(
    "bad",
    [
        {"DEVICE": "tpu"},
        {"PORT": "http"},
        {"MAX_INPUTS_OPENAI": "0"},
        {"API_KEY": "k", "API_KEY_SSM_PARAMETER": "/p"},
        {"API_KEY": " , "},
        {"MODEL_VERIFY": "md5"},
    ],
)
def test_bad_settings_fail_at_start(monkeypatch: pytest.MonkeyPatch, bad: dict[str, str]) -> None:
    for name, value in bad.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError):
        Settings()


def test_empty_api_key_means_auth_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("API_KEY", "")
    assert Settings().api_key is None


def test_response_limit_defaults_per_platform(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_LAMBDA_FUNCTION_NAME", "K_SERVICE", "MAX_RESPONSE_BYTES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_LAMBDA_FUNCTION_NAME", "f")
    assert Settings().response_limit == LAMBDA_RESPONSE_LIMIT
    monkeypatch.delenv("AWS_LAMBDA_FUNCTION_NAME")
    monkeypatch.setenv("K_SERVICE", "svc")
    assert Settings().response_limit == CLOUD_RUN_RESPONSE_LIMIT
    monkeypatch.delenv("K_SERVICE")
    assert Settings().response_limit == 0


# ---- ROUTE_PREFIX --------------------------------------------------------------------------------


def test_route_prefix_applies_to_every_route() -> None:
    app = TestClient(make_app(route_prefix="/embed"))
    assert app.post("/embed/v1/embeddings", json=OPENAI_BODY).status_code == 200
    assert app.post(f"/embed{V2}", json=V2_BODY).json()["code"] == 0
    assert app.get("/embed/health").status_code == 200
    assert app.get("/embed/docs").status_code == 200
    r = app.post("/v1/embeddings", json=OPENAI_BODY)
    assert r.status_code == 404
    r = app.post("/embed/v1/nope", json={})
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_url"


# ---- request and response size -------------------------------------------------------------------


def test_request_body_over_the_limit_is_413_in_each_envelope() -> None:
    app = TestClient(make_app(max_request_bytes=1024))
    big = " ".join(["word"] * 400)
    r = app.post("/v1/embeddings", json={"model": "bge-m3", "input": big})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = app.post(V2, json={**V2_BODY, "data": [{"data_type": "text", "text": big}]})
    assert r.status_code == 413 and r.json()["code"] == 1000003
    r = app.post("/embeddings", json={"input": big})
    assert r.status_code == 413 and "MAX_REQUEST_BYTES" in r.json()["error"]["message"]


def test_request_body_without_content_length_is_counted() -> None:
    # GIVEN a chunked upload (no Content-Length) WHEN it exceeds the limit THEN 413 all the same
    big = json.dumps({"model": "bge-m3", "input": " ".join(["word"] * 400)}).encode()

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(big), 256):
            yield big[i : i + 256]

    with LiveServer(make_app(max_request_bytes=1024)) as server:
        r = httpx.post(f"{server.url}/v1/embeddings", content=chunks())
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "request_too_large"


def test_response_over_the_limit_is_413_with_a_hint() -> None:
    app = TestClient(make_app(max_response_bytes=3000))
    texts = [f"text {i}" for i in range(20)]
    r = app.post("/v1/embeddings", json={"model": "bge-m3", "input": texts})
    assert r.status_code == 413
    error = r.json()["error"]
    assert error["code"] == "response_too_large"
    assert "base64" in error["message"] and "fewer inputs" in error["message"]
    assert "ColBERT" in error["message"]
    r = app.post(V2, json={**V2_BODY, "data": [{"data_type": "text", "text": t} for t in texts]})
    assert r.status_code == 413 and r.json()["code"] == 1000003
    # The same request fits in base64 when the inputs are fewer.
    r = app.post(
        "/v1/embeddings",
        json={"model": "bge-m3", "input": texts[:10], "encoding_format": "base64"},
    )
    assert r.status_code == 200


def test_lambda_measures_the_escaped_body() -> None:
    plain = b'{"a":1}'
    assert carried_size(plain, on_lambda=False) == len(plain)
    quoted = json.dumps({"sparse": {f"k{i}": 0.5 for i in range(100)}}).encode()
    cjk = json.dumps({"sparse": {"如何使用": 0.5}}, ensure_ascii=False).encode()
    assert carried_size(quoted, on_lambda=True) - 4096 > len(quoted)  # every quote escaped
    assert carried_size(cjk, on_lambda=True) - 4096 > len(cjk)  # \uXXXX for each CJK char


# ---- in-flight limit -----------------------------------------------------------------------------


def test_over_the_in_flight_limit_is_429_with_retry_after() -> None:
    gate = threading.Event()
    fake = bge_m3_like(gate=gate)
    app = make_app(fake, max_concurrent_requests=1, retry_after_seconds=3)
    results: dict[str, httpx.Response] = {}
    with LiveServer(app) as server:
        first = threading.Thread(
            target=lambda: results.setdefault(
                "first", httpx.post(f"{server.url}/v1/embeddings", json=OPENAI_BODY, timeout=60)
            )
        )
        first.start()
        try:
            # WHEN one request is inside the engine (the gate holds it there)
            assert fake.entered.wait(timeout=30)
            # THEN the next is refused at once, in its dialect's envelope, not queued
            r = httpx.post(f"{server.url}/v1/embeddings", json=OPENAI_BODY, timeout=60)
            assert r.status_code == 429 and r.headers["retry-after"] == "3"
            assert r.json()["error"]["type"] == "rate_limit_error"
            r = httpx.post(f"{server.url}{V2}", json=V2_BODY, timeout=60)
            assert r.status_code == 429 and r.json()["code"] == 1000029
            # cheap routes are not counted
            assert httpx.get(f"{server.url}/health", timeout=60).status_code == 200
        finally:
            gate.set()
            first.join(timeout=60)
        assert results["first"].status_code == 200
        # and once it finished, the slot is free again
        assert httpx.post(f"{server.url}/v1/embeddings", json=OPENAI_BODY).status_code == 200


# ---- logs and headers ----------------------------------------------------------------------------


class _Capture(logging.Handler):
    def __init__(self, lines: list[str]):
        super().__init__()
        self.lines = lines
        self.setFormatter(request_logging._JsonLineFormatter())

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def log_lines() -> Iterator[list[str]]:
    lines: list[str] = []
    handler = _Capture(lines)
    logger = logging.getLogger(request_logging.REQUEST_LOGGER)
    logger.addHandler(handler)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)


def test_one_json_log_line_per_request(
    log_lines: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(request_logging, "_cold", True)
    app = TestClient(make_app())
    r1 = app.post("/v1/embeddings", json={"model": "bge-m3", "input": ["a b", "c"]})
    r2 = app.post("/v1/embeddings", json={"model": "nope", "input": "x"})
    assert len(log_lines) == 2
    first, second = (json.loads(line) for line in log_lines)
    assert first["request_id"] == r1.headers["x-request-id"]
    assert first["route"] == "/v1/embeddings" and first["model"] == "bge-m3"
    assert first["inputs"] == 2 and first["tokens"] == 7 and first["status"] == 200
    assert set(first["timings_ms"]) == {"tokenize", "infer", "post", "total"}
    assert first["cold_start"] is True and second["cold_start"] is False
    assert first["restore"] is False  # a fresh process, not a SnapStart resume
    assert second["status"] == 404 and second["error_code"] == "model_not_found"
    assert second["request_id"] == r2.headers["x-request-id"]


def test_timing_headers() -> None:
    r = TestClient(make_app()).post("/v1/embeddings", json=OPENAI_BODY)
    for name in ("x-request-id", "x-total-time", "x-tokenize-time", "x-infer-time", "x-post-time"):
        assert name in r.headers, name
    assert float(r.headers["x-infer-time"]) == 2.0
    assert float(r.headers["x-total-time"]) >= 0


# ---- unexpected errors ---------------------------------------------------------------------------


class _Broken:
    def __init__(self, error: Exception):
        self.inner = bge_m3_like()
        self.error = error

    @property
    def info(self) -> Any:
        return self.inner.info

    def encode(self, *args: Any, **kwargs: Any) -> Any:
        raise self.error


def _broken_app(error: Exception) -> TestClient:
    from handler.engine.types import ModelRegistry

    return TestClient(create_app(settings(), ModelRegistry([_Broken(error)])))  # type: ignore[list-item]


def test_unexpected_exception_is_500_in_the_envelope(log_lines: list[str]) -> None:
    app = _broken_app(RuntimeError("boom"))
    r = app.post("/v1/embeddings", json=OPENAI_BODY)
    assert r.status_code == 500
    assert r.json()["error"]["type"] == "server_error" and "boom" not in r.text
    r = app.post(V2, json=V2_BODY)
    assert r.status_code == 500 and r.json()["code"] == 1000028
    assert r.headers["x-request-id"] == r.json()["request_id"]
    assert json.loads(log_lines[-1])["status"] == 500


def test_engine_model_load_error_is_503() -> None:
    from handler.engine.errors import ModelLoadError

    r = _broken_app(ModelLoadError("model.onnx: sha256 mismatch")).post(
        "/v1/embeddings", json=OPENAI_BODY
    )
    assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_loaded"


def test_platform_defaults_come_from_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "HOST",
        "AWS_LAMBDA_FUNCTION_NAME",
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
        "K_SERVICE",
    ):
        monkeypatch.delenv(name, raising=False)
    plain = Settings()
    assert plain.host == "127.0.0.1" and plain.platform == "other" and plain.cpu_limit is None
    monkeypatch.setenv("AWS_LAMBDA_FUNCTION_NAME", "bge-m3")
    monkeypatch.setenv("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "3008")
    on_lambda = Settings()
    assert on_lambda.platform == "lambda" and on_lambda.cpu_limit == 2
    assert Settings(aws_lambda_function_memory_size=10240).cpu_limit == 6
    assert Settings(aws_lambda_function_memory_size=128).cpu_limit == 1


def test_engine_config_is_the_engines_part_of_the_settings() -> None:
    from handler.engine import EngineConfig
    from handler.settings import engine_config

    s = settings(
        threads=3,
        aws_lambda_function_memory_size=3538,
        batch_token_budget=4096,
        model_verify="size",
        device="cuda",
        warmup=False,
    )
    assert engine_config(s) == EngineConfig(
        threads=3, cpu_limit=2, batch_token_budget=4096, verify="size", device="cuda", warmup=False
    )
    # A corpus job's engine: the same threads and device, its own token budget, no warm-up and
    # no embedding cache; the job CLI's --device beats DEVICE.
    job = engine_config(s, job=True, device="cpu")
    assert job == EngineConfig(
        threads=3,
        cpu_limit=2,
        batch_token_budget=s.job_batch_token_budget,
        verify="size",
        device="cpu",
        warmup=False,
        cache_size=0,
    )


def test_python_m_handler_main_serves_on_loopback_unless_host_says_otherwise() -> None:
    # GIVEN the documented local start, with no HOST and no model (the app still answers)
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k not in ("HOST", "MODEL_PATH", "API_KEY")}
    env.update({"PORT": "0", "PYTHONUNBUFFERED": "1", "LOG_LEVEL": "INFO"})
    proc = subprocess.Popen(
        [sys.executable, "-m", "handler.main"],
        cwd=Path(__file__).resolve().parent.parent,
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stderr is not None
        lines: list[str] = []
        for line in proc.stderr:  # ends if the process dies, so no wait is unbounded
            lines.append(line)
            if "serving on" in line:
                break
        banner = next((line for line in lines if "serving on" in line), "")
        # THEN the line names the address really bound, and that is loopback
        found = re.search(r"serving on http://([^:]+):(\d+)", banner)
        assert found, "".join(lines)
        assert found.group(1) == "127.0.0.1" and "this machine only" in banner
        r = httpx.get(f"http://127.0.0.1:{found.group(2)}/health", timeout=30)
        assert r.status_code == 503 and "MODEL_PATH" in r.json()["error"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_the_serving_line_says_what_is_bound_and_who_can_reach_it() -> None:
    from handler.main import serving_line

    line = serving_line(("0.0.0.0", 8080), settings(host="0.0.0.0", api_key="k"))
    assert line.startswith("serving on http://0.0.0.0:8080 (reachable from the network")
    assert "API key required" in line
    line = serving_line(("::1", 9000, 0, 0), settings(host="::1", route_prefix="/embed"))
    assert "http://[::1]:9000/embed" in line and "this machine only" in line
    assert "API key off" in line
