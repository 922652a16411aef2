"""Lambda SnapStart: what runs before Lambda snapshots the initialised environment, and what runs
in each environment resumed from that snapshot.

With SnapStart on (template.yaml, parameter SnapStart; docs/snapstart.md), Lambda runs the init
phase (imports, model load, warm-up) once per published version, snapshots the microVM, and starts
later environments by resuming the snapshot, so many environments share one memory image. The
AWS Python 3.12+ base images run the callables registered with `snapshot_restore_py` (their
runtime interface client bundles it): before-snapshot hooks in reverse order of registration,
after-restore hooks in order, and the resumed runtime plus the after-restore hooks must finish
within Lambda's 10 s restore limit.

Before the snapshot: every model is loaded and warmed, and so is each embedding dialect's route
(one request each through the Lambda handler: FastAPI and pydantic build parts of a route on its
first call). A version whose load failed is refused at publish (the hook raises, so the
deployment fails) rather than snapshotted and resumed into 503s.

After each restore, what must not be shared between environments is renewed:
- the API keys: read again from Secrets Manager / SSM, so a key rotated after the version was
  published works; boto3 is bounded to a few seconds so an unreachable endpoint cannot run the
  restore past its limit, and on failure the keys read at init stay in force (logged);
- the generators seeded from entropy at init: Python's `random` and numpy's legacy global one
  (botocore's retry jitter draws from `random`). uuid4 (the request-id fallback) and `secrets`
  read the kernel's generator on every call and need nothing;
- the cold-start flag: the first request after a restore logs `cold_start: true, restore: true`;
- the thread count: re-derived (THREADS, else the cores and Lambda's vCPUs for the memory size)
  and compared with each session's. onnxruntime fixes a session's intra-op threads when it is
  created, so a different count means a new session (logged, with the time it took). On Lambda
  the vCPUs follow the memory size, which is part of the published version, so this should not
  happen there; the check is what makes the count a fact rather than an assumption.

Elsewhere (uvicorn, a plain container, no `snapshot_restore_py` importable) nothing registers.
The Python `hash()` seed is also fixed at interpreter start and so shared by every restore; no
hook can change it, and nothing here depends on it being secret.
"""

from __future__ import annotations

import json
import logging
import random
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from handler.logging import mark_restored

if TYPE_CHECKING:
    from handler.engine.engine import Engine
    from handler.engine.types import ModelRegistry
    from handler.settings import Settings

log = logging.getLogger(__name__)

# boto3's defaults (60 s connect and read timeouts, retries) could outlast the 10 s restore limit
# when Secrets Manager or SSM is unreachable; 2 attempts in all (the first and one retry, at most
# 1 s + 2 s each, with standard mode's backoff of under 1 s between) stay well inside it.
AWS_CONNECT_TIMEOUT_S = 1.0
AWS_READ_TIMEOUT_S = 2.0
AWS_TOTAL_ATTEMPTS = 2

LambdaHandler = Callable[[dict[str, Any], Any], dict[str, Any]]  # Mangum(app)(event, context)


def register_hooks(app: Any, settings: Settings, handler: LambdaHandler | None = None) -> bool:
    """Register the before-snapshot and after-restore hooks for this app (and the Lambda handler
    that serves it, whose routes are then warmed before the snapshot) when the runtime offers
    `snapshot_restore_py`; True when they were registered."""
    try:
        import snapshot_restore_py  # type: ignore[import-untyped]  # no py.typed
    except ImportError:
        return False
    hooks = SnapStartHooks(app, settings, handler)
    snapshot_restore_py.register_before_snapshot(hooks.before_snapshot)
    snapshot_restore_py.register_after_restore(hooks.after_restore)
    return True


class SnapStartHooks:
    def __init__(self, app: Any, settings: Settings, handler: LambdaHandler | None = None):
        self.app = app
        self.settings = settings
        self.handler = handler

    def registry(self) -> ModelRegistry:
        """The app's registry (load_models is cached: this is the one the app serves), or the
        reason it failed to load."""
        from handler.main import load_models

        registry, error = load_models(self.settings)
        if registry is None:
            raise RuntimeError(f"refusing to snapshot an environment without its models: {error}")
        return registry

    # ---- before the snapshot ------------------------------------------------------------------

    def before_snapshot(self) -> None:
        start = time.perf_counter()
        engines = list(_engines(self.registry()))
        if not self.settings.warmup:
            # WARMUP=false skips it at load; a snapshot is the one place where it costs nobody.
            for engine in engines:
                engine.warm_up()
        routes = self.warm_routes() if self.handler is not None else "not warmed (no handler)"
        log.info(
            "snapshot: %d model(s) loaded and warmed (%s), routes %s, in %.0f ms",
            len(engines),
            ", ".join(f"{e.info.id} {e.threads} threads" for e in engines),
            routes,
            _ms_since(start),
        )

    def warm_routes(self) -> str:
        """One request per embedding dialect through the Lambda handler: the first call of a
        route builds what FastAPI and pydantic build lazily (measured here: 6-35 ms per route
        on the first call, 2-5 ms after), and in the snapshot nobody waits for it. The key check
        is set aside for these calls and their log lines are dropped; the cold-start flag they
        take is set again after every restore."""
        from handler.auth import KeyChecker
        from handler.logging import REQUEST_LOGGER

        assert self.handler is not None
        model = self.registry().default.info.id
        prefix = self.settings.route_prefix
        requests: list[tuple[str, dict[str, Any]]] = [
            (f"{prefix}/v1/embeddings", {"model": model, "input": "warm-up"}),
            (f"{prefix}/embeddings", {"input": "warm-up"}),
            (
                f"{prefix}/api/data/embedding/version/2",
                {
                    "model": {"model_name": model},
                    "data": [{"data_type": "text", "text": "warm-up"}],
                },
            ),
        ]
        request_log = logging.getLogger(REQUEST_LOGGER)
        checker, was_disabled = self.app.state.key_checker, request_log.disabled
        self.app.state.key_checker, request_log.disabled = KeyChecker(()), True
        statuses = []
        try:
            for path, body in requests:
                try:
                    reply = self.handler(_http_api_event("POST", path, body), None)
                    statuses.append(f"{path} {reply.get('statusCode')}")
                except Exception as exc:  # a warm-up never stops a publish
                    statuses.append(f"{path} {type(exc).__name__}")
        finally:
            self.app.state.key_checker, request_log.disabled = checker, was_disabled
        return ", ".join(statuses)

    # ---- after each restore -------------------------------------------------------------------

    def after_restore(self) -> None:
        start = time.perf_counter()
        reseed()
        keys = self.refresh_api_keys()
        threads = self.rederive_threads()
        mark_restored()
        log.info(
            "restored from the snapshot in %.0f ms: generators re-seeded, API keys %s, threads %s",
            _ms_since(start),
            keys,
            threads,
        )

    def refresh_api_keys(self) -> str:
        """Read the keys again into the app's checker; what happened, for the log."""
        settings = self.settings
        if settings.api_key_secret_arn is None and settings.api_key_ssm_parameter is None:
            return "not from AWS (nothing to re-read)"
        checker = self.app.state.key_checker
        start = time.perf_counter()
        try:
            checker.refresh(settings, boto3_session=bounded_boto3_session())
        except Exception as exc:
            # The keys read at init stay in force: failing closed here would turn a blip in
            # Secrets Manager into an environment that answers 503 for its whole life.
            log.error("after restore, re-reading the API keys failed; kept those of init: %s", exc)
            return "kept from init (re-read failed)"
        return f"re-read in {_ms_since(start):.0f} ms"

    def rederive_threads(self) -> str:
        """Compare each session's intra-op threads with the count derived now; rebuild the
        session where they differ. What happened, for the log."""
        from handler.engine.session import default_threads

        changes: list[str] = []
        registry = self.registry()
        # The registry holds the models in the order of MODEL_PATH's directories.
        for model_dir, served in zip(self.settings.model_paths, registry, strict=False):
            engine = _unwrapped(served)
            if engine is None:
                continue
            wanted = engine.config.threads or default_threads(self.settings.cpu_limit)
            # The session's own options, not what was asked for: the count it really runs with.
            current = engine.session.get_session_options().intra_op_num_threads
            if wanted == current:
                continue
            try:
                took = rebuild_session(engine, model_dir, wanted)
            except Exception:
                # The snapshot's session still gives right answers, only at another thread count.
                log.exception(
                    "rebuilding %s's session with %d threads failed", engine.info.id, wanted
                )
                changes.append(f"{engine.info.id} kept {current} (rebuild to {wanted} failed)")
                continue
            changes.append(f"{engine.info.id} {current} -> {wanted} in {took:.0f} ms")
        if not changes:
            return "unchanged (" + ", ".join(str(e.threads) for e in _engines(registry)) + ")"
        log.warning("after restore the thread count differs: %s", "; ".join(changes))
        return "; ".join(changes)


def reseed() -> None:
    """New seeds from the OS for the generators a snapshot would otherwise share."""
    random.seed()  # None: os.urandom
    np_random = sys.modules.get("numpy.random")
    if np_random is not None:  # never imported: nothing was seeded
        np_random.seed()


def bounded_boto3_session() -> Any:
    """A boto3 session whose clients give up within the restore limit."""
    import boto3
    from botocore.config import Config

    config = Config(
        connect_timeout=AWS_CONNECT_TIMEOUT_S,
        read_timeout=AWS_READ_TIMEOUT_S,
        retries={"total_max_attempts": AWS_TOTAL_ATTEMPTS, "mode": "standard"},
    )
    return _ConfiguredSession(boto3.session.Session(), config)


class _ConfiguredSession:
    """`session.client(name)` with a botocore Config: what resolve_api_keys calls."""

    def __init__(self, session: Any, config: Any):
        self._session = session
        self._config = config

    def client(self, service_name: str) -> Any:
        return self._session.client(service_name, config=self._config)


def rebuild_session(engine: Engine, model_dir: Path, threads: int) -> float:
    """Give the engine a session with `threads` intra-op threads, warmed; milliseconds taken.
    Restore hooks run before the environment takes any invocation, so nothing is mid-run."""
    from handler.engine.engine import artifact_session

    start = time.perf_counter()
    session = artifact_session(model_dir, engine.manifest, engine.config.device, threads)
    engine.session, engine.threads = session, threads
    engine.warm_up()
    return _ms_since(start)


def _http_api_event(method: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """An API Gateway HTTP API (payload 2.0) event, the smallest Mangum accepts."""
    return {
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": path,
        "rawQueryString": "",
        "headers": {"content-type": "application/json", "host": "localhost"},
        "requestContext": {
            "http": {
                "method": method,
                "path": path,
                "protocol": "HTTP/1.1",
                "sourceIp": "127.0.0.1",
            },
            "requestId": "snapstart-warm-up",
            "stage": "$default",
        },
        "body": json.dumps(body),
        "isBase64Encoded": False,
    }


def _engines(registry: ModelRegistry) -> Iterator[Engine]:
    """The ONNX engines behind the registry, in load order."""
    for served in registry:
        engine = _unwrapped(served)
        if engine is not None:
            yield engine


def _unwrapped(served: Any) -> Engine | None:
    """The ONNX engine a registry entry serves (inside its micro-batcher); None for others."""
    from handler.engine.engine import Engine

    inner = getattr(served, "engine", served)
    return inner if isinstance(inner, Engine) else None


def _ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0
