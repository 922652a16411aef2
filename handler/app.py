"""The one FastAPI app: `create_app(settings, engine)` wires the `Service`, the dialects' routers,
auth, error handlers and the service middleware. The same app runs under Mangum (Lambda) and
uvicorn (Cloud Run, GPU, local).

`engine` is the ModelRegistry to serve (tests inject fakes); handler/main.py builds the real one
once per process. With no registry the app still starts: /health answers 503 with `load_error`,
every other route a 503 in its dialect's envelope.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import Depends, FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response

from handler.api import health, native, openai, rerank, tokenize, v2
from handler.api import metrics as metrics_route
from handler.api.docs import documented_app
from handler.api.routing import compute_paths, methods_at, record_of, service_of
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
from handler.metrics import Metrics, metrics_for
from handler.middleware import Drain, ServiceMiddleware
from handler.service import Service
from handler.settings import Settings

log = logging.getLogger(__name__)


def create_app(
    settings: Settings | None = None,
    engine: ModelRegistry | None = None,
    load_error: str | None = None,
    key_checker: KeyChecker | None = None,
    metrics: Metrics | None = None,
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
    app = documented_app(
        title="BGE-M3 embeddings",
        version="0.1.0",
        description="Dense embeddings, and sparse and ColBERT ones from models that have them, "
        "in the OpenAI, v2 and native dialects.",
        prefix=prefix,
    )
    app.state.service = Service(settings, registry, load_error)
    app.state.key_checker = key_checker

    protected = [Depends(require_api_key)]
    # The dialects' routers: every route behind the API key.
    api_routers = (openai.router, v2.router, native.router, rerank.router, tokenize.router)
    protected_routes = {id(r) for router in api_routers for r in router.routes}
    if not settings.metrics_public:
        protected_routes |= {id(r) for r in metrics_route.router.routes}
    for router in api_routers:
        app.include_router(router, prefix=prefix, dependencies=protected)
    app.include_router(health.router, prefix=prefix)
    app.state.metrics = metrics if metrics is not None else metrics_for(settings)
    app.state.drain = Drain()  # handler/main.py begins it on SIGTERM
    app.include_router(
        metrics_route.router,
        prefix=prefix,
        dependencies=[] if settings.metrics_public else protected,
    )
    # The routes as the routers declare them (without the prefix), for the middleware and 405s.
    routes = [
        r for router in (*api_routers, health.router, metrics_route.router) for r in router.routes
    ]
    app.state.api_routes = routes
    app.state.request_limits = {
        "openai": settings.max_inputs_openai,
        "v2": settings.max_inputs_v2,
        "native": settings.max_inputs_native,
        "allow_token_ids": settings.allow_token_ids,
        "default_sparse": registry is not None and registry.default.info.capabilities.sparse,
        "default_colbert": registry is not None and registry.default.info.capabilities.colbert,
        "dims": registry.default.info.dims if registry is not None else None,
        "vocab_size": registry.default.info.vocab_size if registry is not None else None,
        # int8 and uint8 need the build's calibrated ranges (an engine without the property, one
        # that failed to load, has none).
        "scalar_types": registry is not None
        and getattr(registry.default, "embedding_ranges", None) is not None,
    }
    app.state.error_statuses = error_statuses(
        routes, prefix, compute_paths(routes, prefix), protected_routes
    )

    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(EngineError, _engine_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_middleware(
        ServiceMiddleware,
        settings=settings,
        compute_paths=compute_paths(routes, prefix),
        metrics=app.state.metrics,
        drain=app.state.drain,
    )

    log.info(
        "app ready: models=%s auth=%s prefix=%r",
        [e.info.id for e in registry] if registry is not None else f"none ({load_error})",
        key_checker.state,
        prefix,
    )
    return app


# Any route can answer these: Content-Length over MAX_REQUEST_BYTES, a bug, a missed deadline.
ANY_ROUTE = frozenset({413, 500, 504})
NEEDS_MODEL = frozenset({"/v1/models", "/models", "/models/{model_id}", "/v1/models/{model_id}"})


def error_statuses(
    routes: list[Any], prefix: str, compute: frozenset[str], protected: set[int]
) -> dict[tuple[str, str], tuple[frozenset[int], Dialect]]:
    """Per (path, method): the error statuses the route can answer, and its dialect, for the
    OpenAPI document."""
    out: dict[tuple[str, str], tuple[frozenset[int], Dialect]] = {}
    for route in routes:
        if not isinstance(route, APIRoute):
            continue
        local = route.path_format  # without converters: /models/{model_id}, as documented
        path = prefix + local
        codes = set(ANY_ROUTE)
        if id(route) in protected:
            codes |= {401, 503}  # 503: keys configured but unreadable (fails closed)
        if prefix + route.path in compute:
            codes |= {400, 404, 429, 503}
        if local in NEEDS_MODEL:
            codes |= {503} | ({404} if "{" in local else set())
        if local == "/metrics":
            codes |= {404}  # METRICS is not prometheus
        for method in route.methods or ():
            out[(path, method)] = (frozenset(codes), dialect_for(path, prefix))
    return out


# ---- exception handlers --------------------------------------------------------------------------


def _respond(request: Request, error: ApiError) -> Response:
    record = record_of(request)
    record.error_code = error.code
    prefix = service_of(request).settings.route_prefix
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
        allow = allowed_methods(request, exc)
        error = ApiError(
            ErrorKind.METHOD_NOT_ALLOWED,
            f"Method not allowed: {where}. Allowed: {allow}.",
            headers={"Allow": allow},
        )
    elif exc.status_code == 413:
        error = ApiError(ErrorKind.PAYLOAD_TOO_LARGE, str(exc.detail))
    elif exc.status_code < 500:
        error = invalid(str(exc.detail))
    else:
        error = ApiError(ErrorKind.INTERNAL, str(exc.detail))
    return _respond(request, error)


def allowed_methods(request: Request, exc: StarletteHTTPException) -> str:
    """What the `Allow` header must list: every method served at this path. Starlette names the
    methods of the first route that matched the path only."""
    local = strip_prefix(request.url.path, service_of(request).settings.route_prefix)
    methods = methods_at(local, request.app.state.api_routes)
    methods.update(m.strip() for m in (exc.headers or {}).get("Allow", "").split(",") if m.strip())
    return ", ".join(sorted(methods))
