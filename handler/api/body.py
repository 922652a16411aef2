"""Request bodies: strict JSON parsing into a dialect's pydantic model, one clear message per
failure, as an `ApiError` the app renders in the dialect's envelope."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, BeforeValidator, Field, ValidationError
from starlette.requests import Request

from handler.errors import ApiError, invalid

M = TypeVar("M", bound=BaseModel)


def _integral(value: Any) -> Any:
    """8.0 as 8: JSON Schema's `integer` is any number without a fractional part, as the OpenAPI
    document says; 8.5 and "8" stay what they are and are refused."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# An integer field of a request body (parsed strictly otherwise: `true` is not 1). The bound
# sits inside the type: on `JsonInt | None` pydantic would print `ge` into the JSON Schema.
JsonInt = Annotated[int, BeforeValidator(_integral)]
PositiveInt = Annotated[int, Field(ge=1), BeforeValidator(_integral)]

# A score weight's upper bound. Weights are ratios; bounding each keeps the sum of three finite,
# which check_weights requires but JSON Schema cannot state.
WEIGHT_MAX = 1e300
Weight = Annotated[float, Field(le=WEIGHT_MAX)]
WEIGHTS_HINT = "'weights' must be three numbers [dense, sparse, colbert], each at most 1e300."


def _loc(loc: Sequence[int | str]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out


def validation_message(exc: ValidationError, hints: Mapping[str, str]) -> ApiError:
    """One clear message for the first problem (pydantic lists one per union branch). A hint
    explains a field's accepted shapes; a missing field is simply required."""
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
    # Drop pydantic's union-branch labels ("list[str]") from the path shown to the user.
    shown = [p for p in loc if isinstance(p, int) or "[" not in p]
    where = _loc(shown)
    if first["type"] == "missing":
        return invalid(f"'{where}' is required.", param=where)
    field = str(loc[0])
    if field in hints:
        return invalid(hints[field], param=field)
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
        # Strict: `true` is a boolean and `0` is not, as the OpenAPI document says; lax parsing
        # would take 0, "yes" or "off" for booleans and "3" for an integer (3.0 is one: JsonInt).
        return model.model_validate_json(raw, strict=True)
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
