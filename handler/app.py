"""The one FastAPI app: `create_app(settings, engine)` wires routers, auth, error handlers and the
service middleware. The same app runs under Mangum (Lambda) and uvicorn (Cloud Run, GPU, local).

`engine` is the ModelRegistry to serve (tests inject fakes); handler/main.py builds the real one
once per process. With no registry the app still starts: /health answers 503 with `load_error`,
every other route a 503 in its dialect's envelope.

The middleware (`ServiceMiddleware`, pure ASGI) does what must happen for every request, before
routing or after the route returned:
- the request record (request id, cold start) and one JSON log line at the end;
- an event whose base64 body was not base64 (flagged by handler/lambda_adapter.py) -> 400;
- MAX_REQUEST_BYTES -> 413, by Content-Length and by counting the bytes actually received;
- MAX_CONCURRENT_REQUESTS embedding/score requests in flight, beyond it 429 with Retry-After;
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

from fastapi import Depends, FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response

from handler.api import health, native, openai, v2
from handler.api.common import ServiceState, add_doc_schemas, record_of
from handler.auth import KeyChecker, require_api_key
from handler.engine.errors import EngineError
from handler.engine.types import ModelRegistry
from handler.errors import (
    ApiError,
    Dialect,
    ErrorKind,
    dialect_for,
    from_engine_error,
    invalid,
    render,
    strip_prefix,
)
from handler.lambda_adapter import INVALID_BODY_SCOPE_KEY
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

# Paths (after ROUTE_PREFIX) that run the model; only these count against the in-flight bound.
COMPUTE_PATHS = frozenset({"/v1/embeddings", v2.PATH, "/embeddings", "/score"})
# Room for statusCode, headers and the JSON keys of Lambda's invoke response around the body.
LAMBDA_ENVELOPE_MARGIN = 4096


def create_app(
    settings: Settings | None = None,
    engine: ModelRegistry | None = None,
    load_error: str | None = None,
    key_checker: KeyChecker | None = None,
) -> FastAPI:
    """`key_checker`: the API keys, already read (handler/main.py reads them while the models
    load); by default they are read from `settings` here."""
    settings = settings or Settings()
    if engine is None and load_error is None:
        load_error = "no model registry was given to create_app"
    registry = engine if load_error is None else None
    if key_checker is None:
        key_checker = KeyChecker.from_settings(settings)

    prefix = settings.route_prefix
    app = FastAPI(
        title="BGE-M3 embeddings",
        version="0.1.0",
        description="Dense, sparse and ColBERT embeddings in the OpenAI, v2 and native dialects.",
        docs_url=f"{prefix}/docs",
        redoc_url=None,
        openapi_url=f"{prefix}/openapi.json",
    )
    app.state.service = ServiceState(settings, registry, load_error)
    app.state.key_checker = key_checker

    protected = [Depends(require_api_key)]
    for router in (openai.router, v2.router, native.router):
        app.include_router(router, prefix=prefix, dependencies=protected)
    app.include_router(health.router, prefix=prefix)

    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(EngineError, _engine_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_middleware(ServiceMiddleware, settings=settings)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            add_doc_schemas(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    log.info(
        "app ready: models=%s auth=%s prefix=%r",
        [e.info.id for e in registry] if registry is not None else f"none ({load_error})",
        key_checker.state,
        prefix,
    )
    return app


# ---- exception handlers --------------------------------------------------------------------------


def _respond(request: Request, error: ApiError) -> Response:
    record = record_of(request)
    record.error_code = error.code
    prefix = request.app.state.service.settings.route_prefix
    return render(error, dialect_for(request.url.path, prefix), record.request_id)


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return _respond(request, exc)


async def _engine_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, EngineError)
    return _respond(request, from_engine_error(exc))


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    first = errors[0] if errors else {}
    where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "path", "query"))
    message = f"Invalid value for '{where}': {first.get('msg', 'invalid request')}."
    return _respond(request, invalid(message, param=where or None))


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    where = f"{request.method} {request.url.path}"
    if exc.status_code == 404:
        error = ApiError(ErrorKind.NOT_FOUND, f"Unknown request URL: {where}.")
    elif exc.status_code == 405:
        error = ApiError(ErrorKind.METHOD_NOT_ALLOWED, f"Method not allowed: {where}.")
    elif exc.status_code == 413:
        error = ApiError(ErrorKind.PAYLOAD_TOO_LARGE, str(exc.detail))
    elif exc.status_code < 500:
        error = invalid(str(exc.detail))
    else:
        error = ApiError(ErrorKind.INTERNAL, str(exc.detail))
    return _respond(request, error)


# ---- middleware ----------------------------------------------------------------------------------


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
    def __init__(self, app: ASGIApp, settings: Settings):
        self.app = app
        self.settings = settings
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
        reply = _Reply(send, record, dialect, start, settings, on_lambda="aws.event" in scope)
        counted = False
        try:
            early = self._precheck(scope)
            if early is not None:
                await reply.error(early)
                return
            local = strip_prefix(path, settings.route_prefix)
            counted = local in COMPUTE_PATHS
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
        if scope.get(INVALID_BODY_SCOPE_KEY):
            return invalid(
                "The event says isBase64Encoded=true but its body is not valid base64.",
                code="invalid_base64_body",
            )
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
        *,
        on_lambda: bool,
    ):
        self._send = send
        self.record = record
        self.dialect = dialect
        self.start = start
        self.limit = settings.response_limit
        self.on_lambda = on_lambda
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
        where = "Lambda's 6 MB response limit" if self.on_lambda else "MAX_RESPONSE_BYTES"
        return ApiError(
            ErrorKind.PAYLOAD_TOO_LARGE,
            f"The response would be {size} bytes, over {self.limit} bytes ({where}). Ask for "
            "less per request: use encoding_format=base64 (OpenAI dialect), send fewer inputs, "
            "or leave out ColBERT vectors.",
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
