"""int8 quantization of an exported encoder graph for onnxruntime's CPU provider.

The graph it writes (each choice measured; the figures are in one data file,
model_build/data/int8_measurements.json, written from `python -m bench.int8_forms accuracy|speed`):

- **Weights**: every MatMul/Gemm with a constant weight B [K, N] inside the encoder (Q, K, V,
  attention output, FFN in and out of every layer) is symmetric int8 per output column
  (s_n = max_k |B[k, n]| / 127, no zero point).
- **Activations**: dynamic and **per row** (per token), computed in the graph, so a text's result
  never depends on what else is in the batch. onnxruntime's own `quantize_dynamic` uses one scale
  for the whole batch (its x86 `DynamicQuantizeMatMul`): one outlier token degrades every text.
  - rows are symmetric: s_row = max |x_row| / 127, q = round(x / s_row) + 128 as uint8 with the
    constant zero point 128;
  - a constant zero point is what `com.microsoft.MatMulIntegerToFloat` takes, so MLAS runs its
    u8 x s8 GEMM (AVX-512 VNNI / AVX-VNNI `VPDPBUSD`, arm64 dot products) and handles the zero
    point inside the kernel; the rounding is one per-axis `QuantizeLinear` on the [tokens, K] view;
    the row scale is one `Mul` on the output; Q, K and V share one quantized copy of their input;
  - FFN-out inputs (GELU outputs, >= -0.17) are asymmetric instead: [min, max] of each row onto
    0..255 with its own zero point z_row, and y = s_row * (q.W - z_row * colsum(W)) after the GEMM
    (two more passes over the [tokens, 1024] output). A symmetric range there wastes half the
    codes; one fixed zero point for all rows measured as good on the chosen graph but worse than
    symmetric on others (rows with a small maximum), so the exact per-row range is kept.
- **Word embeddings** (vocabulary x hidden, 1 GB fp32 for bge-m3): int8 rows with one fp32 scale
  per row (Gather int8, Gather scale, Cast, Mul).
- **Kept fp32**, each listed in the report with its reason: attention's activation x activation
  MatMuls, position and token-type embeddings, the output heads (projections after the encoder's
  last normalisation: bge-m3's ColBERT and sparse linears), LayerNorm, softmax, GELU.

Only standard ONNX ops and com.microsoft.MatMulIntegerToFloat are used: both have CPU kernels on
x86-64 and arm64. The symbolic shapes of the fp32 graph are kept (value_info), so onnxruntime still
fuses SkipLayerNormalization and BiasGelu around the int8 MatMuls.

**x86 CPUs without VNNI** (AVX2 / AVX-512 without VNNI, e.g. AMD Zen 2/3, Intel Skylake-SP): MLAS's
u8 x s8 kernel there uses VPMADDUBSW, which adds pairs of u8 x s8 products into int16 with
saturation; with activations centred on 128 the pairs saturate (emulated on MiniLM: below the gate,
see the data file). `Int8Options(weights="u8")` stores the same
weights as uint8 + 128 and selects MLAS's exact u8 x u8 kernel (about half the GEMM speed on VNNI).

The code, by concern: model_build/int8/options.py (the knobs), graph.py (an ONNX graph being
rewritten, and its files), emit.py (the int8 emitters), rewrite.py (which node becomes what),
report.py (the stage's report).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import onnx

from model_build.int8.graph import inferred_shapes, model_bytes, restore_value_info, save_model
from model_build.int8.options import FAULT_SCALE_FACTOR, FAULTS, Int8Options
from model_build.int8.report import int8_report
from model_build.int8.rewrite import rewrite

__all__ = [
    "FAULTS",
    "FAULT_SCALE_FACTOR",
    "Int8Options",
    "quantize_int8",
    "quantize_int8_with",
    "save_model",
]


def quantize_int8_with(
    src: Path, dst: Path, options: Int8Options, *, fault_inject: str | None = None
) -> dict[str, Any]:
    """`quantize_int8` with explicit options (the benchmarks compare forms with it)."""
    if fault_inject is not None and fault_inject not in FAULTS:
        raise ValueError(f"unknown fault {fault_inject!r}; known: {', '.join(FAULTS)}")
    if not 1 <= options.weight_max <= 127:
        raise ValueError(f"weight_max must be in 1..127, got {options.weight_max}")
    if options.gelu_zero_point is not None and not 1 <= options.gelu_zero_point <= 128:
        raise ValueError(f"gelu_zero_point must be in 1..128, got {options.gelu_zero_point}")
    started = time.monotonic()
    src, dst = Path(src), Path(dst)
    shapes = inferred_shapes(src)
    model = onnx.load(str(src), load_external_data=True)
    stats = rewrite(model, options, fault_inject, shapes)
    restore_value_info(model.graph, shapes)
    save_model(model, dst)
    return int8_report(
        options,
        stats,
        fault_inject=fault_inject,
        sizes={"src_bytes": model_bytes(src), "dst_bytes": model_bytes(dst)},
        seconds=round(time.monotonic() - started, 2),
        onnx_ops=sorted({f"{n.domain or 'ai.onnx'}.{n.op_type}" for n in model.graph.node}),
    )


def quantize_int8(
    src: Path, dst: Path, *, fault_inject: str | None = None, weights: str = "s8"
) -> dict[str, Any]:
    """Quantize the fp32 graph `src` (external data beside it) to the int8 graph `dst` (its data
    in `<dst name>_data` beside it). Returns a JSON-able report: method, kernel, what stayed fp32
    and why, and the measurements behind the design.

    `fault_inject="int8-weight-scale"` multiplies the weight scales of every int8 MatMul (and of
    every other word-embedding row) by FAULT_SCALE_FACTOR: a deliberately broken model, for
    checking that the fidelity gate refuses it. `weights="u8"` picks the kernel that is exact on x86
    without VNNI."""
    if weights not in ("s8", "u8"):
        raise ValueError(f"weights must be 's8' or 'u8', got {weights!r}")
    options = Int8Options(weights="u8" if weights == "u8" else "s8")
    return quantize_int8_with(src, dst, options, fault_inject=fault_inject)
