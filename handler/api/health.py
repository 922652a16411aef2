"""Public routes: GET /health (no API key; 503 with the reason when the service cannot serve),
GET /health/live (the process answers: a liveness probe), GET /health/ready (models loaded, key
source read, not shutting down: a readiness or startup probe) and GET / (a short description of the
service and of the models it really serves). All answer HEAD too, which uptime checkers send."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import JSONResponse

from handler.api.routing import service_of
from handler.auth import KeyChecker
from handler.engine.types import ModelInfo

router = APIRouter(tags=["health"])

SERVICE = "bge-m3-serverless"


class HealthModel(BaseModel):
    id: str
    aliases: list[str]
    sha256: str
    recipe: str
    precision: str
    device: str


class Health(BaseModel):
    status: Literal["healthy", "unhealthy"]
    model_loaded: bool
    device: str
    models: list[HealthModel]
    auth: bool
    error: str | None = None


@router.head("/health", summary="The same as GET, without a body (public)", response_model=None)
@router.get(
    "/health",
    summary="Liveness and readiness (public)",
    response_model=None,
    responses={200: {"model": Health}, 503: {"model": Health}},
)
async def health(request: Request) -> JSONResponse:
    return _health(request)


def readiness_problems(request: Request) -> list[str]:
    """Why this process cannot serve now; empty when it can."""
    service = service_of(request)
    key_checker: KeyChecker = request.app.state.key_checker
    problems: list[str] = []
    if service.registry is None:
        problems.append(f"model not loaded: {service.load_error or 'unknown reason'}")
    if key_checker.unavailable_reason is not None:
        problems.append(key_checker.unavailable_reason)
    drain = getattr(request.app.state, "drain", None)
    if drain is not None and drain.draining:
        problems.append("shutting down")
    return problems


class Live(BaseModel):
    status: Literal["alive"]


@router.head(
    "/health/live", summary="The same as GET, without a body (public)", response_model=None
)
@router.get(
    "/health/live",
    summary="Liveness: the process answers (public)",
    response_model=None,
    responses={200: {"model": Live}},
)
async def live() -> JSONResponse:
    # Nothing else is checked: a process without its model is not fixed by a restart loop, and
    # readiness already keeps traffic away from it.
    return JSONResponse({"status": "alive"})


@router.head(
    "/health/ready", summary="The same as GET, without a body (public)", response_model=None
)
@router.get(
    "/health/ready",
    summary="Readiness: models loaded, API keys read, not shutting down (public)",
    response_model=None,
    responses={200: {"model": Health}, 503: {"model": Health}},
)
async def ready(request: Request) -> JSONResponse:
    return _health(request)


def _health(request: Request) -> JSONResponse:
    service = service_of(request)
    key_checker: KeyChecker = request.app.state.key_checker
    registry = service.registry
    problems = readiness_problems(request)
    models: list[dict[str, Any]] = []
    for engine in registry or ():
        info = engine.info
        models.append(
            {
                "id": info.id,
                "aliases": list(info.aliases),
                "sha256": info.fingerprint,
                "recipe": info.recipe,
                "precision": info.precision,
                "device": info.device,
            }
        )
    body: dict[str, Any] = {
        "status": "unhealthy" if problems else "healthy",
        "model_loaded": registry is not None,
        "device": models[0]["device"] if models else service.settings.device,
        "models": models,
        "auth": key_checker.enabled,
    }
    if problems:
        body["error"] = "; ".join(problems)
    return JSONResponse(body, status_code=503 if problems else 200)


def outputs(info: ModelInfo) -> list[str]:
    caps = info.capabilities
    return [
        name
        for name, on in (("dense", caps.dense), ("sparse", caps.sparse), ("ColBERT", caps.colbert))
        if on
    ]


def describe(infos: list[ModelInfo], load_error: str | None) -> str:
    """What is served, from the models themselves: a dense-only model is not sold as BGE-M3."""
    if infos:
        served = "; ".join(f"{info.id} ({', '.join(outputs(info))})" for info in infos)
        what = f"Embeddings from {served}"
    else:
        what = f"Embeddings (no model loaded: {load_error or 'unknown reason'})"
    return (
        f"{what} on onnxruntime, in three dialects: OpenAI, Volcengine embedding v2 and "
        "native BGE-M3."
    )


@router.head("/", summary="The same as GET, without a body (public)", response_model=None)
@router.get("/", summary="What this service is (public)", response_model=None)
async def root(request: Request) -> JSONResponse:
    service = service_of(request)
    prefix = service.settings.route_prefix
    infos = [e.info for e in service.registry or ()]
    return JSONResponse(
        {
            "service": SERVICE,
            "description": describe(infos, service.load_error),
            "models": [info.id for info in infos],
            "outputs": {info.id: outputs(info) for info in infos},
            "routes": {
                "openai": [f"POST {prefix}/v1/embeddings", f"GET {prefix}/v1/models"],
                "v2": [f"POST {prefix}/api/data/embedding/version/2"],
                "native": [
                    f"POST {prefix}/embeddings",
                    f"POST {prefix}/score",
                    f"GET {prefix}/models",
                ],
                "health": [
                    f"GET {prefix}/health",
                    f"GET {prefix}/health/live",
                    f"GET {prefix}/health/ready",
                ],
            },
            "docs": f"{prefix}/docs",
        }
    )
