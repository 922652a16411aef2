"""What the graph optimized at build time (model_build/optimize.py) saves at session start.

    python -m bench.optimized_graph prepare MODEL_DIR OUT_DIR   # an optimized copy of the graph
    python -m bench.optimized_graph time MODEL_DIR OUT_DIR      # both, fresh processes, in turn

`prepare` copies MODEL_DIR's graph and weights (the artifact is only read) to OUT_DIR and runs the
build's optimize stage on the copy. `time` starts each in fresh processes, alternating, `--rounds`
times: `create_session` as the engine calls it (MODEL_DIR's graph with its manifest's record,
OUT_DIR's with the record of the optimization), then the p50 of a 9-token query, and the largest
difference between the two graphs' outputs for the same inputs. `--levels` adds the optimized
graph loaded at other levels (e.g. ORT_ENABLE_BASIC) to the rotation.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from handler.engine import session as session_module
from handler.engine.manifest import OptimizedGraph, load_manifest

GRAPH, DATA = "model.onnx", "model.onnx_data"
RECORD = "optimized.json"  # OUT_DIR's copy of the optimize stage's record
QUERY_TOKENS = 9


def prepare(model_dir: Path, out: Path) -> OptimizedGraph:
    from model_build.optimize import optimize_graph
    from model_build.progress import Progress

    out.mkdir(parents=True, exist_ok=True)
    for name in (GRAPH, DATA):
        shutil.copyfile(model_dir / name, out / name)
    record = optimize_graph(out / GRAPH, DATA, Progress())
    (out / RECORD).write_text(json.dumps(record.__dict__), encoding="utf-8")
    return record


def _record(graph_dir: Path) -> OptimizedGraph | None:
    path = graph_dir / RECORD
    if path.is_file():
        raw = json.loads(path.read_text(encoding="utf-8"))
        return OptimizedGraph(**{**raw, "disabled_optimizers": tuple(raw["disabled_optimizers"])})
    return load_manifest(graph_dir).onnx.optimized


def feeds(batch: int = 1, tokens: int = QUERY_TOKENS) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 30000, size=(batch, tokens), dtype=np.int64)
    ids[:, 0], ids[:, -1] = 0, 2
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def time_one(
    graph_dir: Path, level: str | None, queries: int, threads: int, outputs: Path | None
) -> Any:
    """In this (fresh) process: create_session as the engine calls it, then query latency."""
    import onnxruntime as ort

    optimized = _record(graph_dir)
    if level is not None:  # another level for the same graph, through the same create_session
        forced = getattr(ort.GraphOptimizationLevel, level)
        session_module.optimization_level = lambda *_: (forced, None)
    t = time.perf_counter()
    session = session_module.create_session(
        graph_dir / GRAPH, device="cpu", threads=threads, optimized=optimized
    )
    session_ms = (time.perf_counter() - t) * 1000
    query = feeds()
    session.run(None, query)  # the first run plans memory
    runs = []
    for _ in range(queries):
        t = time.perf_counter()
        session.run(None, query)
        runs.append((time.perf_counter() - t) * 1000)
    if outputs is not None:
        got = session.run(None, feeds(batch=3, tokens=40))
        np.savez(outputs, *got)
    return {
        "session_ms": round(session_ms, 1),
        "level": str(session.get_session_options().graph_optimization_level).split(".")[-1],
        "query_p50_ms": round(float(np.percentile(runs, 50)), 3),
    }


def time_all(
    model_dir: Path, out: Path, rounds: int, queries: int, threads: int, levels: list[str]
) -> Any:
    variants: dict[str, tuple[Path, str | None]] = {
        "artifact graph (engine: ORT_ENABLE_ALL)": (model_dir, None),
        "optimized graph (engine: ORT_DISABLE_ALL)": (out, None),
    }
    variants |= {f"optimized graph at {level}": (out, level) for level in levels}
    runs: dict[str, list[Any]] = {name: [] for name in variants}
    arrays: dict[str, Path] = {}
    for round_ in range(rounds):
        for name, (graph_dir, level) in variants.items():
            args = [str(graph_dir), "--queries", str(queries), "--threads", str(threads)]
            if level is not None:
                args += ["--level", level]
            if round_ == 0:
                arrays[name] = out / f"outputs-{len(arrays)}.npz"
                args += ["--outputs", str(arrays[name])]
            proc = subprocess.run(
                [sys.executable, "-m", "bench.optimized_graph", "time-one", *args],
                capture_output=True,
                text=True,
                check=True,
            )
            runs[name].append(json.loads(proc.stdout))
    first = np.load(next(iter(arrays.values())))
    differences = {}
    for name, path in list(arrays.items())[1:]:
        other = np.load(path)
        differences[name] = [float(np.max(np.abs(first[k] - other[k]))) for k in first.files]
    return {"runs": runs, "max_abs_difference_vs_artifact_graph": differences}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("prepare", "time", "time-one"))
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("out", type=Path, nargs="?")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--levels", nargs="*", default=[])
    parser.add_argument("--level")
    parser.add_argument("--outputs", type=Path)
    args = parser.parse_args(argv)
    if args.action == "time-one":  # a child of `time`
        print(
            json.dumps(
                time_one(args.model_dir, args.level, args.queries, args.threads, args.outputs)
            )
        )
        return 0
    if args.out is None:
        parser.error(f"{args.action} needs OUT_DIR")
    if args.action == "prepare":
        print(json.dumps(prepare(args.model_dir, args.out).__dict__))
    else:
        result = time_all(
            args.model_dir, args.out, args.rounds, args.queries, args.threads, args.levels
        )
        print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
