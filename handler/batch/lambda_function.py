"""The Distributed Map worker: `handler.batch.lambda_function.handler`, from the API's own image.

Step Functions calls it with one batch of items (ItemBatcher):

    {"BatchInput": {"output": "s3://bucket/prefix/job/", "dense": true, "sparse": true, ...},
     "Items": [{"index": 0, "value": {"id": "a", "text": "..."}}, ...]}

An item is a record of a JSON Lines or CSV object (the state machine's ItemSelector wraps it with
its index, so an error names the line), a bare record, or an S3 listing entry
(`{"Key": ..., "Size": ..., "Etag": ...}`, a prefix of shards), which the worker reads whole.

It writes one part, `<output>part-<digest>.parquet`, where the digest is taken over the batch's
items: Step Functions retries a failed batch with the same items, so a retry overwrites its own part
and no row is ever written twice. Bad records go to `<output>errors-<digest>.jsonl`.

It never lets Lambda's timeout cut it off half way: before each chunk it checks
context.get_remaining_time_in_millis() against the time the chunk will take (measured on the
chunks before it) plus the time to write and upload the part, and fails the batch with
BatchTooLargeError, naming the items it did not reach, when that does not fit. The answer is a
few counters and the part's URI, far below Step Functions' 256 KiB result limit whatever the batch.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from handler.batch import locations
from handler.batch.job import (
    DuplicateCache,
    JobOptions,
    Silent,
    Summary,
    embed_rows,
    job_record,
    text_key,
)
from handler.batch.parts import EXTENSIONS, Heads, OutputFormat, write_part
from handler.batch.rows import Fields, Row, format_of, read_rows, row_from_record
from handler.engine.types import HEADS, EmbeddingEngine
from handler.settings import Settings, engine_config

# Writing and uploading the part, and returning, must fit in what is left after the last chunk.
RESERVE_MS = 15_000
# Texts per engine call: small enough that the time check between calls comes often.
CHUNK = 64


class BatchTooLargeError(RuntimeError):
    """The batch cannot finish within this invocation; Step Functions retries or counts it as
    failed (ToleratedFailurePercentage). Lower MaxItemsPerBatch / MaxInputBytesPerBatch."""


class BatchInputError(ValueError):
    """BatchInput is missing something the worker needs or has a bad value."""


@dataclass(frozen=True)
class WorkerInput:
    output: locations.S3Uri
    input_bucket: str | None
    options: JobOptions


def parse_batch_input(given: Mapping[str, Any]) -> WorkerInput:
    """BatchInput's fields; the state machine nests the execution's options under `options`."""
    options = given.get("options") or {}
    if not isinstance(options, Mapping):
        raise BatchInputError("BatchInput.options must be an object")
    batch = {**options, **{k: v for k, v in given.items() if k != "options"}}
    output = batch.get("output")
    if not output or not str(output).startswith("s3://"):
        raise BatchInputError("BatchInput.output must be an s3:// prefix")
    where = locations.parse_location(str(output))
    assert isinstance(where, locations.S3Uri)
    if where.key and not where.key.endswith("/"):
        where = locations.S3Uri(where.bucket, where.key + "/")
    fmt = batch.get("format", "parquet")
    if fmt not in EXTENSIONS:
        raise BatchInputError(f"BatchInput.format must be one of {sorted(EXTENSIONS)}")
    dense, sparse, colbert = (bool(batch.get(h, h == "dense")) for h in HEADS)
    options = JobOptions(
        heads=Heads(dense=dense, sparse=sparse, colbert=colbert),
        dimensions=_optional_int(batch, "dimensions"),
        max_length=_optional_int(batch, "max_length"),
        output_format=fmt,
        fields=Fields(
            id=str(batch.get("id_field", "id")), text=str(batch.get("text_field", "text"))
        ),
    )
    bucket = batch.get("input_bucket")
    return WorkerInput(where, str(bucket) if bucket else None, options)


def _optional_int(batch: Mapping[str, Any], name: str) -> int | None:
    value = batch.get(name)
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise BatchInputError(f"BatchInput.{name} must be an integer")
    try:
        return int(value)
    except ValueError:
        raise BatchInputError(f"BatchInput.{name} must be an integer") from None


def batch_digest(items: Sequence[Any]) -> str:
    """The same items give the same name: a retried batch overwrites its own part."""
    canonical = json.dumps(items, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()[:24]


def is_listing_entry(item: Any) -> bool:
    return isinstance(item, Mapping) and "Key" in item and "Size" in item


def rows_of(items: Sequence[Any], work: WorkerInput, workdir: Path) -> list[Row]:
    rows: list[Row] = []
    fields = work.options.fields
    for position, given in enumerate(items):
        # The state machine's ItemSelector wraps each item with its index in the input.
        wrapped = isinstance(given, Mapping) and set(given) == {"index", "value"}
        number, item = (int(given["index"]), given["value"]) if wrapped else (position, given)
        if is_listing_entry(item):
            if work.input_bucket is None:
                raise BatchInputError("S3 listing items need BatchInput.input_bucket")
            key = str(item["Key"])
            path = locations.fetch(locations.S3Uri(work.input_bucket, key), workdir)
            rows.extend(read_rows(path, key, format_of(key, "jsonl"), fields))
            path.unlink()
            continue
        row = row_from_record(item, "item", number, fields)
        rows.append(Row(row.source, row.number, row.id, row.text, row.error, "item"))
    return rows


@dataclass
class Deadline:
    """Lambda's clock: milliseconds left, and whether the next piece of work fits in them."""

    context: Any
    reserve_ms: int = RESERVE_MS

    def left_ms(self) -> int:
        return int(self.context.get_remaining_time_in_millis())

    def check(self, needed_ms: float, what: str) -> None:
        left = self.left_ms()
        if needed_ms + self.reserve_ms > left:
            raise BatchTooLargeError(
                f"{what} needs about {needed_ms / 1000:.1f} s plus {self.reserve_ms / 1000:.0f} s "
                f"to write the part, but {left / 1000:.1f} s remain in this invocation; lower "
                "MaxItemsPerBatch (or raise the worker's timeout)"
            )


def embed_within(
    engine: EmbeddingEngine, rows: list[Row], options: JobOptions, deadline: Deadline
) -> tuple[list[Any], Summary]:
    """Embed in chunks, checking before each that it fits in the time left."""
    summary = Summary()
    cache = DuplicateCache(_counts(rows))
    vectors: list[Any] = []
    ms_per_row: float | None = None
    for start in range(0, len(rows), CHUNK):
        chunk = rows[start : start + CHUNK]
        # Before the first chunk nothing is measured yet: only the reserve must fit.
        deadline.check(
            (ms_per_row or 0.0) * len(chunk),
            f"rows {start}..{len(rows) - 1} of {len(rows)} (not embedded yet)",
        )
        t = time.perf_counter()
        vectors.extend(embed_rows(engine, chunk, options, cache, summary, Silent()))
        spent = (time.perf_counter() - t) * 1000.0 / max(len(chunk), 1)
        ms_per_row = spent if ms_per_row is None else max(ms_per_row, spent)
    summary.duplicates = cache.reused
    return vectors, summary


def _counts(rows: Sequence[Row]) -> Counter[bytes]:
    return Counter(text_key(r.text) for r in rows)


def check_disk(workdir: Path, rows: int, options: JobOptions, dims: int, tokens: int) -> None:
    """/tmp is 512 MB by default: a batch whose part cannot fit fails before writing it, with the
    remedy, rather than with a full disk. Its tokens are counted by the embedding itself."""
    per_row = (dims * 4 if options.heads.dense else 0) + 64
    need = rows * per_row + (tokens * (dims * 4 + 8) if options.heads.colbert else tokens * 8)
    free = shutil.disk_usage(workdir).free
    if need > free:
        raise BatchTooLargeError(
            f"the part would need about {need >> 20} MiB but /tmp has {free >> 20} MiB free; "
            "lower MaxItemsPerBatch or raise the function's EphemeralStorage"
        )


def process_batch(
    event: Mapping[str, Any],
    context: Any,
    engine: EmbeddingEngine,
) -> dict[str, Any]:
    items = event.get("Items")
    if not isinstance(items, list):
        raise BatchInputError("the event has no Items list (is the Map's ItemBatcher set?)")
    work = parse_batch_input(event.get("BatchInput") or {})
    work.options.check(engine)
    deadline = Deadline(context)
    digest = batch_digest(items)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bge-m3-batch-") as tmp:
        workdir = Path(tmp)
        rows = rows_of(items, work, workdir)
        good = [r for r in rows if r.ok]
        bad = [r for r in rows if not r.ok]
        vectors, summary = embed_within(engine, good, work.options, deadline)
        check_disk(workdir, len(good), work.options, engine.info.dims, summary.tokens)
        fmt: OutputFormat = work.options.output_format
        name = f"part-{digest}{EXTENSIONS[fmt]}"
        local = workdir / name
        metadata = {**job_record(work.options, engine), "batch": digest}
        write_part(local, fmt, [r.id for r in good], vectors, work.options.heads, metadata)
        target = locations.child(work.output, name)
        locations.put_file(local, target)
        errors_uri = None
        if bad:
            errors_local = workdir / "errors.jsonl"
            errors_local.write_text(
                "".join(
                    json.dumps(
                        {"source": r.source, r.unit: r.number, "id": r.id, "reason": r.error},
                        ensure_ascii=False,
                    )
                    + "\n"
                    for r in bad
                ),
                encoding="utf-8",
            )
            errors_target = locations.child(work.output, f"errors-{digest}.jsonl")
            locations.put_file(errors_local, errors_target)
            errors_uri = str(errors_target)
    return {
        "part": str(target),
        "errors_file": errors_uri,
        "items": len(items),
        "rows": len(good),
        "errors": len(bad),
        "tokens": summary.tokens,
        "duplicates": summary.duplicates,
        "seconds": round(time.perf_counter() - started, 3),
    }


@functools.cache
def engine_from_environment() -> EmbeddingEngine:
    """Loaded once per execution environment, on the first batch it serves."""
    from handler.engine import Engine

    settings = Settings()
    if not settings.model_paths:
        raise RuntimeError("MODEL_PATH is not set")
    return Engine.load(settings.model_paths[0], engine_config(settings, job=True))


def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    result = process_batch(event, context, engine_from_environment())
    # One JSON line per batch in the worker's log group, as the CLI writes one per part.
    print(json.dumps({"event": "batch", **result}), flush=True)
    return result
