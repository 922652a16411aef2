"""Input files into rows: JSON Lines, CSV and Parquet, one `Row` per line or record.

A line that cannot be used (bad JSON, not an object, text missing, empty or not a string, bytes
that are not UTF-8) becomes a row with an `error` instead of stopping the job: the job writes it to
its errors file with its line or row number and carries on. Blank lines are not rows.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

Format = Literal["jsonl", "csv", "parquet"]

SUFFIXES: dict[str, Format] = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}


@dataclass(frozen=True)
class Fields:
    id: str = "id"
    text: str = "text"


@dataclass(frozen=True)
class Row:
    source: str  # the file, as errors name it
    number: int  # 1-based: the line (JSON Lines, CSV) or the record (Parquet)
    id: str
    text: str
    error: str | None = None
    unit: Literal["line", "row", "item"] = "line"  # what `number` counts: lines, records, items

    @property
    def ok(self) -> bool:
        return self.error is None


def format_of(name: str, default: Format | None = None) -> Format:
    lower = name.lower()
    for suffix in (".gz",):  # compressed inputs are not read: say so rather than misparse them
        if lower.endswith(suffix):
            raise ValueError(f"{name}: compressed input is not supported; decompress it first")
    for suffix, fmt in SUFFIXES.items():
        if lower.endswith(suffix):
            return fmt
    if default is not None:
        return default
    raise ValueError(f"{name}: unknown input format (.jsonl, .csv or .parquet; or pass --format)")


def read_rows(path: Path, source: str, fmt: Format, fields: Fields) -> Iterator[Row]:
    if fmt == "jsonl":
        yield from _jsonl_rows(path, source, fields)
    elif fmt == "csv":
        yield from _csv_rows(path, source, fields)
    else:
        yield from _parquet_rows(path, source, fields)


def row_from_record(record: Any, source: str, number: int, fields: Fields) -> Row:
    """One record (a parsed JSON object, a CSV row, a Parquet row) checked and made a Row. An id
    left out is the row's place (`source:number`), so that every output row can be traced back."""
    fallback_id = f"{source}:{number}"
    if not isinstance(record, Mapping):
        return Row(source, number, fallback_id, "", f"not a JSON object ({_kind(record)})")
    raw_id = record.get(fields.id)
    if raw_id is None or raw_id == "":
        row_id = fallback_id
    elif isinstance(raw_id, str):
        row_id = raw_id
    elif isinstance(raw_id, int) and not isinstance(raw_id, bool):
        row_id = str(raw_id)
    else:
        return Row(source, number, fallback_id, "", f"'{fields.id}' is {_kind(raw_id)}")
    text = record.get(fields.text)
    error = None
    if fields.text not in record or text is None:
        error = f"'{fields.text}' is missing"
    elif not isinstance(text, str):
        error = f"'{fields.text}' is {_kind(text)}, not a string"
    elif not text.strip():
        error = f"'{fields.text}' is empty"
    elif _has_bad_bytes(text):
        error = f"'{fields.text}' is not valid UTF-8"
    if error is not None:
        return Row(source, number, row_id, "", error)
    assert isinstance(text, str)
    return Row(source, number, row_id, text)


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__


def _has_bad_bytes(text: str) -> bool:
    # Files are decoded with surrogateescape, so undecodable bytes show up as lone surrogates.
    return any("\udc80" <= c <= "\udcff" for c in text)


def _jsonl_rows(path: Path, source: str, fields: Fields) -> Iterator[Row]:
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            line = raw.decode("utf-8", errors="surrogateescape").strip()
            if number == 1:
                line = line.removeprefix("\ufeff")
            if not line:
                continue
            if _has_bad_bytes(line):
                yield Row(source, number, f"{source}:{number}", "", "not valid UTF-8")
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:
                yield Row(source, number, f"{source}:{number}", "", f"bad JSON ({exc})")
                continue
            yield row_from_record(record, source, number, fields)


def _csv_rows(path: Path, source: str, fields: Fields) -> Iterator[Row]:
    with path.open("r", encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        reader = csv.DictReader(f, restkey="\0extra")
        for record in reader:
            number = reader.line_num  # the line a (possibly multi-line) record ends on
            if not any(v for k, v in record.items() if k != "\0extra"):
                continue  # a blank line
            if "\0extra" in record:
                yield Row(source, number, f"{source}:{number}", "", "more fields than the header")
                continue
            yield row_from_record(record, source, number, fields)


def _parquet_rows(path: Path, source: str, fields: Fields) -> Iterator[Row]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    names = set(parquet.schema_arrow.names)
    if fields.text not in names:
        # The whole file is unusable: one error, numbered 0 (no record), and no rows.
        yield Row(source, 0, f"{source}:0", "", f"no '{fields.text}' column", "row")
        return
    columns = [c for c in (fields.id, fields.text) if c in names]
    number = 0
    for batch in parquet.iter_batches(columns=columns, batch_size=4096):
        for record in batch.to_pylist():
            number += 1
            row = row_from_record(record, source, number, fields)
            yield replace(row, unit="row")
