"""The onnxruntime session's memory and start-up, one variant per fresh process, variants taken in
turn (each round in a rotated order) so that a busy shared machine slows them alike.

    python -m bench.session_memory MODEL_DIR [--rounds 3] [--variants base,trim,...] [--reps 21]

Each child loads the engine the way the service does (Engine.load: sha256 check, tokenizer and
session in parallel, warm-up), then reads its memory from /proc: RSS, its anonymous and
file-backed parts, and how much of the external data file (model.onnx_data) is resident. Then the
p50 of a 9-token and a 128-token query, all three heads, as the bench's warm latency does. The
parent prints one line per child and the median of each variant.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import REPO_ROOT

Json = dict[str, Any]

QUERY_9 = "what is the capital of France?"  # 9 tokens with <s> and </s>
QUERY_128 = " ".join(
    ["The committee reviewed the quarterly figures and asked for a revised budget."] * 12
)

# name -> what the child changes: session options, session config entries, an environment
# allocator, glibc's malloc environment, or a trim after the load.
VARIANTS: dict[str, Json] = {
    "base": {"trim": False},
    "trim": {},
    "no-trim": {"trim": False},
    "arena-off": {"trim": False, "options": {"enable_cpu_mem_arena": False}},
    "arena-off+trim": {"options": {"enable_cpu_mem_arena": False}},
    "mem-pattern-off": {"trim": False, "options": {"enable_mem_pattern": False}},
    "env-arena-same-as-requested": {"trim": False, "env_allocator": True},
    "malloc-arena-max-2": {"trim": False, "env": {"MALLOC_ARENA_MAX": "2"}},
    "malloc-arena-max-2+trim": {"env": {"MALLOC_ARENA_MAX": "2"}},
    "engine-imports-only": {"no_model": True},
}


def status_kb() -> dict[str, int]:
    out: dict[str, int] = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if rest.strip().endswith("kB"):
            out[key] = int(rest.split()[0])
    return out


def mapped_rss_kb(suffix: str) -> int:
    """Resident kB of every mapping of a file whose path ends with `suffix`."""
    total, current = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5:  # a mapping's header line
            current = len(head) >= 6 and head[-1].endswith(suffix)
        elif current and line.startswith("Rss:"):
            total += int(head[1])
    return total


def memory(prefix: str) -> Json:
    s = status_kb()
    return {
        f"{prefix}rss_mib": round(s.get("VmRSS", 0) / 1024, 1),
        f"{prefix}anon_mib": round(s.get("RssAnon", 0) / 1024, 1),
        f"{prefix}file_mib": round(s.get("RssFile", 0) / 1024, 1),
        f"{prefix}onnx_data_mib": round(mapped_rss_kb("model.onnx_data") / 1024, 1),
    }


def p50_ms(engine: Any, text: str, reps: int) -> float:
    times = []
    for i in range(reps + 2):
        t = time.perf_counter()
        engine.encode([text], dense=True, sparse=True, colbert=True)
        if i >= 2:
            times.append((time.perf_counter() - t) * 1000)
    return round(statistics.median(times), 2)


def child(spec: Json) -> Json:
    t0 = time.perf_counter()
    import onnxruntime as ort

    options = spec.get("options") or {}
    if options or spec.get("env_allocator"):
        real = ort.SessionOptions

        def configured() -> Any:
            made = real()
            for key, value in options.items():
                setattr(made, key, value)
            if spec.get("env_allocator"):
                made.add_session_config_entry("session.use_env_allocators", "1")
            return made

        ort.SessionOptions = configured  # the probe's variant only
    if spec.get("env_allocator"):
        arena, default = ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, ort.OrtMemType.DEFAULT
        info = ort.OrtMemoryInfo("Cpu", arena, 0, default)
        # max_mem 0 (no cap), arena_extend_strategy 1 (kSameAsRequested), defaults for the rest
        ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, 1, -1, -1))

    from handler.engine import Engine, EngineConfig

    out: Json = {"imports_ms": round((time.perf_counter() - t0) * 1000, 1)}
    if spec.get("no_model"):
        out.update(memory("after_imports_"))
        return out
    config = EngineConfig(threads=spec.get("threads"), release_heap=spec.get("trim", True))
    engine = Engine.load(Path(spec["model_dir"]), config)
    out["load_ms"] = round(engine.load_ms, 1)
    out.update({f"{k}_ms": round(v, 1) for k, v in engine.load_timings_ms.items()})
    out.update(memory("after_load_"))
    out["p50_9tok_ms"] = p50_ms(engine, QUERY_9, spec["reps"])
    out["p50_128tok_ms"] = p50_ms(engine, QUERY_128, spec["reps"])
    out.update(memory("after_queries_"))
    out["hwm_mib"] = round(status_kb().get("VmHWM", 0) / 1024, 1)
    return out


def run_child(name: str, model_dir: Path, reps: int, threads: int | None) -> Json:
    spec = {**VARIANTS[name], "model_dir": str(model_dir), "reps": reps, "threads": threads}
    env = {**os.environ, **(spec.get("env") or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.session_memory", "--child", json.dumps(spec)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{name}: child failed:\n{proc.stderr[-3000:]}")
    result: Json = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path, nargs="?")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reps", type=int, default=21)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--variants", default="base,trim")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    names = args.variants.split(",")
    runs: dict[str, list[Json]] = {n: [] for n in names}
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            result = run_child(name, args.model_dir, args.reps, args.threads)
            runs[name].append(result)
            print(f"round {r + 1} {name}: {json.dumps(result)}", file=sys.stderr, flush=True)
    summary = {
        name: {
            key: round(statistics.median(r[key] for r in results), 1)
            for key in results[0]
            if isinstance(results[0][key], (int, float))
        }
        for name, results in runs.items()
    }
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
