"""`python -m bench.gpu ARTIFACT`: the GPU variant measured on a machine with an NVIDIA GPU.

The same engine and server as the GPU image (`DEVICE=cuda`, the fp16 artifact), with the model
files already built. It refuses to report anything when onnxruntime did not really run on CUDA
(the engine falls back to CPU with a warning, which would make every figure a CPU figure), unless
`--allow-cpu` says that a CPU run is wanted (to try this script on a machine without a GPU).

Measured, each printed and written to `--out` as JSON:
- load: engine load (tokenizer, session, warm-up) and the device the session runs on;
- agreement: the same artifact on the CUDA and the CPU execution provider, same inputs (dense
  cosine, sparse and ColBERT differences), and pairwise scores within [-1, 1];
- latency p50 for one text of 9 / 128 / 512 tokens, throughput at 32 x 128, 8 x 512 and
  64 x 512 tokens, one 8192-token text;
- concurrency: `python -m handler.main` on 127.0.0.1 with N clients (bench/concurrency.py).
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

import numpy as np

from bench import concurrency
from bench.common import Json, machine_info, package_version, percentile, say
from bench.texts import TokenTexts
from handler.engine.engine import Engine, EngineConfig

LATENCY = ((9, 50), (128, 50), (512, 30))  # tokens, repetitions
THROUGHPUT = ((32, 128), (8, 512), (64, 512))  # texts, tokens each
THROUGHPUT_REPS = 10
LONG_TOKENS = 8192
PLAN = concurrency.Plan(
    levels=(1, 4, 16),
    requests_per_client=40,
    min_requests=80,
    start_timeout_s=300.0,
    level_timeout_s=90.0,
    request_timeout_s=60.0,
)


def nvidia_smi(query: str) -> str | None:
    """One `nvidia-smi --query-gpu` field list for the first GPU, or None without one."""
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.strip().splitlines()
    return lines[0] if lines else None


def gpu_memory_used_mib() -> float | None:
    used = nvidia_smi("memory.used")
    try:
        return float(used) if used is not None else None
    except ValueError:
        return None


def timed(fn: Any, reps: int) -> list[float]:
    samples = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t) * 1000.0)
    return samples


def agreement(gpu: Engine, cpu: Engine, texts: list[str]) -> Json:
    """The same fp16 graph on both execution providers: how far CUDA's kernels move the outputs."""
    a = gpu.encode(texts, dense=True, sparse=True, colbert=True)
    b = cpu.encode(texts, dense=True, sparse=True, colbert=True)
    assert a.dense is not None and b.dense is not None
    cosines = np.sum(a.dense * b.dense, axis=1)
    sparse_err = []
    for wa, wb in zip(a.sparse or [], b.sparse or [], strict=True):
        keys = set(wa) | set(wb)
        sparse_err.append(max((abs(wa.get(k, 0.0) - wb.get(k, 0.0)) for k in keys), default=0.0))
    colbert_cos = [
        float(np.min(np.sum(x * y, axis=1)))
        for x, y in zip(a.colbert or [], b.colbert or [], strict=True)
    ]
    scores = gpu.score(texts, texts)
    self_dense = scores.dense
    return {
        "texts": len(texts),
        "dense_cosine_min": round(float(np.min(cosines)), 6),
        "sparse_max_abs_diff": round(max(sparse_err), 6),
        "colbert_row_cosine_min": round(min(colbert_cos), 6),
        "self_score_dense_max": round(max(self_dense), 6),
        "self_score_dense_min": round(min(self_dense), 6),
        "scores_within_unit_interval": all(-1.0 <= s <= 1.0 for s in self_dense),
    }


def measure_engine(gpu: Engine, maker: TokenTexts) -> Json:
    result: Json = {}
    latency: Json = {}
    for tokens, reps in LATENCY:
        text = maker.make(tokens, 100 + tokens)
        gpu.encode([text])
        samples = timed(lambda text=text: gpu.encode([text]), reps)
        latency[str(tokens)] = {
            "p50_ms": round(statistics.median(samples), 2),
            "p95_ms": round(percentile(samples, 95), 2),
        }
    result["latency_dense"] = latency
    say("gpu", f"latency: {latency}")

    throughput: Json = {}
    for n, tokens in THROUGHPUT:
        batch = maker.many(n, tokens, seed=tokens * 7 + n)
        gpu.encode(batch, dense=True, sparse=True, colbert=True)
        samples = timed(
            lambda batch=batch: gpu.encode(batch, dense=True, sparse=True, colbert=True),
            THROUGHPUT_REPS,
        )
        best = min(samples)
        throughput[f"{n}x{tokens}"] = {
            "best_ms": round(best, 1),
            "median_ms": round(statistics.median(samples), 1),
            "tokens_per_s": round(n * tokens / (best / 1000.0)),
        }
    result["throughput_all_heads"] = throughput
    say("gpu", f"throughput: {throughput}")

    long_text = maker.make(LONG_TOKENS, 8192)
    before = gpu_memory_used_mib()
    gpu.encode([long_text], dense=True, sparse=True, colbert=True)
    samples = timed(lambda: gpu.encode([long_text], dense=True, sparse=True, colbert=True), 3)
    result["long_text"] = {
        "tokens": LONG_TOKENS,
        "min_ms": round(min(samples), 1),
        "gpu_memory_used_mib_before": before,
        "gpu_memory_used_mib_after": gpu_memory_used_mib(),
    }
    say("gpu", f"8192 tokens: {result['long_text']}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n")[0])
    parser.add_argument("artifact", type=Path, help="an fp16 artifact (python -m model_build)")
    parser.add_argument("--tokenizer-json", type=Path, help="default: ARTIFACT/tokenizer.json")
    parser.add_argument("--out", type=Path, default=Path("gpu.json"))
    parser.add_argument("--allow-cpu", action="store_true", help="report even without CUDA")
    parser.add_argument("--no-concurrency", action="store_true")
    args = parser.parse_args(argv)

    result: Json = {
        "machine": machine_info(),
        "gpu": nvidia_smi("name,driver_version,memory.total"),
    }
    result["packages"] = {
        name: package_version(name) for name in ("onnxruntime-gpu", "onnxruntime", "numpy")
    }
    maker = TokenTexts(args.tokenizer_json or args.artifact / "tokenizer.json")

    t = time.perf_counter()
    gpu = Engine.load(args.artifact, EngineConfig(device="cuda", verify="size"))
    result["load"] = {
        "wall_ms": round((time.perf_counter() - t) * 1000.0, 1),
        "parts_ms": {k: round(v, 1) for k, v in gpu.load_timings_ms.items()},
        "providers": gpu.session.get_providers(),
        "device": gpu.info.device,
        "precision": gpu.info.precision,
    }
    say("gpu", f"loaded on {result['load']['providers']} in {result['load']['wall_ms']} ms")
    if result["load"]["device"] != "cuda" and not args.allow_cpu:
        print("onnxruntime did not run on CUDA; refusing to report CPU figures", file=sys.stderr)
        return 1

    cpu = Engine.load(args.artifact, EngineConfig(device="cpu", verify="size"))
    texts = [maker.make(tokens, seed) for seed, tokens in enumerate((5, 9, 32, 128, 300, 512))]
    result["agreement"] = agreement(gpu, cpu, texts)
    say("gpu", f"agreement with the CPU provider: {result['agreement']}")
    del cpu

    result.update(measure_engine(gpu, maker))
    del gpu

    if not args.no_concurrency:
        os.environ["DEVICE"] = "cuda"
        texts = [maker.make(128, 4242 + i) for i in range(concurrency.requests(PLAN) + 1)]
        result["concurrency_128_tokens"] = concurrency.measure(
            args.artifact, texts, 128, PLAN, args.out.parent / "gpu-server.log"
        )

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    say("gpu", f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
