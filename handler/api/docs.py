"""The API's own documentation: /docs (Swagger UI served from this app, so it works without
internet) and /openapi.json with the request bodies that the dialects parse by hand."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel

# Request bodies are parsed by hand (handler/api/body.py), so FastAPI does not see their
# schemas; the routes register them here for /docs.
DOC_MODELS: list[type[BaseModel]] = []


def body_doc(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` for a route whose JSON body is `model`."""
    if model not in DOC_MODELS:
        DOC_MODELS.append(model)
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def add_doc_schemas(openapi: dict[str, Any]) -> None:
    schemas = openapi.setdefault("components", {}).setdefault("schemas", {})
    for model in DOC_MODELS:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema


def documented_app(*, title: str, version: str, description: str, prefix: str) -> FastAPI:
    """A FastAPI app whose /docs page loads Swagger UI's script and styles from this app (the
    fastapi-offline package ships them) instead of a CDN, so it is not blank offline."""
    app = FastAPIOffline(
        title=title,
        version=version,
        description=description,
        docs_url=f"{prefix}/docs",
        redoc_url=None,
        openapi_url=f"{prefix}/openapi.json",
        static_url=f"{prefix}/docs/assets",
    )

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
    return app
