"""The int8 stage's report (manifest `quantization.report`): the scheme, what stayed fp32 and why,
errors and sizes, and the measurements behind the design, read from the one data file that holds
them (model_build/data/int8_measurements.json, written from `python -m bench.int8_forms`)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from model_build.int8.options import FAULT_SCALE_FACTOR, Int8Options

if TYPE_CHECKING:
    from model_build.int8.rewrite import Stats

MEASUREMENTS_FILE = Path(__file__).resolve().parent.parent / "data" / "int8_measurements.json"
# The accuracy entries the report's sentences cite (keys of the data file's accuracy table).
AVX2_SATURATION = "DEFAULT under AVX2 VPMADDUBSW saturation (emulated)"
POSITIONS_INT8 = "default + position embeddings int8"


@cache
def measurements() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(MEASUREMENTS_FILE.read_text(encoding="utf-8"))
    return data


def accuracy(key: str) -> dict[str, float]:
    figures: dict[str, float] = measurements()["accuracy_dense_cosine"][key]
    return figures


def chosen_accuracy() -> dict[str, float]:
    return accuracy(measurements()["chosen"]["accuracy"])


WHY_ATTENTION = "no constant weight: both operands change with the input"
WHY_HEADS = (
    "an output head (after the encoder's last normalisation): its rounding error goes straight "
    "into the ColBERT / sparse outputs, and int8 would save little: bge-m3's ColBERT linear is 1 "
    "of 97 1024x1024-or-wider projections, the sparse linear has one output column"
)


def why_positions() -> str:
    return (
        "small table (bge-m3: 8194 x 1024, 34 MB fp32 of a 0.6 GB int8 model); int8 rows measured "
        f"worse on MiniLM (dense cosine mean {accuracy(POSITIONS_INT8)['mean']} vs "
        f"{chosen_accuracy()['mean']}, {MEASUREMENTS_FILE.name})"
    )


def cpu_note(options: Int8Options) -> str:
    if options.weights != "s8":
        return "exact on every x86 and arm64 CPU"
    return (
        "x86 without VNNI runs u8 x s8 through saturating VPMADDUBSW: measured (emulated) dense "
        f"cosine min {accuracy(AVX2_SATURATION)['min']} on MiniLM; build with weights='u8' for "
        "such CPUs"
    )


def summarise_kept(kept: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Group the fp32 decisions by (what, why); list the node names once per group."""
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for item in kept:
        key = (str(item["what"]), str(item["why"]))
        group = groups.setdefault(key, {"what": key[0], "why": key[1], "count": 0, "nodes": []})
        group["count"] += 1
        group["nodes"].append(item["node"])
        for extra, plural in (("shape", "shapes"), ("fp32_bytes", "fp32_bytes_each")):
            if extra in item:
                group.setdefault(plural, []).append(item[extra])
    return list(groups.values())


def cited_measurements() -> dict[str, Any]:
    """Where the design's figures are, and the chosen form's own."""
    data = measurements()
    return {
        "file": f"model_build/data/{MEASUREMENTS_FILE.name}",
        "date": data["date"],
        "machine": data["machine"],
        "chosen_accuracy_dense_cosine": chosen_accuracy(),
        "chosen_speed_32x128": data["speed"][data["chosen"]["speed"]],
    }


def int8_report(
    options: Int8Options,
    stats: Stats,
    *,
    fault_inject: str | None,
    sizes: dict[str, int],
    seconds: float,
    onnx_ops: list[str],
) -> dict[str, Any]:
    errors = stats.weight_rel_errors
    one_sided = (
        f"fixed zero point {options.gelu_zero_point}, scale per row"
        if options.gelu_zero_point is not None
        else "zero point per row, corrected after the GEMM"
    )
    return {
        "method": "int8: symmetric per-column weights, dynamic per-row (per-token) activations",
        "kernel": "com.microsoft.MatMulIntegerToFloat, MLAS "
        + ("u8 x s8 (VNNI / arm64)" if options.weights == "s8" else "u8 x u8 (exact on AVX2)"),
        "cpu_note": cpu_note(options),
        "options": asdict(options),
        "weights": {
            "scheme": f"symmetric int8 per output column, range +-{options.weight_max}",
            "matmuls": len(stats.quantized),
            "rel_error_mean": round(float(np.mean(errors)), 6) if errors else None,
            "rel_error_max": round(float(np.max(errors)), 6) if errors else None,
        },
        "activations": {
            "granularity": "per row (token), computed at run time: a text's result does not "
            "depend on the rest of the batch",
            "rows": "symmetric, uint8 with zero point 128"
            if options.activations == "row-sym"
            else "asymmetric, zero point per row, corrected after the GEMM",
            "ffn_out_rows": one_sided if options.asym_inputs == "gelu" else "as the others",
            "quantized_inputs": stats.quantized_inputs,
            "one_sided_inputs": stats.one_sided_inputs,
            "matmuls_sharing_an_input": len(stats.quantized) - stats.quantized_inputs,
            "merged_duplicate_nodes": stats.merged_duplicates,
        },
        "embeddings": stats.embeddings,
        "kept_fp32": summarise_kept(stats.kept_fp32),
        "heads_kept_fp32": [k["node"] for k in stats.kept_fp32 if k["why"] == WHY_HEADS],
        "fault_inject": None
        if fault_inject is None
        else {
            "fault": fault_inject,
            "weight_scales_multiplied_by": FAULT_SCALE_FACTOR,
            "which": "every int8 MatMul, and the word-embedding rows of even token ids",
        },
        "sizes": sizes,
        "seconds": seconds,
        "onnx_ops": onnx_ops,
        "measured": cited_measurements(),
    }
