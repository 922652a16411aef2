"""The API's own documentation: /docs (Swagger UI served from this app, so it works without
internet) and /openapi.json with the request bodies that the dialects parse by hand."""

from __future__ import annotations

import copy
import itertools
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel

from handler.api.body import WEIGHT_MAX
from handler.engine.types import HEADS


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorEnvelope(BaseModel):
    """The OpenAI and native dialects' error body (handler/errors.py)."""

    error: ErrorDetail


class V2Error(BaseModel):
    """The v2 dialect's error body: Volcengine's numeric code (handler/errors.py)."""

    code: int
    message: str
    request_id: str


# What each status means, for the documented responses.
STATUS_TEXT = {
    400: "Invalid request (bad JSON, empty or too many inputs, too many tokens, ...)",
    401: "Missing or wrong API key",
    404: "Unknown model",
    413: "Request or response too large",
    429: "Too many requests in progress (Retry-After says when to retry)",
    500: "Internal error",
    503: "Model not loaded, API keys unreadable, or shutting down",
    504: "The request did not finish before its deadline",
}

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


def add_error_responses(
    openapi: dict[str, Any], statuses: dict[tuple[str, str], tuple[frozenset[int], str]]
) -> None:
    """Every status an operation can answer, with its dialect's envelope as the schema; FastAPI's
    422 goes (the app answers validation failures with 400)."""
    schemas = openapi.setdefault("components", {}).setdefault("schemas", {})
    for model in (ErrorDetail, ErrorEnvelope, V2Error):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    for path, operations in openapi.get("paths", {}).items():
        for method, operation in operations.items():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            codes, dialect = statuses.get((path, method.upper()), (frozenset(), "native"))
            envelope = "V2Error" if dialect == "v2" else "ErrorEnvelope"
            for status in sorted(codes):
                responses.setdefault(
                    str(status),
                    {
                        "description": STATUS_TEXT.get(status, "Error"),
                        "content": {
                            "application/json": {
                                "schema": {"$ref": f"#/components/schemas/{envelope}"}
                            }
                        },
                    },
                )


def _texts(limit: int) -> dict[str, Any]:
    """A non-empty string, or 1..limit non-empty strings: what Service.check_texts enforces."""
    text = {"type": "string", "minLength": 1}
    return {"anyOf": [text, {"type": "array", "items": text, "minItems": 1, "maxItems": limit}]}


def _not_all_off(switches: dict[str, bool]) -> dict[str, Any]:
    """At least one output on: all off is a 400 ("Ask for at least one of ..."). `switches` maps
    each switch to its default; a switch that defaults to off is off when absent too. null means
    the default as well (the sparse switches: on when the default model has sparse weights)."""
    off: dict[str, Any] = {
        name: {"const": False} if on else {"enum": [False, None]} for name, on in switches.items()
    }
    return {"not": {"required": [n for n, on in switches.items() if on], "properties": off}}


# max_length counts <s> and </s>: below 3 no token of the text fits, and the engine says so.
MIN_MAX_LENGTH = 3


def _caseless(word: str) -> str:
    return "".join(f"[{c.upper()}{c}]" for c in word)


def _mode_pattern(sets: list[tuple[str, ...]]) -> str:
    """A rerank `mode` naming exactly one of `sets`: its components in any order, each once,
    joined by '+', case-blind, with blanks around each (parse_mode strips and lowercases)."""
    forms = [
        r"\+".join(rf"\s*{_caseless(part)}\s*" for part in order)
        for components in sets
        for order in itertools.permutations(components)
    ]
    return "^(?:" + "|".join(forms) + ")$"


def _one_positive(indices: list[int]) -> dict[str, Any]:
    """An array with a positive item at one of `indices` at least."""
    return {
        "anyOf": [
            {"prefixItems": [*({} for _ in range(i)), {"exclusiveMinimum": 0}]} for i in indices
        ]
    }


def _weights(schema: dict[str, Any]) -> None:
    """Three finite non-negative weights (WEIGHT_MAX bounds each, so that their sum stays finite)
    with a positive sum, as check_weights enforces."""
    schema.update(minItems=3, maxItems=3, contains={"exclusiveMinimum": 0})
    schema["items"] = {"type": "number", "minimum": 0, "maximum": WEIGHT_MAX}


def _rerank_rules(schema: dict[str, Any], limit: int, field: str, documents: bool) -> None:
    """A non-empty query; 1..limit non-empty texts; a known `mode`; weights that give a combined
    mode's components a positive sum (rank_documents refuses zero)."""
    props = schema["properties"]
    props["query"]["minLength"] = 1
    text = {"type": "string", "minLength": 1}
    document = {"$ref": "#/components/schemas/RerankDocument"}
    items: dict[str, Any] = {"anyOf": [text, document]} if documents else text
    props[field].update(items=items, minItems=1, maxItems=limit)
    sets = [c for n in range(1, 4) for c in itertools.combinations(HEADS, n)]
    for branch in props["mode"].get("anyOf", []):
        if branch.get("type") == "string":
            branch["pattern"] = _mode_pattern(sets)
    _weights(props["weights"])
    pairs = list(itertools.combinations(range(3), 2))
    schema["allOf"] = [
        {
            "if": {
                "required": ["mode"],
                "properties": {
                    "mode": {
                        "type": "string",
                        "pattern": _mode_pattern([tuple(HEADS[i] for i in pair)]),
                    }
                },
            },
            "then": {"properties": {"weights": _one_positive(list(pair))}},
        }
        for pair in pairs
    ]
    for branch in props.get("max_tokens_per_doc", {}).get("anyOf", []):
        if branch.get("type") == "integer":
            branch["minimum"] = MIN_MAX_LENGTH


def _native_cohere_body(openapi: dict[str, Any], limit: int) -> None:
    """/v2/rerank's body with the native dialect's document limit, where it differs from the
    OpenAI dialect's (/v1/rerank)."""
    schemas = openapi["components"]["schemas"]
    body = copy.deepcopy(schemas["CohereRerankRequest"])
    body["properties"]["documents"]["maxItems"] = limit
    body["title"] = "CohereRerankRequestNative"
    schemas["CohereRerankRequestNative"] = body
    for path, operations in openapi.get("paths", {}).items():
        if path.endswith("/v2/rerank") and "post" in operations:
            content = operations["post"]["requestBody"]["content"]["application/json"]
            content["schema"] = {"$ref": "#/components/schemas/CohereRerankRequestNative"}


def _embedding_types(props: dict[str, Any], scalar: bool) -> None:
    """At least one type; int8 and uint8 only from a model with calibrated ranges."""
    kinds = [k for k in ("float", "int8", "uint8", "binary", "ubinary") if scalar or "int" not in k]
    for branch in props.get("embedding_types", {}).get("anyOf", []):
        if branch.get("type") == "array":
            branch.update(minItems=1, items={"type": "string", "enum": kinds})


def add_request_constraints(openapi: dict[str, Any], limits: dict[str, Any]) -> None:
    """The request rules the service enforces beyond the pydantic models' shapes, so that a
    schema-valid request is an accepted one: non-empty texts, MAX_INPUTS_* per dialect, token
    ids only with ALLOW_TOKEN_IDS, max_length of at least 3, three score weights, one output."""
    schemas = openapi.get("components", {}).get("schemas", {})

    def props(name: str) -> dict[str, Any]:
        result: dict[str, Any] = schemas.get(name, {}).get("properties", {})
        return result

    openai = props("OpenAIEmbeddingRequest")
    if "input" in openai:
        texts = _texts(limits["openai"])
        if limits["allow_token_ids"]:
            ids = {"type": "array", "items": {"type": "integer", "minimum": 0}}
            ids_list = {"type": "array", "items": ids, "minItems": 1, "maxItems": limits["openai"]}
            texts["anyOf"] += [{**ids, "minItems": 1, "maxItems": limits["openai"]}, ids_list]
        openai["input"] = {**openai["input"], **texts}
        openai["input"].pop("type", None)
    for branch in openai.get("dimensions", {}).get("anyOf", []):
        if branch.get("type") == "integer" and limits.get("dims"):
            branch.update(minimum=1, maximum=limits["dims"])  # of the default model
            openai["dimensions"]["description"] = (
                "At most the embedding size of the model asked for (the maximum shown is the "
                "default model's); a 400 otherwise."
            )
    native = props("NativeEmbeddingRequest")
    if "input" in native:
        native["input"] = {**native["input"], **_texts(limits["native"])}
    score = props("ScoreRequest")
    for field in ("sentences_1", "sentences_2"):
        if field in score:
            score[field] = {**score[field], **_texts(limits["native"])}
    if "sentences_2" in score:
        score["sentences_2"]["description"] = (
            "As many texts as sentences_1 (pairs are scored index by index); a 400 otherwise."
        )
    if "weights" in score:
        # sparse+dense is the weighted mean of those two: one of them must weigh.
        _weights(score["weights"])
        score["weights"].update(_one_positive([0, 1]))
    for name in ("NativeEmbeddingRequest", "ScoreRequest"):
        max_length = props(name).get("max_length", {})
        for branch in max_length.get("anyOf", []):
            if branch.get("type") == "integer":
                branch["minimum"] = MIN_MAX_LENGTH
    if "embedding_types" in openai:
        _embedding_types(openai, limits["scalar_types"])
        if limits["scalar_types"]:
            # int8 and uint8 are calibrated on the full width: not with `dimensions`.
            schemas["OpenAIEmbeddingRequest"]["not"] = {
                "required": ["dimensions", "embedding_types"],
                "properties": {
                    "dimensions": {"type": "integer"},
                    "embedding_types": {"type": "array", "contains": {"enum": ["int8", "uint8"]}},
                },
            }
    if "return_sparse" in openai and not limits["default_sparse"]:
        openai["return_sparse"]["enum"] = [False]  # the model has no sparse weights
    _embedding_types(native, limits["scalar_types"])
    if "InputType" in schemas:
        switches = schemas["InputType"]["properties"]
        if not limits["default_sparse"]:
            switches["sparse"]["anyOf"] = [{"enum": [False]}, {"type": "null"}]
        if not limits["default_colbert"]:
            switches["colbert"]["enum"] = [False]
    # /v1/rerank counts documents as the OpenAI dialect does, /v2/rerank and /rerank as native.
    if "CohereRerankRequest" in schemas:
        _rerank_rules(schemas["CohereRerankRequest"], limits["openai"], "documents", True)
    if "TeiRerankRequest" in schemas:
        _rerank_rules(schemas["TeiRerankRequest"], limits["native"], "texts", False)
    if "CohereRerankRequest" in schemas and limits["openai"] != limits["native"]:
        _native_cohere_body(openapi, limits["native"])
    if "RerankDocument" in schemas:
        schemas["RerankDocument"]["properties"]["text"]["minLength"] = 1
    tokenize = props("TokenizeRequest")
    for branch in tokenize.get("inputs", {}).get("anyOf", []):
        if branch.get("type") == "array":
            branch.update(minItems=1, maxItems=limits["native"])
    decode = props("DecodeRequest")
    if "ids" in decode and limits.get("vocab_size"):
        token = {"type": "integer", "minimum": 0, "maximum": limits["vocab_size"] - 1}
        flat, nested = decode["ids"]["anyOf"]
        flat["items"] = token
        nested.update(items={"type": "array", "items": token}, minItems=1)
        nested["maxItems"] = limits["native"]
    v2 = props("V2EmbeddingRequest")
    if "data" in v2:
        v2["data"].update(minItems=1, maxItems=limits["v2"])
    item = schemas.get("V2Item")
    if item is not None:
        # data_type is compared stripped and case-blind; text is required for text items.
        item["properties"]["data_type"]["pattern"] = r"^\s*[Tt][Ee][Xx][Tt]\s*$"
        item["properties"]["text"] = {"type": "string", "minLength": 1, "title": "Text"}
        item["required"] = ["data_type", "text"]
    sparse = bool(limits["default_sparse"])
    if "InputType" in schemas:
        schemas["InputType"].update(
            _not_all_off({"dense": True, "sparse": sparse, "colbert": False})
        )
    if "V2Params" in schemas:
        schemas["V2Params"].update(_not_all_off({"return_dense": True, "return_sparse": sparse}))


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
            add_error_responses(schema, getattr(app.state, "error_statuses", {}))
            limits = getattr(app.state, "request_limits", None)
            if limits is not None:
                add_request_constraints(schema, limits)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
