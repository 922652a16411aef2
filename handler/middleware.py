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
- timing headers; and an unexpected exception -> 500 in the dialect's envelope.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from handler.errors import ApiError, Dialect, ErrorKind, dialect_for, invalid, render
from handler.logging import (
    RECORD_SCOPE_KEY,
    RequestRecord,
    log_request,
    request_id_from_scope,
    take_cold_start,
    timing_headers,
)
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


class ServiceMiddleware:
    def __init__(self, app: ASGIApp, settings: Settings, compute_paths: frozenset[str]):
        self.app = app
        self.settings = settings
        self.compute_paths = compute_paths
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
        counted = False
        try:
            early = self._precheck(scope)
            if early is not None:
                await reply.error(early)
                return
            counted = path in self.compute_paths
            if counted:
                if self.in_flight >= settings.max_concurrent_requests:
                    counted = False
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
                self.in_flight += 1
            await self.app(scope, self._limited(receive), reply.send)
        except Exception:
            log.exception(
                "unhandled error in %s %s (request %s)", record.method, path, record.request_id
            )
            if not reply.started:
                await reply.error(ApiError(ErrorKind.INTERNAL, "Internal server error."))
        finally:
            if counted:
                self.in_flight -= 1
            route = scope.get("route")
            record.route = getattr(route, "path", None)
            log_request(record, (time.perf_counter() - start) * 1000.0)

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

    def _limited(self, receive: Receive) -> Receive:
        limit = self.settings.max_request_bytes
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message.get("type") == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _too_large(limit)
            return message

        return limited


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
        self._head: Message | None = None
        self._chunks: list[bytes] = []

    async def send(self, message: Message) -> None:
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
