"""The ASGI app built from the environment: `handler.main:app` for uvicorn (Cloud Run, the GPU
image, local use) and, through handler/lambda_function.py, for Lambda.

The models load once per process, at import, behind a cached getter (`load_models`): Mangum runs
lifespan events on every invocation, so a startup hook would reload the model per request. The
load starts in a thread before FastAPI and the app are imported, so the two overlap. If
loading fails the app still starts: /health answers 503 with the reason, every other route a 503
in its dialect's envelope, and the log says what went wrong.

    python -m handler.main        # uvicorn on $HOST:$PORT (default 127.0.0.1:8000)
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from handler.settings import Settings, engine_config

if TYPE_CHECKING:
    from fastapi import FastAPI

    from handler.engine.types import ModelRegistry

log = logging.getLogger("handler.main")


@functools.cache
def _load(settings: Settings) -> tuple[ModelRegistry | None, str | None]:
    paths = settings.model_paths
    if not paths:
        return None, (
            "MODEL_PATH is not set: point it at a directory made by "
            "`python -m model_build --out DIR` (several: comma-separated)"
        )
    start = time.perf_counter()
    wait_ms = settings.micro_batch_wait_ms
    try:
        # Imported here so that a broken runtime (say, onnxruntime missing) is a 503 with the
        # reason, not an app that cannot start.
        from handler import engine as engine_pkg

        registry = engine_pkg.load_registry(list(paths), engine_config(settings))
        if settings.micro_batching:
            registry = engine_pkg.micro_batched(registry, wait_ms=wait_ms)
    except Exception as exc:
        log.exception("loading the models from %s failed", ",".join(map(str, paths)))
        return None, f"{type(exc).__name__}: {exc}"
    log.info(
        "loaded %s in %.0f ms (micro-batching %s)",
        ", ".join(e.info.id for e in registry),
        (time.perf_counter() - start) * 1000.0,
        f"on, wait {wait_ms:g} ms" if settings.micro_batching else "off",
    )
    return registry, None


_load_lock = threading.Lock()


def load_models(settings: Settings) -> tuple[ModelRegistry | None, str | None]:
    """The registry for these settings, built once per process (and the error, if it failed).
    The lock makes a second caller wait for a load in progress instead of starting another."""
    with _load_lock:
        return _load(settings)


def start_loading(settings: Settings) -> threading.Thread:
    """Load the models in a thread, so that onnxruntime builds its session and sentencepiece its
    vocabulary (both release the GIL) while this thread imports FastAPI and the app: on 2 vCPUs
    that took the cold start from about 2.0-2.4 s to 1.5-1.6 s. build_app() waits for it through
    load_models()'s lock.

    The engine's own imports (numpy, onnxruntime, the tokenizer libraries: about 0.2 s) are done
    here, first, in this thread: they hold the GIL, so in the loader they would share it with
    the app's imports and start the session later; and numpy imported by two threads at once can
    fail (ImportError on a partially initialized numpy, seen when the loader imported the engine
    while this thread imported the app, which needs it too). If they fail here, load_models
    reports it and the app answers 503 with the reason. See docs/cold-start.md."""
    with contextlib.suppress(Exception):
        import handler.engine  # noqa: F401
    loader = threading.Thread(target=load_models, args=(settings,), name="model-load", daemon=True)
    loader.start()
    return loader


def build_app(settings: Settings | None = None) -> FastAPI:
    """An app for these settings (default: the environment), sharing the cached registry;
    `uvicorn --factory handler.main:build_app` works too."""
    from handler.app import create_app
    from handler.auth import KeyChecker
    from handler.metrics import metrics_for

    settings = settings or Settings()
    # Whatever does not need the models is done before waiting for them, beside the load: the
    # API keys (with a secret configured, boto3's import and a network call: 0.3-0.6 s measured
    # here) and the metrics backend (importing prometheus-client off Lambda: about 25 ms, which
    # after the wait would add to the cold start).
    key_checker = KeyChecker.from_settings(settings)
    metrics = metrics_for(settings)
    registry, error = load_models(settings)
    return create_app(settings, registry, error, key_checker, metrics)


def _configure_logging(settings: Settings) -> None:
    root = logging.getLogger()
    if not root.handlers:  # Lambda's runtime installs its own handler; keep it
        logging.basicConfig(stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    root.setLevel(settings.log_level)
    # Mangum logs "POST /path 200" at INFO for every invocation; handler/logging.py already writes
    # one structured line per request, so this one would only double the log volume and its cost.
    logging.getLogger("mangum.http").setLevel(max(logging.WARNING, root.level))


settings = Settings()
_configure_logging(settings)
start_loading(settings)
app = build_app(settings)


def main() -> None:
    serve(app, settings)


def serve(app: FastAPI, settings: Settings) -> None:
    """uvicorn on settings.host:port until SIGTERM or SIGINT, then a graceful stop: no new
    connections, requests in flight get SHUTDOWN_GRACE_S to finish (503 `shutting_down` for
    those that cannot), the micro-batch workers and model threads are closed, and the process
    exits 0."""
    import math
    import signal

    import uvicorn

    grace = settings.shutdown_grace_s
    # access_log off: the app writes its own JSON line per request (handler/logging.py).
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        access_log=False,
        # uvicorn cancels what is left after this; the app answers its 503s at `grace` first.
        timeout_graceful_shutdown=math.ceil(grace) + 2,
    )
    # The socket is bound here so that the line below names the address actually bound (with
    # PORT=0, the port the system chose), not the one asked for.
    sock = listening_socket(config)
    log.info("%s", serving_line(sock.getsockname(), settings))
    # uvicorn re-raises the signal it stopped on once it is done; with this handler in place
    # that is a no-op, so a SIGTERM that ended in a clean drain exits 0, not 143.
    signal.signal(signal.SIGTERM, lambda *_: None)
    graceful_server(config, app.state.drain, grace).run(sockets=[sock])
    close_models(app, grace)
    busy = [
        t for t in threading.enumerate() if t is not threading.current_thread() and not t.daemon
    ]
    log.info("stopped%s", f" ({len(busy)} threads still in a model call)" if busy else "")
    if busy:
        # Threads still inside a model call (answered with a 503 already) would hold the
        # interpreter open until they return; everything they could produce is discarded.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def listening_socket(config: Any) -> socket.socket:
    """uvicorn's socket for this config, bound, with Nagle's algorithm off for every connection.

    uvicorn makes the socket with protocol 0, so asyncio, which turns Nagle off only on sockets
    it knows are TCP, leaves it on: a response goes out as two writes (head, then body) and the
    body waited for the client's delayed ACK, about 40-50 ms per request on a keep-alive
    connection. Connections accepted on Linux inherit TCP_NODELAY from the listening socket."""
    sock: socket.socket = config.bind_socket()
    if sock.family in (socket.AF_INET, socket.AF_INET6):  # not a Unix socket (uvicorn --uds)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def close_models(app: FastAPI, timeout_s: float) -> None:
    """Stop the micro-batch workers, then the model threads. Shutdown withdrew the queued work,
    so each worker finishes at most the pass it is running, and the requests waiting on it
    return. Threads still inside a model call are left behind (serve() exits without them)."""
    service = app.state.service
    for engine in service.registry or ():
        close = getattr(engine, "close", None)
        if callable(close):
            close(timeout_s)
    service.threads.close(timeout_s)


def graceful_server(config: Any, drain: Any, grace_s: float) -> Any:
    """uvicorn's server, which on SIGTERM/SIGINT also starts the app's grace period (`Drain`):
    uvicorn stops accepting and waits for connections; the app answers what cannot finish in
    time. Defined here so that Lambda, which never runs it, never imports uvicorn."""
    import uvicorn

    class GracefulServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            log.info("signal %d: draining for up to %.1f s", sig, grace_s)
            drain.begin(grace_s)
            super().handle_exit(sig, frame)

    return GracefulServer(config)


def serving_line(bound: tuple[Any, ...], settings: Settings) -> str:
    host, port = str(bound[0]), int(bound[1])
    shown = f"[{host}]" if ":" in host else host
    reach = "this machine only" if host in ("127.0.0.1", "::1", "localhost") else "the network"
    return (
        f"serving on http://{shown}:{port}{settings.route_prefix} (reachable from {reach}; "
        f"HOST={settings.host}), API key {'required' if settings.auth_configured else 'off'}"
    )


if __name__ == "__main__":
    main()
