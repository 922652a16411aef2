"""What the three dialects share: the app's state, strict JSON body parsing, model lookup, limits,
sparse formats and a fast JSON writer for float arrays.

Dialect modules stay thin: parse -> check limits -> one engine call -> convert. Every check raises
an `ApiError`; the app renders it in the dialect's envelope.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal, TypeVar

import numpy as np
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response

from handler.engine.types import EmbeddingEngine, Encoded, FloatArray, ModelInfo, ModelRegistry
from handler.errors import ApiError, ErrorKind, invalid
from handler.logging import RECORD_SCOPE_KEY, RequestRecord, take_cold_start
from handler.settings import Settings

SparseFormat = Literal["token", "id", "indices_values"]
M = TypeVar("M", bound=BaseModel)


@dataclass
class ServiceState:
    settings: Settings
    registry: ModelRegistry | None
    load_error: str | None


def state_of(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.service
    return state


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


# ---- request bodies ------------------------------------------------------------------------------


def _loc(loc: Sequence[int | str]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out


def validation_message(exc: ValidationError, hints: Mapping[str, str]) -> ApiError:
    """One clear message for the first problem (pydantic lists one per union branch)."""
    first = exc.errors(include_url=False)[0]
    if first["type"] == "json_invalid":
        reason = first.get("ctx", {}).get("error", "invalid JSON")
        return invalid(
            f"We could not parse the JSON body of your request ({reason}). Send a JSON object, "
            "for example with `Content-Type: application/json`.",
            code="invalid_json",
        )
    loc = tuple(first["loc"])
    if not loc:
        return invalid("The request body must be a JSON object.", code="invalid_json")
    field = str(loc[0])
    if field in hints:
        return invalid(hints[field], param=field)
    # Drop pydantic's union-branch labels ("list[str]") from the path shown to the user.
    shown = [p for p in loc if isinstance(p, int) or "[" not in p]
    where = _loc(shown)
    if first["type"] == "missing":
        return invalid(f"'{where}' is required.", param=where)
    return invalid(f"Invalid value for '{where}': {first['msg']}.", param=where)


async def parse_body(request: Request, model: type[M], hints: Mapping[str, str]) -> M:
    """The JSON body, whatever the Content-Type says (curl -d sends form-urlencoded), validated.

    Parsed here rather than by FastAPI so that the API key is checked first (router dependency)
    and every failure is an ApiError in the dialect's envelope, never `{"detail": ...}`.
    """
    raw = await request.body()
    if not raw.strip():
        raise invalid("The request body is empty; send a JSON object.", code="invalid_json")
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise validation_message(exc, hints) from None


def json_body(model: type[M], hints: Mapping[str, str] | None = None) -> Callable[..., Any]:
    """A FastAPI dependency that yields the parsed body (see `parse_body`)."""
    fixed = dict(hints or {})

    async def dependency(request: Request) -> M:
        return await parse_body(request, model, fixed)

    dependency.__name__ = f"parse_{model.__name__}"
    result: Callable[[Request], Awaitable[M]] = dependency
    return result


# OpenAPI: request bodies are parsed by hand, so their schemas are registered here for /docs.
DOC_MODELS: list[type[BaseModel]] = []


def body_doc(model: type[BaseModel]) -> dict[str, Any]:
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


# ---- models --------------------------------------------------------------------------------------


def registry_of(state: ServiceState) -> ModelRegistry:
    if state.registry is None:
        raise ApiError(
            ErrorKind.UNAVAILABLE,
            f"The model is not loaded: {state.load_error or 'unknown reason'}",
            code="model_not_loaded",
        )
    return state.registry


def served_names(registry: ModelRegistry) -> str:
    return ", ".join(
        repr(e.info.id) + (f" (aliases: {', '.join(e.info.aliases)})" if e.info.aliases else "")
        for e in registry
    )


def find_model(state: ServiceState, name: str, *, param: str = "model") -> EmbeddingEngine:
    """A served model by id or alias, else 404 model_not_found (whatever ALLOW_ANY_MODEL says:
    this is for /models/{id} lookups)."""
    registry = registry_of(state)
    engine = registry.get(name)
    if engine is None:
        raise ApiError(
            ErrorKind.MODEL_NOT_FOUND,
            f"The model '{name}' does not exist. This service serves: {served_names(registry)}.",
            param=param,
        )
    return engine


def resolve_model(
    state: ServiceState, name: str | None, *, param: str = "model"
) -> EmbeddingEngine:
    """The engine for a request's `model`. None means the default model; an unknown name is a 404
    unless ALLOW_ANY_MODEL=true, when the default model answers any name."""
    registry = registry_of(state)
    if name is None:
        return registry.default
    engine = registry.get(name)
    if engine is not None:
        return engine
    if state.settings.allow_any_model:
        return registry.default
    return find_model(state, name, param=param)


# ---- limits --------------------------------------------------------------------------------------


def check_count(n: int, *, limit: int, param: str) -> None:
    if n == 0:
        raise invalid(f"'{param}' must not be empty.", param=param, code="empty_input")
    if n > limit:
        raise invalid(
            f"Too many inputs: {n} in one request; at most {limit} are allowed. Split the request.",
            param=param,
            code="too_many_inputs",
        )


def check_texts(texts: Sequence[str], *, limit: int, param: str, item: str) -> None:
    """Non-empty, not too many, and no empty string (OpenAI rejects them too: an empty text has
    no content to embed, and a silent "zero" vector would poison an index)."""
    check_count(len(texts), limit=limit, param=param)
    for index, text in enumerate(texts):
        if text == "":
            raise invalid(
                f"{item.format(index=index)} is an empty string; every input must have text.",
                param=param,
                code="empty_input",
            )


def max_length_for(state: ServiceState, info: ModelInfo, requested: int | None) -> int:
    """Tokens per input: the model's own limit, capped by MAX_INPUT_TOKENS and by the request."""
    limit = info.max_length
    if state.settings.max_input_tokens is not None:
        limit = min(limit, state.settings.max_input_tokens)
    if requested is not None:
        if requested < 1:
            raise invalid("'max_length' must be positive.", param="max_length")
        limit = min(limit, requested)
    return limit


def check_request_tokens(
    state: ServiceState,
    engine: EmbeddingEngine,
    texts: Sequence[str],
    max_length: int,
    *,
    param: str,
) -> None:
    """MAX_TOKENS_PER_REQUEST, counted after truncation, before any inference is paid for."""
    limit = state.settings.max_tokens_per_request
    if len(texts) * max_length <= limit:
        return  # cannot exceed it even if every input is cut at max_length: skip tokenizing
    total = sum(min(c, max_length) for c in engine.count_tokens(texts))
    if total > limit:
        raise_too_many_tokens(total, limit, param)


def raise_too_many_tokens(total: int, limit: int, param: str) -> None:
    raise invalid(
        f"This request has {total} tokens; at most {limit} are allowed per request. "
        "Send fewer or shorter inputs.",
        param=param,
        code="max_tokens_per_request",
    )


# ---- outputs -------------------------------------------------------------------------------------


def sparse_out(
    engine: EmbeddingEngine, weights: Mapping[int, float], fmt: SparseFormat
) -> dict[str, Any]:
    """One input's sparse weights in the asked format: token strings (the seeds' form), token ids
    as strings (FlagEmbedding's form), or {indices, values} sorted by index (Qdrant, Milvus)."""
    if fmt == "token":
        return {k: float(v) for k, v in engine.token_strings(weights).items()}
    if fmt == "id":
        return {str(k): float(v) for k, v in weights.items()}
    indices = sorted(weights)
    return {"indices": indices, "values": [float(weights[i]) for i in indices]}


def record_encoded(record: RequestRecord, info: ModelInfo, inputs: int, encoded: Encoded) -> None:
    record.model = info.id
    record.inputs = inputs
    record.tokens = encoded.total_tokens
    record.add_timings(encoded.timings_ms)
    record.batched_with = encoded.batched_with


def usage(tokens: int) -> dict[str, int]:
    return {"prompt_tokens": tokens, "total_tokens": tokens}


# ---- JSON ----------------------------------------------------------------------------------------


@lru_cache(maxsize=64)
def _row_format(n: int) -> str:
    # %.9g: 9 significant digits round-trip every float32 exactly, in ~40% fewer bytes than the
    # 17-digit repr of the same value widened to float64 (and ~3x faster than json.dumps).
    return "[" + ",".join(["%.9g"] * n) + "]"


def _array_json(array: FloatArray) -> str:
    if array.dtype.kind != "f":
        return json.dumps(array.tolist())
    if not np.isfinite(array).all():
        raise ApiError(ErrorKind.INTERNAL, "the model produced non-finite values")
    if array.ndim == 1:
        return _row_format(array.shape[0]) % tuple(array.tolist())
    return "[" + ",".join(_array_json(row) for row in array) + "]"


def _is_leaf(value: Any) -> bool:
    return not isinstance(value, dict | list | tuple | np.ndarray | np.generic)


def to_json(obj: Any) -> str:
    """JSON text for a response: numpy float arrays are written with `%.9g`, the rest by the
    json module. Dicts and lists of plain values go to json.dumps in one call."""
    if isinstance(obj, np.ndarray):
        return _array_json(obj)
    if isinstance(obj, dict):
        if all(_is_leaf(v) for v in obj.values()):
            return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
        return (
            "{"
            + ",".join(
                json.dumps(str(k), ensure_ascii=False) + ":" + to_json(v) for k, v in obj.items()
            )
            + "}"
        )
    if isinstance(obj, list | tuple):
        if all(_is_leaf(v) for v in obj):
            return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
        return "[" + ",".join(to_json(v) for v in obj) + "]"
    if isinstance(obj, np.generic):
        return json.dumps(obj.item())
    return json.dumps(obj, ensure_ascii=False)


class FastJSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return to_json(content).encode("utf-8")
