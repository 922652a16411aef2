"""SnapStart: the hooks the Lambda entry point registers with the real `snapshot_restore_py`, run
the way Lambda's runtime runs them, around requests through `handler.lambda_function.handler`
with captured events and the tiny int8 model.

A snapshot restore resumes a copy of the memory the init left, so a "restore" here is: the state
the snapshot holds (the Python and numpy generators' states as init left them) put back, then the
after-restore hooks. Secrets Manager is moto's (`mock_aws`), so a rotation is a real
PutSecretValue that the hook has to read through boto3.
"""

from __future__ import annotations

import logging
import os
import random
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import snapshot_restore_py
from moto import mock_aws
from test_lambda import Context, invoke, load_event, with_request

import handler.logging as request_logging
from handler import snapstart

pytestmark = pytest.mark.slow  # the real model, loaded per simulated container

EVENT = "function_url_post_iam_powertools.json"
EMBED = {"model": "bge-m3", "input": "snap start"}


# ---- Lambda's side: awslambdaric's hook runner (lambda_runtime_hooks_runner.py), as it is ------


def run_before_snapshot() -> None:
    """Reverse order of registration, each hook taken off the list."""
    callables = snapshot_restore_py.get_before_snapshot()
    while callables:
        func, args, kwargs = callables.pop()
        func(*args, **kwargs)


def run_after_restore() -> None:
    """Order of registration; the list stays (every restore runs it)."""
    for func, args, kwargs in snapshot_restore_py.get_after_restore():
        func(*args, **kwargs)


def snapshot_generators() -> tuple[Any, Any]:
    return random.getstate(), np.random.get_state()


def resume(snapshot: tuple[Any, Any], *, hooks: bool = True) -> None:
    """One environment resumed from the snapshot: the memory as init left it, then the hooks."""
    random.setstate(snapshot[0])
    np.random.set_state(snapshot[1])
    if hooks:
        run_after_restore()


# ---- fixtures -----------------------------------------------------------------------------------


@pytest.fixture
def lambda_env(monkeypatch: pytest.MonkeyPatch, tiny_int8: Path) -> Iterator[pytest.MonkeyPatch]:
    """A fresh container's environment: the model baked in, no hooks registered yet, and the
    cold-start state of a new process (put back afterwards)."""
    for name in ("API_KEY", "API_KEY_SECRET_ARN", "API_KEY_SSM_PARAMETER", "THREADS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", raising=False)
    monkeypatch.setenv("MODEL_PATH", str(tiny_int8))
    monkeypatch.setenv("MODEL_VERIFY", "size")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setattr(request_logging, "_cold", True)
    monkeypatch.setattr(request_logging, "_restored", False)
    snapshot_restore_py.get_before_snapshot().clear()
    snapshot_restore_py.get_after_restore().clear()
    yield monkeypatch
    snapshot_restore_py.get_before_snapshot().clear()
    snapshot_restore_py.get_after_restore().clear()


def init_container(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Lambda's init: import the entry point as a new process would."""
    for name in ("handler.lambda_function", "handler.main"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    import handler.lambda_function as entry

    return entry


@pytest.fixture
def request_lines() -> Iterator[list[dict[str, Any]]]:
    lines: list[dict[str, Any]] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.payload)  # type: ignore[attr-defined]

    logger = logging.getLogger(request_logging.REQUEST_LOGGER)
    capture = Capture()
    logger.addHandler(capture)
    yield lines
    logger.removeHandler(capture)


def embed(entry: Any, key: str | None = None, context: Any = None) -> tuple[int, Any]:
    headers = {"authorization": f"Bearer {key}"} if key else None
    event = with_request(load_event(EVENT), "POST", "/v1/embeddings", EMBED, headers)
    status, payload, _ = invoke(entry.handler, event, context or Context())
    return status, payload


# ---- tests --------------------------------------------------------------------------------------


def test_the_entry_point_registers_one_hook_each(lambda_env: pytest.MonkeyPatch) -> None:
    init_container(lambda_env)
    assert len(snapshot_restore_py.get_before_snapshot()) == 1
    assert len(snapshot_restore_py.get_after_restore()) == 1


def test_a_key_rotated_after_publish_works_after_restore(lambda_env: pytest.MonkeyPatch) -> None:
    with mock_aws():
        import boto3

        secrets = boto3.client("secretsmanager", region_name="us-east-1")
        arn = secrets.create_secret(Name="bge-m3/api-key", SecretString="key-one")["ARN"]
        lambda_env.setenv("API_KEY_SECRET_ARN", arn)

        # Publish: init reads key-one, the hooks run, Lambda snapshots.
        entry = init_container(lambda_env)
        run_before_snapshot()
        assert embed(entry, "key-one")[0] == 200

        # The key is rotated; a restore that did not re-read would still hold key-one.
        secrets.put_secret_value(SecretId=arn, SecretString='{"api_keys": ["key-two"]}')
        assert embed(entry, "key-two")[0] == 401
        resume(snapshot_generators())

        assert embed(entry, "key-two")[0] == 200
        status, payload = embed(entry, "key-one")
        assert status == 401 and payload["error"]["code"] == "invalid_api_key"


def test_a_failed_re_read_keeps_the_keys_of_init(
    lambda_env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with mock_aws():
        import boto3

        secrets = boto3.client("secretsmanager", region_name="us-east-1")
        arn = secrets.create_secret(Name="bge-m3/api-key", SecretString="key-one")["ARN"]
        lambda_env.setenv("API_KEY_SECRET_ARN", arn)
        entry = init_container(lambda_env)
        run_before_snapshot()

        secrets.delete_secret(SecretId=arn, ForceDeleteWithoutRecovery=True)
        with caplog.at_level(logging.ERROR, logger="handler.snapstart"):
            resume(snapshot_generators())

        assert "re-reading the API keys failed" in caplog.text
        assert "key-one" not in caplog.text  # the reason names the error, never the key
        assert embed(entry, "key-one")[0] == 200
        assert embed(entry)[0] == 401


def test_the_re_read_gives_up_within_the_restore_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with mock_aws():
        client = snapstart.bounded_boto3_session().client("secretsmanager")
    config = client.meta.config
    attempts = config.retries["total_max_attempts"]
    assert attempts == snapstart.AWS_TOTAL_ATTEMPTS and config.retries["mode"] == "standard"
    # Each attempt's timeouts, plus standard mode's backoff (under 1 s) before each retry.
    worst = attempts * (config.connect_timeout + config.read_timeout) + (attempts - 1) * 1.0
    assert worst < 10  # Lambda's restore limit, which the other hooks share


def test_two_restores_share_neither_request_ids_nor_random_draws(
    lambda_env: pytest.MonkeyPatch, request_lines: list[dict[str, Any]]
) -> None:
    entry = init_container(lambda_env)
    run_before_snapshot()
    snapshot = snapshot_generators()

    # Without the hooks two environments resumed from one snapshot draw the same numbers.
    draws = []
    for _ in range(2):
        resume(snapshot, hooks=False)
        draws.append((random.random(), np.random.random()))
    assert draws[0] == draws[1]

    seen = []
    for _ in range(2):
        resume(snapshot)
        draws_after = (random.random(), np.random.random())
        # No aws_request_id in the context: the id is the service's own.
        status, _ = embed(entry, context=object())
        assert status == 200
        seen.append((request_lines[-1]["request_id"], draws_after))
    (first_id, first_draws), (second_id, second_draws) = seen
    assert first_id != second_id
    assert first_draws[0] != second_draws[0] and first_draws[1] != second_draws[1]


def test_routes_are_warmed_before_the_snapshot_without_a_trace(
    lambda_env: pytest.MonkeyPatch,
    request_lines: list[dict[str, Any]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    lambda_env.setenv("API_KEY", "key-one")
    entry = init_container(lambda_env)
    with caplog.at_level(logging.INFO, logger="handler.snapstart"):
        run_before_snapshot()

    # One request per dialect went through the handler, with the key check set aside for them...
    for route in ("/v1/embeddings", "/embeddings", "/api/data/embedding/version/2"):
        assert f"{route} 200" in caplog.text
    # ...and left no request log line, and the key check in force again.
    assert request_lines == []
    resume(snapshot_generators())
    assert embed(entry)[0] == 401
    assert embed(entry, "key-one")[0] == 200
    assert request_lines[0]["cold_start"] is True and request_lines[0]["restore"] is True


def test_the_first_request_after_a_restore_logs_cold_start_and_restore(
    lambda_env: pytest.MonkeyPatch, request_lines: list[dict[str, Any]]
) -> None:
    entry = init_container(lambda_env)
    run_before_snapshot()
    resume(snapshot_generators())

    for i in range(2):
        assert embed(entry, context=Context(aws_request_id=f"after-restore-{i}"))[0] == 200
    first, second = request_lines[-2:]
    assert first["request_id"] == "after-restore-0"
    assert first["cold_start"] is True and first["restore"] is True
    assert second["cold_start"] is False and second["restore"] is False


def test_threads_are_re_derived_and_the_session_rebuilt_when_they_differ(
    lambda_env: pytest.MonkeyPatch,
) -> None:
    entry = init_container(lambda_env)
    run_before_snapshot()
    (engine,) = snapstart._engines(snapstart.SnapStartHooks(entry.app, entry.settings).registry())
    session, threads = engine.session, engine.threads
    assert session.get_session_options().intra_op_num_threads == threads
    status, before = embed(entry)
    assert status == 200

    # Same cores after the restore: the session stays.
    resume(snapshot_generators())
    assert engine.session is session

    # Resumed where this process may use one core more: a session with that many threads.
    cores = set(range(threads + 1))
    lambda_env.setattr(os, "sched_getaffinity", lambda pid: cores)
    resume(snapshot_generators())
    assert engine.threads == threads + 1
    assert engine.session is not session
    assert engine.session.get_session_options().intra_op_num_threads == threads + 1
    status, after = embed(entry)
    assert status == 200
    np.testing.assert_allclose(
        after["data"][0]["embedding"], before["data"][0]["embedding"], rtol=0, atol=1e-6
    )


def test_a_failed_rebuild_keeps_the_snapshots_session(
    lambda_env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import handler.engine.engine as engine_module

    entry = init_container(lambda_env)
    run_before_snapshot()
    (engine,) = snapstart._engines(snapstart.SnapStartHooks(entry.app, entry.settings).registry())
    session, threads = engine.session, engine.threads

    def no_memory(*args: Any, **kwargs: Any) -> Any:
        raise MemoryError("no room for a second session")

    cores = set(range(threads + 1))
    lambda_env.setattr(os, "sched_getaffinity", lambda pid: cores)
    lambda_env.setattr(engine_module, "artifact_session", no_memory)
    with caplog.at_level(logging.WARNING, logger="handler.snapstart"):
        resume(snapshot_generators())

    assert engine.session is session and engine.threads == threads
    assert f"kept {threads} (rebuild to {threads + 1} failed)" in caplog.text
    assert embed(entry)[0] == 200


def test_a_failed_load_is_refused_at_publish_not_snapshotted(
    lambda_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    lambda_env.setenv("MODEL_PATH", str(tmp_path / "missing"))
    init_container(lambda_env)
    with pytest.raises(RuntimeError, match=r"manifest\.json"):
        run_before_snapshot()


def test_nothing_registers_without_snapshot_restore_py(lambda_env: pytest.MonkeyPatch) -> None:
    lambda_env.setitem(sys.modules, "snapshot_restore_py", None)  # import raises ImportError
    entry = init_container(lambda_env)
    assert snapstart.register_hooks(entry.app, entry.settings) is False
    assert snapshot_restore_py.get_after_restore() == []
