"""Writing responses: sparse weights in the asked format, usage, and a fast JSON writer for the
float arrays that make up most of every embedding response."""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import lru_cache
from typing import Any, Literal

import numpy as np
from starlette.responses import Response

from handler.engine.types import EmbeddingEngine, FloatArray
from handler.errors import ApiError, ErrorKind

SparseFormat = Literal["token", "id", "indices_values"]


def sparse_out(
    engine: EmbeddingEngine, weights: Mapping[int, float], fmt: SparseFormat
) -> dict[str, Any]:
    """One input's sparse weights in the asked format: token strings (the v2 and native APIs'
    form), token ids as strings (FlagEmbedding's form), or {indices, values} sorted by index
    (Qdrant, Milvus)."""
    if fmt == "token":
        return {k: float(v) for k, v in engine.token_strings(weights).items()}
    if fmt == "id":
        return {str(k): float(v) for k, v in weights.items()}
    indices = sorted(weights)
    return {"indices": indices, "values": [float(weights[i]) for i in indices]}


def truncated_flags(truncated: list[bool]) -> list[bool] | None:
    """The per-input `truncated` flags for a response, or None when no input was cut: the key
    appears only then, so a response to inputs within the limit is the same as before."""
    return list(truncated) if any(truncated) else None


def truncated_header(truncated: list[bool]) -> dict[str, str]:
    """`X-Truncated-Inputs: 0,3` (the indices of the inputs cut to max_length), for a dialect
    whose response schema has no place for a flag (OpenAI's); no header when none was cut."""
    cut = [str(i) for i, flag in enumerate(truncated) if flag]
    return {TRUNCATED_HEADER: ",".join(cut)} if cut else {}


TRUNCATED_HEADER = "X-Truncated-Inputs"


def usage(tokens: int) -> dict[str, int]:
    return {"prompt_tokens": tokens, "total_tokens": tokens}


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
