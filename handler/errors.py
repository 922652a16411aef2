"""One error taxonomy, one status map, one envelope per dialect.

Every failure the HTTP layer can answer is an `ApiError` of one `ErrorKind`; the kind fixes the
HTTP status once (`STATUS`). How it looks on the wire depends only on the dialect of the URL:

- OpenAI (`/v1/...`) and native (`/embeddings`, `/score`, `/models`, `/health`, `/`):
  `{"error": {"message", "type", "param", "code"}}`, all four keys always present (OpenAI's
  `ErrorResponse`; the native dialect uses the same shape so one client-side handler fits both).
- v2 (`/api/data/embedding/...`): `{"code", "message", "request_id"}` with Volcengine's numeric
  codes (1000003 invalid request, 1000001 unauthorized, 1000025 model not found; 1000029 and 1000028
  from the Volcengine SDK's table for rate limiting and server-side failures).

Engine errors (handler/engine/errors.py) are mapped here too, so no route decides a status.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any, Literal

from starlette.responses import JSONResponse

from handler.engine.errors import (
    CapabilityError,
    EngineError,
    InputError,
    InputTooLongError,
    ModelLoadError,
    TooManyTokensError,
)

Dialect = Literal["openai", "v2", "native"]

V2_PREFIX = "/api/data/embedding"
OPENAI_PREFIX = "/v1"


class ErrorKind(enum.Enum):
    INVALID_REQUEST = "invalid_request"
    UNAUTHORIZED = "unauthorized"
    NOT_FOUND = "not_found"  # an unknown URL
    MODEL_NOT_FOUND = "model_not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    OVERLOADED = "overloaded"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"
    TIMEOUT = "timeout"  # the server-side deadline passed (REQUEST_TIMEOUT_S, Lambda's time left)


STATUS: dict[ErrorKind, int] = {
    ErrorKind.INVALID_REQUEST: 400,
    ErrorKind.UNAUTHORIZED: 401,
    ErrorKind.NOT_FOUND: 404,
    ErrorKind.MODEL_NOT_FOUND: 404,
    ErrorKind.METHOD_NOT_ALLOWED: 405,
    ErrorKind.PAYLOAD_TOO_LARGE: 413,
    ErrorKind.OVERLOADED: 429,
    ErrorKind.UNAVAILABLE: 503,
    ErrorKind.INTERNAL: 500,
    ErrorKind.TIMEOUT: 504,
}

# OpenAI's `error.type` per kind (the official API uses these names).
OPENAI_TYPE: dict[ErrorKind, str] = {
    ErrorKind.INVALID_REQUEST: "invalid_request_error",
    ErrorKind.UNAUTHORIZED: "invalid_request_error",
    ErrorKind.NOT_FOUND: "invalid_request_error",
    ErrorKind.MODEL_NOT_FOUND: "invalid_request_error",
    ErrorKind.METHOD_NOT_ALLOWED: "invalid_request_error",
    ErrorKind.PAYLOAD_TOO_LARGE: "invalid_request_error",
    ErrorKind.OVERLOADED: "rate_limit_error",
    ErrorKind.UNAVAILABLE: "server_error",
    ErrorKind.INTERNAL: "server_error",
    ErrorKind.TIMEOUT: "server_error",
}

# Default `error.code` per kind, where the raiser gives none.
DEFAULT_CODE: dict[ErrorKind, str] = {
    ErrorKind.INVALID_REQUEST: "invalid_request",
    ErrorKind.UNAUTHORIZED: "invalid_api_key",
    ErrorKind.NOT_FOUND: "unknown_url",
    ErrorKind.MODEL_NOT_FOUND: "model_not_found",
    ErrorKind.METHOD_NOT_ALLOWED: "method_not_allowed",
    ErrorKind.PAYLOAD_TOO_LARGE: "payload_too_large",
    ErrorKind.OVERLOADED: "overloaded",
    ErrorKind.UNAVAILABLE: "service_unavailable",
    ErrorKind.INTERNAL: "internal_error",
    ErrorKind.TIMEOUT: "request_timeout",
}

V2_CODE: dict[ErrorKind, int] = {
    ErrorKind.INVALID_REQUEST: 1000003,
    ErrorKind.UNAUTHORIZED: 1000001,
    ErrorKind.NOT_FOUND: 1000003,
    ErrorKind.MODEL_NOT_FOUND: 1000025,
    ErrorKind.METHOD_NOT_ALLOWED: 1000003,
    ErrorKind.PAYLOAD_TOO_LARGE: 1000003,
    ErrorKind.OVERLOADED: 1000029,
    ErrorKind.UNAVAILABLE: 1000028,
    ErrorKind.INTERNAL: 1000028,
    ErrorKind.TIMEOUT: 1000028,
}

# Volcengine's documented message stems ("invalid request:%s", "unauthorized",
# "failed to calcTextEmbedding").
V2_STEM: dict[ErrorKind, str] = {
    ErrorKind.INVALID_REQUEST: "invalid request: ",
    ErrorKind.UNAUTHORIZED: "unauthorized: ",
    ErrorKind.NOT_FOUND: "invalid request: ",
    ErrorKind.MODEL_NOT_FOUND: "failed to calcTextEmbedding, ModelNotFoundException: ",
    ErrorKind.METHOD_NOT_ALLOWED: "invalid request: ",
    ErrorKind.PAYLOAD_TOO_LARGE: "invalid request: ",
    ErrorKind.OVERLOADED: "quota limited: ",
    ErrorKind.UNAVAILABLE: "service unavailable: ",
    ErrorKind.INTERNAL: "internal error: ",
    ErrorKind.TIMEOUT: "request timeout: ",
}


class ApiError(Exception):
    """An answer other than success. `param` names the request field at fault (OpenAI's `param`),
    `code` is the machine-readable reason (OpenAI's `code`; v2 uses its numeric table instead)."""

    def __init__(
        self,
        kind: ErrorKind,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ):
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.param = param
        self.code = code or DEFAULT_CODE[kind]
        self.headers = dict(headers or {})

    @property
    def status(self) -> int:
        return STATUS[self.kind]

    def __repr__(self) -> str:
        return f"ApiError({self.kind.name}, {self.message!r}, param={self.param!r})"


def invalid(message: str, *, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(ErrorKind.INVALID_REQUEST, message, param=param, code=code)


def from_engine_error(exc: EngineError) -> ApiError:
    """The engine's errors, mapped once: bad input 400, unloadable model 503."""
    if isinstance(exc, InputTooLongError):
        return ApiError(
            ErrorKind.INVALID_REQUEST,
            f"{exc} (send `truncate: true`, the default, to cut long inputs instead)",
            param=exc.param,
            code=exc.code,
        )
    if isinstance(exc, TooManyTokensError):
        return ApiError(
            ErrorKind.INVALID_REQUEST,
            f"This request has {exc.total} tokens; at most {exc.limit} are allowed per request. "
            "Send fewer or shorter inputs.",
            param=exc.param,
            code=exc.code,
        )
    if isinstance(exc, CapabilityError | InputError):
        return ApiError(ErrorKind.INVALID_REQUEST, str(exc), param=exc.param, code=exc.code)
    if isinstance(exc, ModelLoadError):
        return ApiError(ErrorKind.UNAVAILABLE, f"model not loaded: {exc}", code="model_not_loaded")
    return ApiError(ErrorKind.INTERNAL, f"engine error: {exc}")


def strip_prefix(path: str, prefix: str) -> str:
    if prefix and (path == prefix or path.startswith(prefix + "/")):
        return path[len(prefix) :] or "/"
    return path


def dialect_for(path: str, prefix: str = "") -> Dialect:
    """Which envelope a URL answers in; decided by path alone so that errors raised before
    routing (body too large, overload, auth, an unknown URL) still match the dialect."""
    local = strip_prefix(path, prefix)
    if local == OPENAI_PREFIX or local.startswith(OPENAI_PREFIX + "/"):
        return "openai"
    if local == V2_PREFIX or local.startswith(V2_PREFIX + "/"):
        return "v2"
    return "native"


def error_body(error: ApiError, dialect: Dialect, request_id: str) -> dict[str, Any]:
    if dialect == "v2":
        return {
            "code": V2_CODE[error.kind],
            "message": V2_STEM[error.kind] + error.message,
            "request_id": request_id,
        }
    return {
        "error": {
            "message": error.message,
            "type": OPENAI_TYPE[error.kind],
            "param": error.param,
            "code": error.code,
        }
    }


def render(error: ApiError, dialect: Dialect, request_id: str) -> JSONResponse:
    headers = dict(error.headers)
    if error.kind is ErrorKind.UNAUTHORIZED:
        headers.setdefault("WWW-Authenticate", "Bearer")
    return JSONResponse(
        error_body(error, dialect, request_id), status_code=error.status, headers=headers
    )
