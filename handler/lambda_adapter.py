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

import binascii
from typing import Any

from mangum.handlers import ALB, APIGateway, HTTPGateway
from mangum.handlers.utils import maybe_encode_body
from mangum.types import Scope

from handler.errors import invalid
from handler.middleware import PLATFORM_ERROR_SCOPE_KEY

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
