"""One output part: rows of vectors as Parquet (pyarrow) or JSON Lines (no dependency).

Parquet schema (one row per good input row, in input order):

    id              string
    tokens          int32                  tokens the model saw (truncated, specials included)
    dense           list<float32>          L2-normalised; `dimensions` long when that is set
    sparse_indices  list<int32>            token ids, ascending (BGE-M3's lexical weights)
    sparse_values   list<float32>          their weights, same order
    colbert         list<list<float32>>    one row per token after <s>, each L2-normalised

A head that was not asked for is not a column. The schema's metadata holds the model id, its
fingerprint and the job's options, so a part says what made it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

OutputFormat = Literal["parquet", "jsonl"]
EXTENSIONS: dict[OutputFormat, str] = {"parquet": ".parquet", "jsonl": ".jsonl"}


@dataclass(frozen=True)
class Heads:
    dense: bool = True
    sparse: bool = False
    colbert: bool = False


@dataclass
class Vectors:
    """One input's outputs; a head not asked for is None."""

    tokens: int
    dense: NDArray[np.float32] | None = None
    sparse: Mapping[int, float] | None = None
    colbert: NDArray[np.float32] | None = None


def sparse_columns(weights: Mapping[int, float]) -> tuple[list[int], list[float]]:
    """{token id: weight} as two lists sorted by id: the form Qdrant and Milvus take."""
    indices = sorted(weights)
    return indices, [float(weights[i]) for i in indices]


def write_parquet(
    path: Path,
    ids: Sequence[str],
    vectors: Sequence[Vectors],
    heads: Heads,
    metadata: Mapping[str, Any],
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns: dict[str, Any] = {
        "id": pa.array(list(ids), pa.string()),
        "tokens": pa.array([v.tokens for v in vectors], pa.int32()),
    }
    if heads.dense:
        columns["dense"] = _list_array([_floats(v.dense) for v in vectors], np.float32)
    if heads.sparse:
        pairs = [sparse_columns(v.sparse or {}) for v in vectors]
        columns["sparse_indices"] = _list_array(
            [np.asarray(p[0], np.int32) for p in pairs], np.int32
        )
        columns["sparse_values"] = _list_array(
            [np.asarray(p[1], np.float32) for p in pairs], np.float32
        )
    if heads.colbert:
        per_row = [_floats(v.colbert).reshape(-1, _width(v.colbert)) for v in vectors]
        inner = _list_array([m for rows in per_row for m in rows], np.float32)
        columns["colbert"] = pa.ListArray.from_arrays(_offsets([len(m) for m in per_row]), inner)
    table = pa.table(columns).replace_schema_metadata({"bge_m3.job": json.dumps(dict(metadata))})
    pq.write_table(table, path, compression="zstd")


def _offsets(lengths: Sequence[int]) -> Any:
    import pyarrow as pa

    return pa.array(np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int32))


def _list_array(items: Sequence[NDArray[Any]], dtype: type[np.generic]) -> Any:
    """A list<dtype> column built from one flat buffer and offsets (no per-value Python objects)."""
    import pyarrow as pa

    flat = np.concatenate(items).astype(dtype, copy=False) if items else np.empty(0, dtype)
    return pa.ListArray.from_arrays(_offsets([len(i) for i in items]), pa.array(flat))


def _width(array: NDArray[np.float32] | None) -> int:
    return array.shape[-1] if array is not None and array.ndim == 2 else 1


def write_jsonl(path: Path, ids: Sequence[str], vectors: Sequence[Vectors]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row_id, v in zip(ids, vectors, strict=True):
            record: dict[str, Any] = {"id": row_id, "tokens": v.tokens}
            if v.dense is not None:
                record["dense"] = v.dense.tolist()
            if v.sparse is not None:
                record["sparse_indices"], record["sparse_values"] = sparse_columns(v.sparse)
            if v.colbert is not None:
                record["colbert"] = v.colbert.tolist()
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def write_part(
    path: Path,
    fmt: OutputFormat,
    ids: Sequence[str],
    vectors: Sequence[Vectors],
    heads: Heads,
    metadata: Mapping[str, Any],
) -> None:
    if fmt == "parquet":
        write_parquet(path, ids, vectors, heads, metadata)
    else:
        write_jsonl(path, ids, vectors)


def _floats(array: NDArray[np.float32] | None) -> NDArray[np.float32]:
    return np.empty(0, np.float32) if array is None else array
