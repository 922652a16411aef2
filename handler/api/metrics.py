"""GET /metrics: the Prometheus exposition of handler/metrics.py's series, when the service runs
under uvicorn. It reveals traffic, so the app puts it behind the API key unless METRICS_PUBLIC."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from handler.errors import ApiError, ErrorKind
from handler.metrics import PrometheusMetrics

router = APIRouter(tags=["operations"])


@router.get(
    "/metrics",
    summary="Prometheus metrics (API key unless METRICS_PUBLIC)",
    response_model=None,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
def metrics(request: Request) -> Response:
    source = request.app.state.metrics
    if not isinstance(source, PrometheusMetrics):
        raise ApiError(
            ErrorKind.NOT_FOUND,
            "Prometheus metrics are off here (METRICS is not prometheus; on Lambda they go to "
            "CloudWatch as EMF).",
            code="metrics_off",
        )
    body, content_type = source.exposition()
    return Response(body, media_type=content_type)
