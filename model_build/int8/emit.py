"""The int8 emitters: per-row dynamic quantization of an activation, symmetric per-column int8
weights, the MatMulIntegerToFloat that multiplies them, and int8 embedding tables."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from model_build.int8.graph import GraphBuilder, label
from model_build.int8.options import FAULT_SCALE_FACTOR, MS_DOMAIN, Int8Options, RowScale


@dataclass
class QuantizedInput:
    x_q: str  # uint8, the input's shape
    row_scale: str  # float [..., 1]
    zero_point: str | None  # scalar uint8, when one zero point serves every row
    row_zero: str | None  # float [..., 1], when each row has its own (corrected after the GEMM)


@dataclass
class RowGroup:
    """Shape nodes shared by every quantized input with the same leading (token) dims."""

    anchor: str  # one input of the group
    lead: str | None = None  # int64: the leading dims
    rows: str | None = None  # int64 [1]: their product
    zero_points: dict[int, str] = field(default_factory=dict)  # uint8 [rows] per value
    shapes: dict[int, str] = field(default_factory=dict)  # int64: lead + [K] per K


def _group_lead(b: GraphBuilder, g: RowGroup, hint: str) -> str:
    if g.lead is None:
        shape = b.node("Shape", [g.anchor], hint)
        zero, last = (
            b.shared("i0", np.array([0], np.int64)),
            b.shared("i-1", np.array([-1], np.int64)),
        )
        g.lead = b.node("Slice", [shape, zero, last, zero], hint)
    return g.lead


def _group_zero_point(b: GraphBuilder, g: RowGroup, value: int, hint: str) -> str:
    """uint8 [rows] filled with `value`: QuantizeLinear's per-row zero point."""
    if value not in g.zero_points:
        if g.rows is None:
            g.rows = b.node("ReduceProd", [_group_lead(b, g, hint)], hint, keepdims=1)
        zp = numpy_helper.from_array(np.array([value], np.uint8))
        g.zero_points[value] = b.node("ConstantOfShape", [g.rows], hint, value=zp)
    return g.zero_points[value]


def _group_shape(b: GraphBuilder, g: RowGroup, k: int, hint: str) -> str:
    if k not in g.shapes:
        k_const = b.shared(f"n{k}", np.array([k], np.int64))
        g.shapes[k] = b.node("Concat", [_group_lead(b, g, hint), k_const], hint, axis=0)
    return g.shapes[k]


def quantize_rows(
    b: GraphBuilder, x: str, k: int, options: Int8Options, one_sided: bool, group: RowGroup
) -> QuantizedInput:
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
        return QuantizedInput(x_q, scale, zp, None)
    levels = options.activation_asym_levels
    fixed = options.gelu_zero_point if one_sided else None
    if fixed is not None:
        # s = max(hi / (levels - Z), -lo / Z): [lo, hi] fits exactly, zero point Z for every row.
        pos = b.node("Mul", [hi, b.scalar(1 / (levels - fixed))], hint)
        neg = b.node("Mul", [lo, b.scalar(-1 / fixed)], hint)
        scale = b.node("Max", [pos, neg, eps], hint)
        zp = b.shared(f"zp{fixed}", np.array(fixed, np.uint8))
        return QuantizedInput(
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
    return QuantizedInput(quantize(scale, zp_1d), scale, None, zero_f)


def quantize_weight(w: np.ndarray, weight_max: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Symmetric per-column int8: w [K, N] ~ q [K, N] * s [N]. Returns q, s, relative error."""
    w = w.astype(np.float32, copy=False)
    amax = np.abs(w).max(axis=0)
    scale = np.where(amax > 0, amax / weight_max, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale), -weight_max, weight_max).astype(np.int8)
    norm = max(float(np.linalg.norm(w)), 1e-30)
    return q, scale, float(np.linalg.norm(q.astype(np.float32) * scale - w) / norm)


@dataclass
class Weight:
    stored: str  # int8 [K, N] (or uint8 + 128)
    scale: str  # float [N]
    zero_point: str | None  # uint8 128 for "u8" weights
    q: np.ndarray
    scale_values: np.ndarray
    colsum_scaled: str | None = None  # for rows with their own zero point


def emit_matmul(
    b: GraphBuilder, qin: QuantizedInput, w: Weight, output: str, hint: str, mode: RowScale
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


def quantize_gather(
    b: GraphBuilder,
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
    hint = f"int8/{label(node)}"
    ids = node.input[1]
    gathered = b.node("Gather", [b.const(f"{node.input[0]}_int8", q), ids], hint, axis=0)
    scales = b.node("Gather", [b.const(f"{node.input[0]}_row_scale", scale), ids], hint, axis=0)
    rows_f = b.node("Cast", [gathered], hint, to=TensorProto.FLOAT)
    b.to("Mul", [rows_f, scales], node.output[0], hint)
