"""One JSON log line per request, and the timing headers that mirror it.

The line goes to stdout through its own logger (`bge_m3.request`, not propagated), formatted as
bare JSON: CloudWatch and Cloud Run both parse it as structured (`severity` and `message` are Cloud
Run's field names). It carries the request id (Lambda's `aws_request_id` when Mangum passes the
context, else a fresh uuid), the route, model, number of inputs, tokens, per-stage timings from the
engine (`Encoded.timings_ms`) plus the total, `batched_with` (how many other requests shared its
forward passes under micro-batching), `cold_start`: whether this was the first request
this process served, and `restore`: whether that cold start resumed a SnapStart snapshot. Never
the request body, never headers, so never an API key.

Headers: `x-request-id`, `x-total-time` and `x-<stage>-time` for each engine stage (milliseconds),
in the spirit of TEI's `x-inference-time`.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from handler.errors import Dialect

REQUEST_LOGGER = "bge_m3.request"
RECORD_SCOPE_KEY = "bge_m3.record"

_cold = True
_restored = False  # this environment was resumed from a SnapStart snapshot
_cold_lock = threading.Lock()


def take_cold_start() -> bool:
    """True for the first request after the container started, and again for the first after
    each resume from a SnapStart snapshot (see mark_restored); False for every other."""
    global _cold
    with _cold_lock:
        was, _cold = _cold, False
    return was


def mark_restored() -> None:
    """Called after a SnapStart restore (handler/snapstart.py): the snapshot holds the flag as
    the routes' warm-up left it (taken), but the next request is this environment's first, and
    its log line says it was a restore."""
    global _cold, _restored
    with _cold_lock:
        _cold = _restored = True


def restored_from_snapshot() -> bool:
    return _restored


@dataclass
class RequestRecord:
    """What one request did; filled in by the middleware and the route, logged once at the end."""

    request_id: str
    method: str
    path: str
    dialect: Dialect
    cold_start: bool
    route: str | None = None
    model: str | None = None
    inputs: int | None = None
    tokens: int | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)
    batched_with: int | None = None  # other requests that shared its forward passes
    # Per-request counts a route reports when it has them (inputs truncated, shared, cached).
    counts: dict[str, int] = field(default_factory=dict)
    status: int = 0
    error_code: str | None = None
    response_bytes: int | None = None

    def add_timings(self, timings: dict[str, float]) -> None:
        for stage, ms in timings.items():
            self.timings_ms[stage] = self.timings_ms.get(stage, 0.0) + float(ms)

    def as_log(self, total_ms: float) -> dict[str, Any]:
        severity = "ERROR" if self.status >= 500 else "WARNING" if self.status >= 400 else "INFO"
        return {
            "severity": severity,
            "message": f"{self.method} {self.route or self.path} {self.status}",
            "request_id": self.request_id,
            "method": self.method,
            "route": self.route,
            "path": self.path,
            "dialect": self.dialect,
            "status": self.status,
            "model": self.model,
            "inputs": self.inputs,
            "tokens": self.tokens,
            "timings_ms": {
                **{k: round(v, 3) for k, v in self.timings_ms.items()},
                "total": round(total_ms, 3),
            },
            "batched_with": self.batched_with,
            **self.counts,
            "cold_start": self.cold_start,
            # The cold start was a resume from a SnapStart snapshot, not a fresh init.
            "restore": self.cold_start and restored_from_snapshot(),
            "error_code": self.error_code,
            "response_bytes": self.response_bytes,
        }


def request_id_from_scope(scope: Mapping[str, Any]) -> str:
    """Lambda's request id when Mangum put the context in the scope, else a new uuid."""
    context = scope.get("aws.context")
    aws_id = getattr(context, "aws_request_id", None)
    if isinstance(aws_id, str) and aws_id:
        return aws_id
    return uuid.uuid4().hex


_HEADER_SAFE = re.compile(r"[^a-z0-9-]+")


def timing_headers(record: RequestRecord, total_ms: float) -> list[tuple[bytes, bytes]]:
    headers = [(b"x-request-id", record.request_id.encode("latin-1", "replace"))]
    for stage, ms in record.timings_ms.items():
        name = _HEADER_SAFE.sub("-", stage.lower()).strip("-")
        if name:
            headers.append((f"x-{name}-time".encode(), f"{ms:.3f}".encode()))
    headers.append((b"x-total-time", f"{total_ms:.3f}".encode()))
    return headers


def json_line(payload: Mapping[str, Any]) -> str:
    """A log line's JSON, written by orjson (compact, UTF-8 as it is): about a tenth of the
    json module's time, which a request pays twice (this line and the metrics document).
    Anything orjson does not know is written as its str()."""
    return orjson.dumps(payload, default=str).decode()


class _JsonLineFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload = getattr(record, "payload", None)
        if isinstance(payload, dict):
            return json_line(payload)
        return json_line({"severity": record.levelname, "message": record.getMessage()})


def request_logger() -> logging.Logger:
    """The per-request logger, configured once: JSON lines on stdout, not propagated (Lambda's
    root handler would prefix each line and break the JSON)."""
    logger = logging.getLogger(REQUEST_LOGGER)
    if not any(getattr(h, "_bge_m3", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(_JsonLineFormatter())
        handler._bge_m3 = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False
        logger.setLevel(logging.INFO)
    return logger


def log_request(record: RequestRecord, total_ms: float) -> None:
    payload = record.as_log(total_ms)
    level = logging.ERROR if record.status >= 500 else logging.INFO
    request_logger().log(level, payload["message"], extra={"payload": payload})
