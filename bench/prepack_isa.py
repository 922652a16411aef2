"""Is a graph saved with onnxruntime's pre-packed weights safe on a CPU other than the one that
packed them?

    python -m bench.prepack_isa save MODEL_DIR OUT_DIR     # pack here, save graph + blobs
    python -m bench.prepack_isa compare MODEL_DIR OUT_DIR  # on the CPU under test
    python -m bench.prepack_isa time MODEL_DIR OUT_DIR     # what the saved graphs save at start
    python -m bench.prepack_isa corrupt OUT_DIR BAD_DIR    # a copy whose int8 blobs are damaged

`save` writes OUT_DIR/prepacked.onnx with `session.save_external_prepacked_constant_initializers`
(the packed MLAS blobs go to its external data file) and OUT_DIR/extended.onnx, optimized at
ORT_ENABLE_EXTENDED without blobs. `compare` runs the same inputs through a session built from the
artifact's own graph (packed by this CPU) and through each saved graph loaded with optimizations
off (blobs from the CPU that saved them), and prints the largest difference of each output. Run
`compare` under `qemu-x86_64 -cpu MODEL` to stand in for another CPU: MLAS picks its kernels and
their packed layout from CPUID, which qemu reports for the model it emulates. `time` starts each
graph in fresh processes, in turn, and reports session creation and RSS.

`corrupt` copies OUT_DIR to BAD_DIR with the first 256 bytes of every `MatMulIntegerToFloat` blob
flipped, and reports the blobs' sizes (the packed layout shows in them: 1152 bytes per tiny-fixture
weight packed for AVX2 or AVX-512, 2176 for AMX). `compare` on BAD_DIR tells whether a CPU uses the
blobs it finds: a damaged blob that is used moves the outputs; one that is not leaves them equal.
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
import onnxruntime as ort

SAVED = "prepacked.onnx"
EXTENDED = "extended.onnx"  # optimized at ORT_ENABLE_EXTENDED, saved without pre-packed blobs


def options(level: Any) -> Any:
    made = ort.SessionOptions()
    made.intra_op_num_threads = 1
    made.graph_optimization_level = level
    made.log_severity_level = 3
    return made


def save(model_dir: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, level, prepacked in (
        (SAVED, ort.GraphOptimizationLevel.ORT_ENABLE_ALL, True),
        (EXTENDED, ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, False),
    ):
        made = options(level)
        made.optimized_model_filepath = str(out / name)
        made.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", name + "_data"
        )
        made.add_session_config_entry(
            "session.optimized_model_external_initializers_min_size_in_bytes", "1024"
        )
        if prepacked:
            made.add_session_config_entry(
                "session.save_external_prepacked_constant_initializers", "1"
            )
        ort.InferenceSession(
            str(model_dir / "model.onnx"),
            made,
            providers=["CPUExecutionProvider"],
            disabled_optimizers=["SkipLayerNormFusion"],  # as handler/engine/session.py
        )


def time_one(graph: Path, level: Any) -> dict[str, float]:
    """Session creation in this (fresh) process, and its RSS after."""
    made = options(level)
    made.intra_op_num_threads = 2
    t = time.perf_counter()
    session = ort.InferenceSession(
        str(graph),
        made,
        providers=["CPUExecutionProvider"],
        disabled_optimizers=["SkipLayerNormFusion"],
    )
    ms = (time.perf_counter() - t) * 1000
    rss = next(
        int(line.split()[1]) / 1024
        for line in Path("/proc/self/status").read_text().splitlines()
        if line.startswith("VmRSS:")
    )
    del session  # alive until the reading above
    return {"session_ms": round(ms, 1), "rss_mib": round(rss, 1)}


def time_all(model_dir: Path, out: Path, rounds: int) -> dict[str, Any]:
    """Each graph in a fresh process, taken in turn, `rounds` times."""
    graphs = {
        "artifact graph, ORT_ENABLE_ALL": (model_dir / "model.onnx", "ORT_ENABLE_ALL"),
        "saved EXTENDED graph, optimizations off": (out / EXTENDED, "ORT_DISABLE_ALL"),
        "saved graph with pre-packed blobs, optimizations off": (out / SAVED, "ORT_DISABLE_ALL"),
    }
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in graphs}
    for _ in range(rounds):
        for name, (graph, level) in graphs.items():
            proc = subprocess.run(
                [sys.executable, "-m", "bench.prepack_isa", "time-one", str(graph), level],
                capture_output=True,
                text=True,
                check=True,
            )
            runs[name].append(json.loads(proc.stdout))
    return {
        name: {k: sorted(r[k] for r in results) for k in results[0]}
        for name, results in runs.items()
    }


def inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 30000, size=(3, 40), dtype=np.int64)
    ids[:, 0], ids[:, -1] = 0, 2
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def compare(model_dir: Path, out: Path) -> dict[str, Any]:
    feeds = inputs()
    fresh = ort.InferenceSession(
        str(model_dir / "model.onnx"),
        options(ort.GraphOptimizationLevel.ORT_ENABLE_ALL),
        providers=["CPUExecutionProvider"],
        disabled_optimizers=["SkipLayerNormFusion"],  # as handler/engine/session.py and save()
    )
    result: dict[str, Any] = {"cpu_flags": cpu_flags()}
    names = [o.name for o in fresh.get_outputs()]
    expected = fresh.run(names, feeds)
    result["max_abs_value"] = {
        n: float(np.max(np.abs(x))) for n, x in zip(names, expected, strict=True)
    }
    for graph in (SAVED, EXTENDED):
        try:
            loaded = ort.InferenceSession(
                str(out / graph),
                options(ort.GraphOptimizationLevel.ORT_DISABLE_ALL),
                providers=["CPUExecutionProvider"],
            )
        except Exception as exc:  # a refusal is an answer too
            result[graph] = f"refused: {exc}"
            continue
        got = loaded.run(names, feeds)
        result[graph] = {
            n: float(np.max(np.abs(x - y))) for n, x, y in zip(names, expected, got, strict=True)
        }
    return result


def int8_blobs(graph: Path) -> list[tuple[int, int]]:
    """(offset, size) of each `MatMulIntegerToFloat` pre-packed blob the saved graph names."""
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    found = []
    for init in model.graph.initializer:
        for entry in init.external_data:
            if entry.key.startswith("prepacked") and entry.value.startswith("MatMulIntegerToFloat"):
                # key|offset;size;checksum
                offset, size, _ = entry.value.split("|")[1].split(";")
                found.append((int(offset), int(size)))
    return found


def corrupt(out: Path, bad: Path) -> dict[str, Any]:
    shutil.rmtree(bad, ignore_errors=True)
    shutil.copytree(out, bad)
    blobs = int8_blobs(bad / SAVED)
    data_file = bad / (SAVED + "_data")
    data = bytearray(data_file.read_bytes())
    for offset, size in blobs:
        for i in range(offset, offset + min(256, size)):
            data[i] ^= 0x5A
    data_file.write_bytes(bytes(data))
    sizes = sorted({size for _, size in blobs})
    return {"corrupted_blobs": len(blobs), "blob_sizes": sizes}


def cpu_flags() -> list[str]:
    """The features CPUID reports to this process (numpy's own probe; /proc/cpuinfo would show the
    host's even under qemu)."""
    from numpy._core._multiarray_umath import (  # type: ignore[import-not-found]
        __cpu_features__ as features,
    )

    wanted = ("AVX", "AVX2", "AVX512F", "AVX512BW", "AVX512VNNI", "AVX512_SPR")
    return [name for name in wanted if features.get(name)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("save", "compare", "time", "time-one", "corrupt"))
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("out")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    if args.action == "time-one":  # a child of `time`: model_dir is the graph, out the level
        level = getattr(ort.GraphOptimizationLevel, args.out)
        print(json.dumps(time_one(args.model_dir, level)))
    elif args.action == "save":
        save(args.model_dir, Path(args.out))
        print(json.dumps({"saved": [SAVED, EXTENDED]}))
    elif args.action == "corrupt":  # model_dir is a `save` output here
        print(json.dumps(corrupt(args.model_dir, Path(args.out))))
    elif args.action == "time":
        print(json.dumps(time_all(args.model_dir, Path(args.out), args.rounds), indent=1))
    else:
        print(json.dumps(compare(args.model_dir, Path(args.out)), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
