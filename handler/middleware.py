"""`ServiceMiddleware` (pure ASGI): what must happen for every request, before routing or after
the route returned.

- the request record (request id, cold start) and one JSON log line at the end;
- an error a platform adapter found before the app ran (`PLATFORM_ERROR_SCOPE_KEY`: the Lambda
  adapter sets it for a body that claims base64 but is not) -> that error, in the dialect's
  envelope;
- MAX_REQUEST_BYTES -> 413, by Content-Length and by counting the bytes actually received;
- MAX_CONCURRENT_REQUESTS requests in flight on the routes that run the model (`compute_paths`,
  from the routes the dialects mark), beyond it 429 with Retry-After;
- MAX_RESPONSE_BYTES -> 413 with a hint, measured as the platform carries the body (on Lambda the
  body is a JSON string inside the invoke response, so escaping counts), instead of Lambda's
  opaque 502;
- timing headers; and an unexpected exception -> 500 in the dialect's envelope;
- a deadline per request (REQUEST_TIMEOUT_S; on Lambda also the invocation's remaining time):
  past it a 504 in the dialect's envelope, and the request's work leaves the micro-batch queue if
  it has not started (handler/engine/cancel.py);
- a client that disconnects: its queued work is withdrawn and nothing is answered;
- SIGTERM (`Drain`): requests in flight may finish within SHUTDOWN_GRACE_S; those that cannot get
  a 503 `shutting_down` in their envelope instead of a dropped connection;
- metrics (handler/metrics.py) from the same record as the log line.

The app runs as its own task so that the middleware can answer at the deadline while the route's
thread finishes: onnxruntime cannot be interrupted, and an answer must not wait for it. The
in-flight count drops when that task really ends, so it still counts the cores in use.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from typing import Any

from handler.engine import cancel
from handler.errors import ApiError, Dialect, ErrorKind, dialect_for, invalid, render
from handler.logging import (
    RECORD_SCOPE_KEY,
    RequestRecord,
    log_request,
    request_id_from_scope,
    take_cold_start,
    timing_headers,
)
from handler.metrics import Metrics, NoMetrics
from handler.settings import Settings

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# A platform adapter that cannot turn its event into a request puts the ApiError to answer here;
# the app then answers it like any other error, with the request id and the log line.
PLATFORM_ERROR_SCOPE_KEY = "bge_m3.platform_error"
# Why a request's work was withdrawn (handler/engine/cancel.py).
DEADLINE = "deadline passed"
DISCONNECTED = "client disconnected"
SHUTTING_DOWN = "server shutting down"
# nginx's "client closed request": logged and counted, never sent (nobody is listening).
CLIENT_CLOSED_STATUS = 499
# Room for statusCode, headers and the JSON keys of Lambda's invoke response around the body.
LAMBDA_ENVELOPE_MARGIN = 4096


def _too_large(limit: int) -> ApiError:
    return ApiError(
        ErrorKind.PAYLOAD_TOO_LARGE,
        f"The request body is larger than {limit} bytes (MAX_REQUEST_BYTES). Send fewer or "
        "shorter inputs per request.",
        code="request_too_large",
    )


def carried_size(body: bytes, *, on_lambda: bool) -> int:
    """Bytes the platform must carry for this body. Lambda returns it as a JSON string inside
    its invoke response, so quotes, backslashes and non-ASCII characters are escaped there
    (worst case with ensure_ascii: about 3x for text made of 4-byte characters)."""
    if not on_lambda:
        return len(body)
    escaped = json.dumps(body.decode("utf-8", "replace"))  # ensure_ascii: the larger form
    return len(escaped) + LAMBDA_ENVELOPE_MARGIN


class Drain:
    """The shutdown grace period. `begin` may be called from a signal handler or any thread; each
    waiting request learns of it through its own event loop."""

    def __init__(self) -> None:
        # Reentrant: `begin` runs in a signal handler, which Python runs in the main thread between
        # two bytecodes, possibly while that thread holds this lock (in `waiter`, or in `begin`
        # for the first of two SIGTERMs: `make serve` and a process-group kill send two). A plain
        # Lock would deadlock the process there, and it would never exit.
        self._lock = threading.RLock()
        self.deadline: float | None = None  # time.monotonic() by which requests must be done
        self._waiters: set[asyncio.Future[None]] = set()

    @property
    def draining(self) -> bool:
        return self.deadline is not None

    def begin(self, grace_s: float) -> None:
        with self._lock:
            if self.deadline is not None:
                return
            self.deadline = time.monotonic() + grace_s
            waiters = list(self._waiters)
        for waiter in waiters:
            with contextlib.suppress(RuntimeError):  # its loop is closed: nobody waits
                waiter.get_loop().call_soon_threadsafe(_settle, waiter)

    @contextlib.contextmanager
    def waiter(self) -> Iterator[asyncio.Future[None]]:
        """A future that completes when draining begins (at once if it has)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        with self._lock:
            self._waiters.add(future)
        # Checked after registering: a `begin` that ran before, or inside the block above (from a
        # signal handler), may not have seen this future.
        if self.deadline is not None:
            _settle(future)
        try:
            yield future
        finally:
            with self._lock:
                self._waiters.discard(future)
            future.cancel()


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class ServiceMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        settings: Settings,
        compute_paths: frozenset[str],
        metrics: Metrics | None = None,
        drain: Drain | None = None,
    ):
        self.app = app
        self.settings = settings
        self.compute_paths = compute_paths
        self.metrics = metrics or NoMetrics()
        self.drain = drain or Drain()
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        settings = self.settings
        path = str(scope.get("path", "/"))
        dialect = dialect_for(path, settings.route_prefix)
        record = RequestRecord(
            request_id=request_id_from_scope(scope),
            method=str(scope.get("method", "GET")),
            path=path,
            dialect=dialect,
            cold_start=take_cold_start(),
        )
        scope[RECORD_SCOPE_KEY] = record
        reply = _Reply(send, record, dialect, start, settings)
        try:
            early = self._precheck(scope)
            if early is not None:
                await reply.error(early)
                return
            counted = path in self.compute_paths
            if counted and self.in_flight >= settings.max_concurrent_requests:
                await reply.error(
                    ApiError(
                        ErrorKind.OVERLOADED,
                        f"The server is busy: {settings.max_concurrent_requests} requests "
                        "are already in progress (MAX_CONCURRENT_REQUESTS). Retry after "
                        f"{settings.retry_after_seconds} s.",
                        headers={"Retry-After": str(settings.retry_after_seconds)},
                    )
                )
                return
            await self._serve(scope, receive, reply, counted)
        except Exception:
            log.exception(
                "unhandled error in %s %s (request %s)", record.method, path, record.request_id
            )
            if not reply.started:
                await reply.error(ApiError(ErrorKind.INTERNAL, "Internal server error."))
        finally:
            route = scope.get("route")
            record.route = getattr(route, "path", None)
            total_ms = (time.perf_counter() - start) * 1000.0
            log_request(record, total_ms)
            self.metrics.request(record, total_ms)

    async def _serve(self, scope: Scope, receive: Receive, reply: _Reply, counted: bool) -> None:
        """Run the app as a task, and answer for it if it misses the deadline or the end of the
        shutdown grace period."""
        cancellation = cancel.Cancellation()
        # Under Mangum (Lambda) the client cannot go away mid-request: the invocation's event is
        # the whole request, and the only message after the body is the disconnect Mangum sends
        # once the answer is complete. Listening for it would cost a task per request for nothing.
        listen = "aws.event" not in scope
        body = _Body(receive, self.settings.max_request_bytes, cancellation, reply, listen=listen)
        if counted:
            self._count(+1)
        token = cancel.CURRENT.set(cancellation)  # the task's context (and its threads) copy it
        try:
            task = asyncio.ensure_future(self.app(scope, body.receive, reply.send))
        finally:
            cancel.CURRENT.reset(token)
        # Registered before anyone awaits the task, so the count drops before the answer goes.
        task.add_done_callback(functools.partial(self._ended, counted, body))
        budget = self._budget(scope)
        deadline = time.monotonic() + budget
        with self.drain.waiter() as draining:
            await asyncio.wait(
                {task, draining}, timeout=budget, return_when=asyncio.FIRST_COMPLETED
            )
            if not task.done() and draining.done():
                until = min(deadline, self.drain.deadline or deadline)
                await asyncio.wait({task}, timeout=max(0.0, until - time.monotonic()))
        if task.done():
            task.result()  # its exception, if any, is the middleware's to answer
            return
        if reply.started:
            return  # answered already; what remains is the app's own business
        shutting_down = self.drain.deadline is not None and self.drain.deadline < deadline
        cancellation.cancel(SHUTTING_DOWN if shutting_down else DEADLINE)
        await reply.error(_shutdown_error() if shutting_down else _deadline_error(budget, scope))

    def _budget(self, scope: Scope) -> float:
        """Seconds this request may take: REQUEST_TIMEOUT_S, and on Lambda no more than the
        invocation has left (less a margin to send the answer before Lambda stops it)."""
        budget = self.settings.request_timeout_s
        remaining = getattr(scope.get("aws.context"), "get_remaining_time_in_millis", None)
        if callable(remaining):
            try:
                left = float(remaining()) / 1000.0 - self.settings.lambda_deadline_margin_s
            except (TypeError, ValueError):
                return budget
            budget = min(budget, max(0.0, left))
        return budget

    def _count(self, delta: int) -> None:
        self.in_flight += delta
        self.metrics.in_flight(self.in_flight)

    def _ended(self, counted: bool, body: _Body, task: asyncio.Task[None]) -> None:
        if counted:
            self._count(-1)
        body.stop()
        error = None if task.cancelled() else task.exception()
        if error is not None:
            # Retrieved here so that the error of a task answered for already (504, 503) is
            # logged, not reported by asyncio as never retrieved.
            log.debug("request task ended with %r", error)

    def _precheck(self, scope: Scope) -> ApiError | None:
        platform_error = scope.get(PLATFORM_ERROR_SCOPE_KEY)
        if isinstance(platform_error, ApiError):
            return platform_error
        limit = self.settings.max_request_bytes
        for name, value in scope.get("headers") or ():
            if bytes(name).lower() == b"content-length":
                try:
                    declared = int(bytes(value))
                except ValueError:
                    return invalid("The Content-Length header is not a number.")
                if declared > limit:
                    return _too_large(limit)
        return None


class _Body:
    """The app's `receive`: counts the body against MAX_REQUEST_BYTES and, once the body is in,
    listens for the client going away (the app itself does not read again until it answers)."""

    def __init__(
        self,
        receive: Receive,
        limit: int,
        cancellation: cancel.Cancellation,
        reply: _Reply,
        *,
        listen: bool = True,
    ):
        self._receive = receive
        self._listen_after_body = listen
        self._limit = limit
        self._cancellation = cancellation
        self._reply = reply
        self._seen = 0
        self._listener: asyncio.Task[Message] | None = None

    async def receive(self) -> Message:
        if self._listener is not None:
            try:
                return await asyncio.shield(self._listener)
            except asyncio.CancelledError:
                if self._listener.cancelled():
                    return {"type": "http.disconnect"}
                raise
        message = await self._receive()
        kind = message.get("type")
        if kind == "http.request":
            self._seen += len(message.get("body", b""))
            if self._seen > self._limit:
                raise _too_large(self._limit)
            if not message.get("more_body", False) and self._listen_after_body:
                self._listener = asyncio.ensure_future(self._listen())
        elif kind == "http.disconnect":
            self._gone()
        return message

    async def _listen(self) -> Message:
        message = await self._receive()
        if message.get("type") == "http.disconnect":
            self._gone()
        return message

    def _gone(self) -> None:
        if not self._reply.started:
            self._reply.abandon()
            self._cancellation.cancel(DISCONNECTED)

    def stop(self) -> None:
        if self._listener is not None and not self._listener.done():
            self._listener.cancel()


def _deadline_error(budget: float, scope: Scope) -> ApiError:
    where = (
        "REQUEST_TIMEOUT_S or the Lambda invocation's remaining time"
        if scope.get("aws.context") is not None
        else "REQUEST_TIMEOUT_S"
    )
    return ApiError(
        ErrorKind.TIMEOUT,
        f"The request did not finish within {budget:.3g} s ({where}). Send fewer or shorter "
        "inputs per request, or retry when the service is less busy.",
        code="request_timeout",
    )


def _shutdown_error() -> ApiError:
    return ApiError(
        ErrorKind.UNAVAILABLE,
        "The server is shutting down and this request could not finish in time. Retry it: "
        "another instance will answer.",
        code="shutting_down",
        headers={"Connection": "close"},
    )


class _Reply:
    """Buffers the app's response to measure it, add headers, and swap in a 413 if too large."""

    def __init__(
        self,
        send: Send,
        record: RequestRecord,
        dialect: Dialect,
        start: float,
        settings: Settings,
    ):
        self._send = send
        self.record = record
        self.dialect = dialect
        self.start = start
        self.limit = settings.response_limit
        self.on_lambda = settings.platform == "lambda"
        self.limit_name = (
            "MAX_RESPONSE_BYTES"
            if settings.max_response_bytes is not None or not self.on_lambda
            else "Lambda's 6 MB response limit"
        )
        self.started = False
        self.abandoned = False  # the client went away: nothing more is sent
        self._head: Message | None = None
        self._chunks: list[bytes] = []

    def abandon(self) -> None:
        self.abandoned = True
        self.record.status = CLIENT_CLOSED_STATUS
        self.record.error_code = "client_disconnected"

    async def send(self, message: Message) -> None:
        if self.started or self.abandoned:
            return  # answered (a 504 or 503 went first) or nobody listens
        kind = message.get("type")
        if kind == "http.response.start":
            self._head = message
            return
        if kind != "http.response.body" or self._head is None:
            await self._send(message)
            return
        self._chunks.append(bytes(message.get("body", b"")))
        if message.get("more_body", False):
            return
        body = b"".join(self._chunks)
        status = int(self._head["status"])
        headers = [(bytes(k), bytes(v)) for k, v in self._head.get("headers", [])]
        # Escaping at most sextuples a body (a control character becomes \u00XX), so a body
        # below a sixth of the limit needs no measuring.
        if self.limit and status < 400 and len(body) * 6 + LAMBDA_ENVELOPE_MARGIN > self.limit:
            size = carried_size(body, on_lambda=self.on_lambda)
            if size > self.limit:
                await self.error(self._response_too_large(size))
                return
        await self._emit(status, headers, body)

    def _response_too_large(self, size: int) -> ApiError:
        return ApiError(
            ErrorKind.PAYLOAD_TOO_LARGE,
            f"The response would be {size} bytes, over {self.limit} bytes ({self.limit_name}). "
            "Ask for less per request: use encoding_format=base64 (OpenAI dialect), send fewer "
            "inputs, or leave out ColBERT vectors.",
            code="response_too_large",
        )

    async def error(self, error: ApiError) -> None:
        if self.started or self.abandoned:
            return
        self.record.error_code = error.code
        response = render(error, self.dialect, self.record.request_id)
        await self._emit(response.status_code, list(response.raw_headers), bytes(response.body))

    async def _emit(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        total_ms = (time.perf_counter() - self.start) * 1000.0
        extra = timing_headers(self.record, total_ms)
        names = {name for name, _ in extra}
        headers = [(k, v) for k, v in headers if k.lower() not in names]
        self.record.status = status
        self.record.response_bytes = len(body)
        self.started = True
        await self._send(
            {"type": "http.response.start", "status": status, "headers": headers + extra}
        )
        await self._send({"type": "http.response.body", "body": body, "more_body": False})
