"""Where the path around the model goes: one request's timeline through the Lambda handler.

`bench.overhead` says how much the path around the model costs; this says where. It wraps the
boundaries one request crosses (the adapter's call into the app, the service middleware and the
app inside it, the hand-off to a model thread and back, the service and the engine, the response
reaching the middleware, the request log line) with a clock reading each, calls the handler
`--reps` times with the 9-token query and prints the p50 of every segment between two readings.
The segments of one request add up to its wall time minus the stages its headers report (the
figure `bench.overhead` reports), so nothing is left out.

Two ways to make the calls colder, to see how much of the path is the caches rather than the code:
`--alternate` runs the engine directly between two handler calls (as `bench.overhead` does by
default), `--evict-mb N` reads N MiB of memory instead (no forward pass, only the caches swept).

    python -m bench.overhead_split MODEL_DIR [--reps 300] [--alternate] [--evict-mb N] [--out FILE]

The wrappers replace functions on their classes for the life of this process: run it on its own,
never inside the service.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import Json, percentile
from bench.overhead import (
    direct_call,
    entry_point,
    lambda_environment,
    nine_tokens,
    stages_ms,
)
from bench.worker import LambdaContext, lambda_event

# Consecutive clock readings of one request, in the order they are taken; a segment is the time
# from one to the next. "stages" is not a reading: the engine's own stages (the response's
# x-*-time headers) are taken out of the encode call's segment.
READINGS = (
    "call",  # the Lambda handler called (Mangum builds the scope, starts its cycle)
    "app",  # the ASGI app (FastAPI's middleware stack) entered
    "middleware",  # the service middleware entered
    "app_task",  # the app inside it entered, on its own task (routing and body next)
    "route",  # the model route hands its call to a model thread
    "model_thread",  # the call starts there
    "service",  # Service.embed
    "engine",  # Engine.encode
    "engine_done",  # its stages and the engine's own work around them done
    "service_done",
    "model_thread_done",  # the route built its response
    "back_on_loop",  # the event loop has the route's result
    "response_start",  # the response's head reached the middleware
    "response_done",  # ... and its body
    "app_task_done",
    "log",  # the request's log line is being written
    "log_done",
    "middleware_done",  # metrics and the rest of the middleware
    "app_done",
    "returned",  # the handler returned Lambda's response
)
SEGMENTS = tuple(f"{a} -> {b}" for a, b in itertools.pairwise(READINGS))


def instrument(handler: Any, clock: dict[str, float]) -> None:
    """Wrap the boundaries each reading names; each wrapper writes perf_counter() into `clock`."""
    from handler import middleware
    from handler.engine.engine import Engine
    from handler.model_threads import ModelThreads
    from handler.service import Service

    def read(name: str) -> None:
        clock[name] = time.perf_counter()

    def around(cls: Any, attr: str, before: str, after: str) -> None:
        inner = getattr(cls, attr)

        @functools.wraps(inner)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            read(before)
            try:
                return inner(*args, **kwargs)
            finally:
                read(after)

        setattr(cls, attr, wrapped)

    def async_around(call: Callable[..., Any], before: str, after: str) -> Callable[..., Any]:
        async def wrapped(*args: Any) -> None:
            read(before)
            try:
                await call(*args)
            finally:
                read(after)

        return wrapped

    handler.app = async_around(handler.app, "app", "app_done")

    service_middleware = middleware.ServiceMiddleware.__call__

    async def middleware_call(self: Any, scope: Any, receive: Any, send: Any) -> None:
        if not getattr(self, "_split_wrapped", False):
            self.app = async_around(self.app, "app_task", "app_task_done")
            self._split_wrapped = True
        read("middleware")
        try:
            await service_middleware(self, scope, receive, send)
        finally:
            read("middleware_done")

    middleware.ServiceMiddleware.__call__ = middleware_call  # type: ignore[method-assign]

    threads_run = ModelThreads.run

    async def run(self: Any, call: Callable[[], Any]) -> Any:
        def on_thread() -> Any:
            read("model_thread")
            try:
                return call()
            finally:
                read("model_thread_done")

        read("route")
        try:
            return await threads_run(self, on_thread)
        finally:
            read("back_on_loop")

    ModelThreads.run = run  # type: ignore[method-assign]

    reply_send = middleware._Reply.send

    async def send(self: Any, message: Any) -> None:
        if message["type"] == "http.response.start":
            read("response_start")
        await reply_send(self, message)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            read("response_done")

    middleware._Reply.send = send  # type: ignore[method-assign]

    log_request = middleware.log_request  # type: ignore[attr-defined]

    def logged(*args: Any) -> None:
        read("log")
        log_request(*args)
        read("log_done")

    middleware.log_request = logged  # type: ignore[attr-defined,assignment]
    around(Service, "embed", "service", "service_done")
    around(Engine, "encode", "engine", "engine_done")


def segments(clock: dict[str, float], engine_stages_ms: float) -> list[float]:
    """One request's segments in microseconds, the engine's stages taken out of its own."""
    out = []
    for a, b in itertools.pairwise(READINGS):
        us = (clock[b] - clock[a]) * 1e6
        if a == "engine":
            us -= engine_stages_ms * 1000.0
        out.append(us)
    return out


def measure(model: Path, reps: int, *, alternate: bool, evict_mib: int) -> Json:
    import numpy as np

    handler, engine, settings = entry_point()
    clock: dict[str, float] = {}
    instrument(handler, clock)
    text = nine_tokens(model)
    event, context = lambda_event([text]), LambdaContext()
    direct = direct_call(engine, text, settings)
    sweep = np.ones(evict_mib * 2**20 // 8) if evict_mib else None
    for _ in range(10):
        handler(dict(event), context)
    rows: list[list[float]] = []
    for _ in range(reps):
        if alternate:
            direct()
        if sweep is not None:
            sweep.sum()
        clock.clear()
        clock["call"] = time.perf_counter()
        response = handler(dict(event), context)
        clock["returned"] = time.perf_counter()
        if response.get("statusCode") != 200:
            raise RuntimeError(f"the Lambda handler answered {response.get('statusCode')}")
        rows.append(segments(clock, stages_ms(response.get("headers") or {})))
    columns = list(zip(*rows, strict=True))
    return {
        "path": "Lambda handler (Function URL event) -> POST /v1/embeddings, dense only",
        "n": reps,
        "alternating": alternate,
        "evict_mib": evict_mib,
        "segments_p50_us": {
            name: round(percentile(list(col), 50), 1)
            for name, col in zip(SEGMENTS, columns, strict=True)
        },
        "wall_minus_stages_p50_us": round(percentile([sum(r) for r in rows], 50), 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.overhead_split", description=__doc__)
    parser.add_argument("model", type=Path, help="a directory made by python -m model_build")
    parser.add_argument("--reps", type=int, default=300)
    parser.add_argument(
        "--alternate", action="store_true", help="the engine called directly between two calls"
    )
    parser.add_argument(
        "--evict-mb", type=int, default=0, help="read this many MiB of memory between two calls"
    )
    parser.add_argument("--out", type=Path, help="also write the figures here, as JSON")
    args = parser.parse_args(argv)
    lambda_environment(args.model)
    result = measure(args.model, args.reps, alternate=args.alternate, evict_mib=args.evict_mb)
    width = max(map(len, SEGMENTS))
    # stderr: stdout carries the request log lines.
    for name, us in result["segments_p50_us"].items():
        print(f"{name:<{width}}  {us:8.1f} us", file=sys.stderr)
    total = result["wall_minus_stages_p50_us"]
    print(f"{'wall minus stages':<{width}}  {total:8.1f} us (p50 of the sums)", file=sys.stderr)
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
