"""What a route gets from the app (its `Service` and its request record), and the mark that
tells the app which routes run the model.

Where a route runs: one that runs the model is a plain function marked `@compute` (the service's
model threads); one that only reads the process's state (health, the model lists) is `async def`,
on the event loop, since as a plain function FastAPI would run it on an anyio thread, which under
Mangum is started and ended by every invocation; /metrics stays a plain function, because the
collectors it runs must not hold the loop."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable
from typing import Any, TypeVar, cast

from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.routing import BaseRoute

from handler.logging import RECORD_SCOPE_KEY, RequestRecord, take_cold_start
from handler.service import Service

F = TypeVar("F", bound=Callable[..., Any])

_COMPUTE_MARK = "_runs_the_model"


def service_of(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


def record_of(request: Request) -> RequestRecord:
    record = request.scope.get(RECORD_SCOPE_KEY)
    if not isinstance(record, RequestRecord):  # only without the app's middleware (unit use)
        record = RequestRecord(
            request_id="-",
            method=request.method,
            path=request.url.path,
            dialect="native",
            cold_start=take_cold_start(),
        )
        request.scope[RECORD_SCOPE_KEY] = record
    return record


def compute(endpoint: F) -> F:
    """Marks an endpoint that runs the model: its requests count against
    MAX_CONCURRENT_REQUESTS (the cheap routes, /health and the model lists, never wait), and it
    runs, whole, on the service's model threads (handler/model_threads.py), which last as long as
    the process, instead of on anyio's, which under Mangum end with each Lambda invocation.

    The endpoint is a plain function with a `request` parameter; what FastAPI gets is a coroutine
    with the same signature (FastAPI reads it through `__wrapped__`) that hands the call over."""
    if (
        inspect.iscoroutinefunction(endpoint)
        or "request" not in inspect.signature(endpoint).parameters
    ):
        raise TypeError(f"{endpoint.__name__}: a model route is a plain function taking `request`")

    @functools.wraps(endpoint)
    async def on_model_thread(**params: Any) -> Any:
        threads = service_of(params["request"]).threads
        return await threads.run(functools.partial(endpoint, **params))

    setattr(on_model_thread, _COMPUTE_MARK, True)
    return cast(F, on_model_thread)


def compute_paths(routes: Iterable[BaseRoute], prefix: str) -> frozenset[str]:
    """The full paths of the routes (as their router declares them, without `prefix`) whose
    endpoint is marked by `compute`."""
    return frozenset(
        prefix + route.path
        for route in routes
        if isinstance(route, APIRoute) and getattr(route.endpoint, _COMPUTE_MARK, False)
    )


def methods_at(local_path: str, routes: Iterable[BaseRoute]) -> set[str]:
    """Every method the routes (as their router declares them) serve at this path. One path can
    have a route per method, and a 405's `Allow` header must list them all."""
    return {
        method
        for route in routes
        if isinstance(route, APIRoute) and route.path_regex.match(local_path)
        for method in route.methods or ()
    }
