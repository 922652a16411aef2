"""`python -m handler.batch INPUT OUTPUT [options]`: embed a corpus into Parquet or JSON Lines.

    python -m handler.batch corpus.jsonl out/ --dense --sparse
    python -m handler.batch s3://bucket/corpus/ s3://bucket/vectors/ --dimensions 256
    python -m handler.batch passages.csv out/ --id-field doc_id --text-field body --format jsonl

INPUT: a .jsonl / .csv / .parquet file, a folder of them, or s3://bucket/key or s3://bucket/prefix/.
OUTPUT: a folder or s3://bucket/prefix/ receiving part-NNNNNN.parquet (or .jsonl), errors.jsonl
(bad rows with their file and line), _job.json (the options) and _summary.json. Without any of
--dense/--sparse/--colbert the job writes dense vectors. The model is MODEL_PATH's first directory
(or --model-path); DEVICE, THREADS, BATCH_TOKEN_BUDGET and MODEL_VERIFY apply as for the API
(handler/settings.py). On Cloud Run jobs, CLOUD_RUN_TASK_INDEX / CLOUD_RUN_TASK_COUNT split the
parts between tasks. Exit status: 0 done (bad rows do not fail a job), 2 bad usage or a job that
cannot run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from handler.batch.job import JobError, JobOptions, run_job
from handler.batch.locations import parse_location
from handler.batch.parts import Heads
from handler.batch.rows import Fields
from handler.engine.types import EmbeddingEngine
from handler.settings import Settings, engine_config

log = logging.getLogger("handler.batch")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m handler.batch",
        description="Embed a corpus (JSON Lines, CSV, Parquet; local or S3) into parts.",
    )
    p.add_argument("input", help="file, folder, s3://bucket/key or s3://bucket/prefix/")
    p.add_argument("output", help="folder or s3://bucket/prefix/")
    heads = p.add_argument_group("heads (default: --dense)")
    heads.add_argument("--dense", action="store_true", help="dense vectors")
    heads.add_argument("--sparse", action="store_true", help="sparse (lexical) weights")
    heads.add_argument("--colbert", action="store_true", help="ColBERT multi-vectors (large)")
    p.add_argument("--dimensions", type=int, help="keep the first N dense dimensions, renormalised")
    p.add_argument("--max-length", type=int, help="tokens per passage (default: the model's)")
    p.add_argument("--rows-per-part", type=int, default=10_000, help="rows per part (10000)")
    p.add_argument("--format", choices=["parquet", "jsonl"], default="parquet", dest="out_format")
    p.add_argument("--input-format", choices=["jsonl", "csv", "parquet"], help="default: by suffix")
    p.add_argument("--id-field", default="id", help="id field or column (default: id)")
    p.add_argument("--text-field", default="text", help="text field or column (default: text)")
    p.add_argument("--model-path", help="model directory (default: MODEL_PATH's first)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: DEVICE, else cpu")
    p.add_argument("--task-index", type=int, help="default: CLOUD_RUN_TASK_INDEX, else 0")
    p.add_argument("--task-count", type=int, help="default: CLOUD_RUN_TASK_COUNT, else 1")
    return p.parse_args(argv)


def task_of(
    index: int | None, count: int | None, environ: Mapping[str, str] | None = None
) -> tuple[int, int]:
    """This task's place among the job's tasks: the flags, else Cloud Run's variables."""
    env = os.environ if environ is None else environ
    i = index if index is not None else int(env.get("CLOUD_RUN_TASK_INDEX", "0") or 0)
    n = count if count is not None else int(env.get("CLOUD_RUN_TASK_COUNT", "1") or 1)
    return i, n


def options_from(args: argparse.Namespace) -> JobOptions:
    any_head = args.dense or args.sparse or args.colbert
    index, count = task_of(args.task_index, args.task_count)
    return JobOptions(
        heads=Heads(dense=args.dense or not any_head, sparse=args.sparse, colbert=args.colbert),
        dimensions=args.dimensions,
        max_length=args.max_length,
        rows_per_part=args.rows_per_part,
        output_format=args.out_format,
        input_format=args.input_format,
        fields=Fields(id=args.id_field, text=args.text_field),
        task_index=index,
        task_count=count,
    )


def load_engine(settings: Settings, model_path: str | None, device: str | None) -> EmbeddingEngine:
    from handler.engine import Engine

    paths = [Path(model_path)] if model_path else list(settings.model_paths)
    if not paths:
        raise JobError("no model: set MODEL_PATH or pass --model-path")
    config = engine_config(settings, job=True, device=device)  # type: ignore[arg-type]  # argparse choices
    return Engine.load(paths[0], config)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    settings = Settings()
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        options = options_from(args)
        engine = load_engine(settings, args.model_path, args.device)
        summary = run_job(
            engine,
            parse_location(args.input),
            parse_location(args.output),
            options,
        )
    except (JobError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if summary.parts_skipped:
        print(
            f"{summary.parts_skipped} part(s) were complete already and were skipped",
            file=sys.stderr,
        )
    print(json.dumps({"event": "summary", **summary.as_dict()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
