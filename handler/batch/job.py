"""A corpus job on one machine: rows -> parts of rows_per_part -> vectors -> one file per part.

Part k holds the input rows k*rows_per_part .. (k+1)*rows_per_part - 1 (good and bad rows count
alike), so a part's name says which rows it holds whatever the machine, the run or the number of
tasks. That makes the job:
- resumable: a part is published whole (locations.put_file) and a re-run skips every part that is
  already there, saying so;
- shardable: task i of n (Cloud Run's CLOUD_RUN_TASK_INDEX / CLOUD_RUN_TASK_COUNT) embeds the
  parts k with k % n == i, so n tasks together write each row exactly once;
- checkable: bad rows go to the errors file with their file and line, never into a part.

Identical texts are embedded once per run: a first pass over the input counts each text's
occurrences in this task's parts, and a result is kept only while a later occurrence still needs it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, TextIO

import numpy as np

from handler.batch import locations
from handler.batch.locations import Location
from handler.batch.parts import EXTENSIONS, Heads, OutputFormat, Vectors, write_part
from handler.batch.rows import Fields, Format, Row, format_of, read_rows
from handler.engine.types import EmbeddingEngine

JOB_FILE = "_job.json"
# Unique texts per engine call: the engine length-sorts and token-budgets inside each call, and the
# progress bar moves once per call.
ENCODE_CHUNK = 512


class JobError(Exception):
    """A job that cannot start or go on (not a bad row: those go to the errors file)."""


@dataclass(frozen=True)
class JobOptions:
    heads: Heads = field(default_factory=Heads)
    dimensions: int | None = None
    max_length: int | None = None
    rows_per_part: int = 10_000
    output_format: OutputFormat = "parquet"
    input_format: Format | None = None  # None: from each file's extension
    fields: Fields = field(default_factory=Fields)
    task_index: int = 0
    task_count: int = 1

    def check(self, engine: EmbeddingEngine) -> None:
        info = engine.info
        if self.rows_per_part < 1:
            raise JobError("rows per part must be at least 1")
        if not 0 <= self.task_index < self.task_count:
            raise JobError(f"task index {self.task_index} is not in 0..{self.task_count - 1}")
        if not (self.heads.dense or self.heads.sparse or self.heads.colbert):
            raise JobError("ask for at least one of --dense, --sparse or --colbert")
        caps = info.capabilities
        for head, on in asdict(self.heads).items():
            if on and not getattr(caps, head):
                raise JobError(f"model '{info.id}' has no {head} output")
        if self.dimensions is not None and not 1 <= self.dimensions <= info.dims:
            raise JobError(f"--dimensions must be 1..{info.dims} for model '{info.id}'")
        if self.dimensions is not None and not self.heads.dense:
            raise JobError("--dimensions shortens the dense vectors: add --dense")
        if self.max_length is not None and self.max_length < 1:
            raise JobError("--max-length must be positive")

    def errors_name(self) -> str:
        if self.task_count == 1:
            return "errors.jsonl"
        return f"errors-{self.task_index:05d}-of-{self.task_count:05d}.jsonl"

    def summary_name(self) -> str:
        return self.errors_name().replace("errors", "_summary").replace(".jsonl", ".json")


def job_record(options: JobOptions, engine: EmbeddingEngine) -> dict[str, Any]:
    """What decides a part's content: a re-run into the same output must match it."""
    info = engine.info
    return {
        "model": info.id,
        "fingerprint": info.fingerprint,
        "heads": [h for h, on in asdict(options.heads).items() if on],
        "dimensions": options.dimensions,
        "max_length": options.max_length,
        "rows_per_part": options.rows_per_part,
        "output_format": options.output_format,
        "fields": asdict(options.fields),
    }


# ---- embedding ---------------------------------------------------------------------------------


def embed_texts(
    engine: EmbeddingEngine,
    texts: Sequence[str],
    heads: Heads,
    *,
    dimensions: int | None = None,
    max_length: int | None = None,
) -> list[Vectors]:
    """The vectors the HTTP API gives for these texts with the same options: the same engine
    call, `dimensions` included."""
    encoded = engine.encode(
        list(texts),
        dense=heads.dense,
        sparse=heads.sparse,
        colbert=heads.colbert,
        max_length=max_length,
        truncate=True,
        dimensions=dimensions,
    )
    dense = encoded.dense
    return [
        Vectors(
            tokens=encoded.token_counts[i],
            dense=None if dense is None else np.asarray(dense[i], np.float32),
            sparse=None if encoded.sparse is None else encoded.sparse[i],
            colbert=None if encoded.colbert is None else encoded.colbert[i],
        )
        for i in range(len(texts))
    ]


def text_key(text: str) -> bytes:
    # 16 bytes per distinct text instead of the text itself: a million passages fit in memory.
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


class DuplicateCache:
    """Results kept for texts that occur again later in the run, dropped after their last use."""

    def __init__(self, remaining: Counter[bytes]):
        self.remaining = Counter({k: n for k, n in remaining.items() if n > 1})
        self.kept: dict[bytes, Vectors] = {}
        self.reused = 0

    def take(self, key: bytes) -> Vectors | None:
        found = self.kept.get(key)
        if found is not None:
            self.reused += 1
            self.passed(key)
        return found

    def passed(self, key: bytes) -> None:
        """One occurrence of `key` is done with (embedded, reused, or in a part already written)."""
        if key in self.remaining:
            self.remaining[key] -= 1
            if self.remaining[key] <= 0:
                del self.remaining[key]
                self.kept.pop(key, None)

    def offer(self, key: bytes, vectors: Vectors) -> None:
        self.passed(key)
        if key in self.remaining:
            self.kept[key] = vectors


# ---- progress ----------------------------------------------------------------------------------


class Progress(Protocol):
    def start(self, total_rows: int) -> None: ...
    def advance(self, rows: int, tokens: int) -> None: ...
    def part(self, event: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


class Silent:
    """No progress output (the Lambda worker logs its one result instead)."""

    def start(self, total_rows: int) -> None:
        pass

    def advance(self, rows: int, tokens: int) -> None:
        pass

    def part(self, event: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class JsonLines:
    """Off a terminal (a log collector): one JSON line per part, nothing in between."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream or sys.stderr

    def start(self, total_rows: int) -> None:
        self._write({"event": "start", "rows": total_rows})

    def advance(self, rows: int, tokens: int) -> None:
        pass

    def part(self, event: dict[str, Any]) -> None:
        self._write({"event": "part", **event})

    def close(self) -> None:
        pass

    def _write(self, record: dict[str, Any]) -> None:
        self.stream.write(json.dumps(record) + "\n")
        self.stream.flush()


class Bar:
    """On a terminal: a tqdm bar counting rows, with tokens/s beside rows/s."""

    def __init__(self) -> None:
        self.bar: Any = None
        self.tokens = 0
        self.started = time.perf_counter()

    def start(self, total_rows: int) -> None:
        from tqdm import tqdm

        columns, rows = _terminal_size()
        self.bar = tqdm(total=total_rows, unit="rows", ncols=columns, nrows=rows, smoothing=0.1)
        self.started = time.perf_counter()

    def advance(self, rows: int, tokens: int) -> None:
        self.tokens += tokens
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        self.bar.set_postfix_str(f"{self.tokens / elapsed:,.0f} tokens/s", refresh=False)
        self.bar.update(rows)

    def part(self, event: dict[str, Any]) -> None:
        if event.get("skipped"):
            self.bar.write(f"{event['part']}: complete already, skipped")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _terminal_size() -> tuple[int, int]:
    # A terminal that reports no size (0 x 0: pseudo-terminals in CI and `script`) makes tqdm
    # hide its only bar; assume a common size instead.
    try:
        size = os.get_terminal_size(sys.stderr.fileno())
    except OSError:
        return 100, 24
    return (size.columns or 100), (size.lines or 24)


def default_progress() -> Progress:
    return Bar() if sys.stderr.isatty() else JsonLines()


# ---- the job -----------------------------------------------------------------------------------


@dataclass
class Summary:
    rows: int = 0  # good rows in this task's parts
    errors: int = 0
    tokens: int = 0  # tokens embedded (a duplicate's tokens count once)
    duplicates: int = 0  # rows that reused an earlier identical text's vectors
    parts_written: int = 0
    parts_skipped: int = 0  # complete from an earlier run
    seconds: float = 0.0
    rows_embedded: int = 0  # rows in parts written by this run

    def as_dict(self) -> dict[str, Any]:
        seconds = max(self.seconds, 1e-9)
        return {
            **asdict(self),
            "seconds": round(self.seconds, 3),
            "rows_per_s": round(self.rows_embedded / seconds, 1),
            "tokens_per_s": round(self.tokens / seconds, 1),
        }


@dataclass
class _Input:
    path: Path
    source: str
    fmt: Format


def run_job(
    engine: EmbeddingEngine,
    source: Location,
    output: Location,
    options: JobOptions,
    progress: Progress | None = None,
) -> Summary:
    options.check(engine)
    progress = progress or default_progress()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bge-m3-job-") as tmp:
        workdir = Path(tmp)
        inputs = _inputs(source, workdir, options)
        _claim_output(output, job_record(options, engine), workdir)
        counts, total = _first_pass(inputs, options)
        summary = Summary()
        cache = DuplicateCache(counts)
        errors: list[dict[str, Any]] = []
        progress.start(total)
        try:
            for k, rows in _parts(_all_rows(inputs, options), options.rows_per_part):
                if k % options.task_count != options.task_index:
                    continue
                bad = [r for r in rows if not r.ok]
                errors.extend(_error_record(r) for r in bad)
                good = [r for r in rows if r.ok]
                summary.rows += len(good)
                summary.errors += len(bad)
                progress.advance(len(bad), 0)  # the bar counts every row read, good or bad
                _one_part(engine, k, good, output, options, workdir, cache, summary, progress)
        finally:
            progress.close()
        _write_errors(errors, locations.child(output, options.errors_name()), workdir)
        summary.duplicates = cache.reused
        summary.seconds = time.perf_counter() - started
        _write_json(summary.as_dict(), locations.child(output, options.summary_name()), workdir)
    return summary


def _inputs(source: Location, workdir: Path, options: JobOptions) -> list[_Input]:
    found = []
    for location in locations.list_inputs(source):
        name = locations.display_name(location, source)
        try:
            fmt = options.input_format or format_of(name)
        except ValueError as exc:
            raise JobError(str(exc)) from None
        found.append(_Input(locations.fetch(location, workdir), name, fmt))
    return found


def _claim_output(output: Location, record: dict[str, Any], workdir: Path) -> None:
    """Refuse to mix parts of different jobs in one output; record this job's options there."""
    target = locations.child(output, JOB_FILE)
    if locations.exists(target):
        before = json.loads(locations.read_bytes(target))
        if before != record:
            changed = sorted(
                k for k in record.keys() | before.keys() if before.get(k) != record.get(k)
            )
            raise JobError(
                f"{output} holds parts of a job with other {', '.join(changed)}; "
                "write to a new output (or delete the old one)"
            )
        return
    _write_json(record, target, workdir)


def _all_rows(inputs: Sequence[_Input], options: JobOptions) -> Iterator[Row]:
    for item in inputs:
        yield from read_rows(item.path, item.source, item.fmt, options.fields)


def _first_pass(inputs: Sequence[_Input], options: JobOptions) -> tuple[Counter[bytes], int]:
    counts: Counter[bytes] = Counter()
    total = 0
    for k, rows in _parts(_all_rows(inputs, options), options.rows_per_part):
        if k % options.task_count == options.task_index:
            total += len(rows)
            counts.update(text_key(r.text) for r in rows if r.ok)
    return counts, total


def _parts(rows: Iterator[Row], size: int) -> Iterator[tuple[int, list[Row]]]:
    part: list[Row] = []
    k = 0
    for row in rows:
        part.append(row)
        if len(part) == size:
            yield k, part
            k, part = k + 1, []
    if part:
        yield k, part


def part_name(k: int, fmt: OutputFormat) -> str:
    return f"part-{k:06d}{EXTENSIONS[fmt]}"


def _one_part(
    engine: EmbeddingEngine,
    k: int,
    good: list[Row],
    output: Location,
    options: JobOptions,
    workdir: Path,
    cache: DuplicateCache,
    summary: Summary,
    progress: Progress,
) -> None:
    name = part_name(k, options.output_format)
    target = locations.child(output, name)
    if locations.exists(target):
        for row in good:
            cache.passed(text_key(row.text))
        summary.parts_skipped += 1
        progress.advance(len(good), 0)
        progress.part({"part": name, "rows": len(good), "skipped": True})
        return
    started = time.perf_counter()
    tokens_before = summary.tokens
    vectors = embed_rows(engine, good, options, cache, summary, progress)
    local = workdir / name
    metadata = {**job_record(options, engine), "part": k}
    write_part(local, options.output_format, [r.id for r in good], vectors, options.heads, metadata)
    locations.put_file(local, target)
    local.unlink()
    summary.parts_written += 1
    summary.rows_embedded += len(good)
    seconds = time.perf_counter() - started
    tokens = summary.tokens - tokens_before
    progress.part(
        {
            "part": name,
            "rows": len(good),
            "tokens": tokens,
            "seconds": round(seconds, 3),
            "rows_per_s": round(len(good) / max(seconds, 1e-9), 1),
            "tokens_per_s": round(tokens / max(seconds, 1e-9), 1),
        }
    )


def embed_rows(
    engine: EmbeddingEngine,
    rows: Sequence[Row],
    options: JobOptions,
    cache: DuplicateCache,
    summary: Summary,
    progress: Progress,
) -> list[Vectors]:
    """Vectors for rows in order; each distinct text embedded once (or taken from the cache)."""
    out: list[Vectors | None] = [None] * len(rows)
    todo: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        found = cache.take(text_key(row.text))
        if found is not None:
            out[i] = found
        else:
            todo.setdefault(row.text, []).append(i)
    reused = len(rows) - sum(len(v) for v in todo.values())
    if reused:
        progress.advance(reused, 0)
    texts = list(todo)
    for start in range(0, len(texts), ENCODE_CHUNK):
        chunk = texts[start : start + ENCODE_CHUNK]
        vectors = embed_texts(
            engine,
            chunk,
            options.heads,
            dimensions=options.dimensions,
            max_length=options.max_length,
        )
        tokens = 0
        rows_done = 0
        for text, v in zip(chunk, vectors, strict=True):
            places = todo[text]
            key = text_key(text)
            for n, i in enumerate(places):
                out[i] = v
                if n:
                    cache.reused += 1
                    cache.passed(key)
            cache.offer(key, v)
            tokens += v.tokens
            rows_done += len(places)
        summary.tokens += tokens
        progress.advance(rows_done, tokens)
    assert all(v is not None for v in out)
    return [v for v in out if v is not None]


def _error_record(row: Row) -> dict[str, Any]:
    return {"source": row.source, row.unit: row.number, "id": row.id, "reason": row.error}


def _write_errors(errors: list[dict[str, Any]], target: Location, workdir: Path) -> None:
    # Rewritten whole by every run: the input is read whole every time, so it is always complete.
    local = workdir / "errors.jsonl"
    with local.open("w", encoding="utf-8") as f:
        for record in errors:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    locations.put_file(local, target)


def _write_json(record: dict[str, Any], target: Location, workdir: Path) -> None:
    local = workdir / (target.name if isinstance(target, Path) else "record.json")
    local.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    locations.put_file(local, target)
