"""Mangum's event adapters, made strict about base64 bodies.

Mangum decodes a body marked `isBase64Encoded: true` with `base64.b64decode` while building the
request, outside the ASGI app, so a body that is not base64 raises `binascii.Error` out of the
handler: Lambda reports an unhandled error and the caller sees a 500/502. These subclasses of
Mangum's own ALB, HTTP API and REST API adapters (passed as `custom_handlers`, Mangum's extension
point, so the entry point stays `Mangum(app, lifespan="off", ...)`) decode the same way but, on
failure, hand the app an empty body and, under the middleware's PLATFORM_ERROR_SCOPE_KEY, the 400
to answer; the middleware answers it in the dialect's envelope, with the request id and the log
line every request gets.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import logging
import threading
import warnings
from typing import Any

from mangum.handlers import ALB, APIGateway, HTTPGateway
from mangum.handlers.utils import maybe_encode_body
from mangum.types import Scope

from handler.errors import invalid
from handler.middleware import PLATFORM_ERROR_SCOPE_KEY

log = logging.getLogger(__name__)

_UNSET = object()


def _decoded_body(handler: Any) -> bytes | None:
    """The request body as Mangum would give it, or None when base64 decoding fails. Cached on
    the adapter: Mangum reads `scope` and `body` separately."""
    cached = handler.__dict__.get("_bge_m3_body", _UNSET)
    if cached is _UNSET:
        event = handler.event
        try:
            cached = maybe_encode_body(
                event.get("body", b""), is_base64=event.get("isBase64Encoded", False)
            )
        except (binascii.Error, ValueError):  # ValueError: non-ASCII text given as base64
            cached = None
        handler.__dict__["_bge_m3_body"] = cached
    result: bytes | None = cached
    return result


def _flagged(handler: Any, scope: Scope) -> Scope:
    if _decoded_body(handler) is None:
        scope[PLATFORM_ERROR_SCOPE_KEY] = invalid(
            "The event says isBase64Encoded=true but its body is not valid base64.",
            code="invalid_base64_body",
        )
    return scope


class _StrictBody:
    """Mixed in before a Mangum adapter: same scope and body, but a bad base64 body is flagged."""

    @property
    def scope(self) -> Scope:
        return _flagged(self, super().scope)  # type: ignore[misc]

    @property
    def body(self) -> bytes:
        return _decoded_body(self) or b""


class StrictALB(_StrictBody, ALB):
    pass


class StrictHTTPGateway(_StrictBody, HTTPGateway):
    pass


class StrictAPIGateway(_StrictBody, APIGateway):
    pass


# Same order as Mangum's own list (ALB, HTTP API, REST API); Lambda@Edge is not a supported source.
STRICT_HANDLERS: list[Any] = [StrictALB, StrictHTTPGateway, StrictAPIGateway]


# The long-lived task that anyio's worker threads belong to (see keep_worker_threads).
_WORKER_ROOT: list[asyncio.Task[Any]] = []


def keep_worker_threads() -> bool:
    """Keep the thread that runs the routes alive from one invocation to the next.

    Mangum runs each invocation as a task on one event loop with `run_until_complete`; anyio
    takes that task as the root of its worker threads and stops them when it ends. So every
    invocation started a thread for the route (FastAPI runs `def` routes in anyio's threads) and
    onnxruntime ran on a thread it had never seen: 2-4 ms of the handler's overhead for a 9-token
    query on 2 vCPUs, against 0.9 ms with the thread kept. A task that never ends, made the root
    here, keeps the worker; deadlines are untouched (the route still runs beside the middleware,
    and a route still busy past its deadline leaves the next request a fresh thread).

    anyio keeps the root in a private run variable: where a release no longer has it, the
    handler works as before, only slower (logged). Returns whether the root was set."""
    try:
        from anyio._backends._asyncio import _root_task
    except ImportError:
        log.warning("anyio changed: worker threads will be started per invocation")
        return False
    with warnings.catch_warnings():  # Mangum gets its loop the same way, with the same warning
        warnings.simplefilter("ignore", DeprecationWarning)
        loop = asyncio.get_event_loop()

    async def make_root() -> asyncio.Task[Any]:
        root = loop.create_task(asyncio.Event().wait(), name="anyio-worker-root")
        _root_task.set(root)
        return root

    _WORKER_ROOT.append(loop.run_until_complete(make_root()))
    # anyio's workers are not daemon threads: the interpreter waits for them at exit, before
    # atexit handlers run. Ending the root then stops them, as the end of an invocation did.
    threading._register_atexit(_end_worker_root)  # type: ignore[attr-defined]
    return True


def _end_worker_root() -> None:
    for root in _WORKER_ROOT:
        loop = root.get_loop()
        if loop.is_closed() or loop.is_running():
            continue
        root.cancel()
        with contextlib.suppress(BaseException):
            loop.run_until_complete(asyncio.gather(root, return_exceptions=True))
    _WORKER_ROOT.clear()
