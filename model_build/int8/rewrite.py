"""The rewrite: every constant-weight MatMul/Gemm of the encoder becomes an int8
MatMulIntegerToFloat on a per-row quantized input, word embeddings become int8 rows, and every
node that stays fp32 is recorded with the reason (the report lists them)."""

from __future__ import annotations

import hashlib
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from model_build.int8.emit import (
    QuantizedInput,
    RowGroup,
    Weight,
    emit_matmul,
    quantize_gather,
    quantize_rows,
    quantize_weight,
)
from model_build.int8.graph import GraphBuilder, drop_unused_initializers, label
from model_build.int8.options import FAULT_SCALE_FACTOR, MS_DOMAIN, Int8Options
from model_build.int8.report import WHY_ATTENTION, WHY_HEADS, why_positions

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


@dataclass
class Stats:
    quantized: list[dict[str, Any]] = field(default_factory=list)
    kept_fp32: list[dict[str, Any]] = field(default_factory=list)
    embeddings: list[dict[str, Any]] = field(default_factory=list)
    weight_rel_errors: list[float] = field(default_factory=list)
    merged_duplicates: int = 0
    quantized_inputs: int = 0
    one_sided_inputs: int = 0


def merge_duplicates(graph: onnx.GraphProto) -> int:
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


def head_nodes(graph: onnx.GraphProto) -> set[str] | None:
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


def after_gelu(tensor: str, producers: dict[str, onnx.NodeProto], depth: int = 5) -> bool:
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


class Rewriter:
    """One pass over the graph's nodes; each is kept, or replaced by its int8 form."""

    def __init__(
        self,
        model: onnx.ModelProto,
        options: Int8Options,
        fault_inject: str | None,
        shapes: list[onnx.ValueInfoProto],
    ) -> None:
        self.model = model
        self.options = options
        self.fault_inject = fault_inject
        self.stats = Stats()
        graph = model.graph
        # Inputs whose leading dims are the same symbols (every [batch, sequence, *] tensor of the
        # encoder) share their shape nodes and zero-point vectors.
        self.lead_dims: dict[str, tuple[Any, ...]] = {}
        for info in [*shapes, *graph.input]:
            dims = info.type.tensor_type.shape.dim
            lead = tuple(d.dim_param or d.dim_value or None for d in dims[:-1])
            if dims and None not in lead:
                self.lead_dims[info.name] = ("dims", *lead)
        self.groups: dict[tuple[Any, ...], RowGroup] = {}
        self.stats.merged_duplicates = merge_duplicates(graph)
        self.b = GraphBuilder(model)
        self.heads = head_nodes(graph)
        self.producers = {out: node for node in graph.node for out in node.output}
        self.graph_inputs = {i.name for i in graph.input}
        self.quantized_inputs: dict[str, QuantizedInput] = {}
        self.weights: dict[str, Weight] = {}

    def run(self) -> Stats:
        graph = self.model.graph
        for node in graph.node:
            standard = node.domain in ("", "ai.onnx")
            if standard and node.op_type in ("MatMul", "Gemm"):
                self.matmul(node)
            elif standard and node.op_type == "Gather":
                self.gather(node)
            else:
                self.b.nodes.append(node)
        self.stats.quantized_inputs = len(self.quantized_inputs)
        del graph.node[:]
        graph.node.extend(self.b.nodes)
        graph.initializer.extend(self.b.new_inits)
        drop_unused_initializers(graph)
        if not any(o.domain == MS_DOMAIN for o in self.model.opset_import):
            self.model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
        return self.stats

    def keep(self, node: onnx.NodeProto, what: str, why: str) -> None:
        self.stats.kept_fp32.append({"node": label(node), "what": what, "why": why})
        self.b.nodes.append(node)

    def weight(self, key: str, w: np.ndarray) -> Weight:
        """The int8 form of a weight matrix, made once however many MatMuls read it."""
        if key in self.weights:
            return self.weights[key]
        b, options = self.b, self.options
        q, scale, err = quantize_weight(w, options.weight_max)
        self.stats.weight_rel_errors.append(err)
        stored_scale = scale
        if self.fault_inject == "int8-weight-scale":
            stored_scale = scale * np.float32(FAULT_SCALE_FACTOR)
        if options.weights == "s8":
            stored, zero = b.const(f"{key}_int8", q), None
        else:
            u8 = (q.astype(np.int16) + 128).astype(np.uint8)
            stored, zero = b.const(f"{key}_uint8", u8), b.shared("zp128", np.array(128, np.uint8))
        self.weights[key] = Weight(stored, b.const(f"{key}_scale", stored_scale), zero, q, scale)
        return self.weights[key]

    def quantized_input(self, x: str, k: int) -> QuantizedInput:
        """The per-row int8 copy of `x`, shared by every MatMul that reads it."""
        if x not in self.quantized_inputs:
            one_sided = self.options.asym_inputs == "gelu" and after_gelu(x, self.producers)
            self.stats.one_sided_inputs += one_sided
            key = self.lead_dims.get(x) or (x,)
            group = self.groups.setdefault(key, RowGroup(anchor=x))
            self.quantized_inputs[x] = quantize_rows(self.b, x, k, self.options, one_sided, group)
        return self.quantized_inputs[x]

    def matmul(self, node: onnx.NodeProto) -> None:
        b, options = self.b, self.options
        w = b.value(node.input[1])
        if b.value(node.input[0]) is not None or w is None:
            self.keep(
                node, "activation x activation MatMul (attention scores / context)", WHY_ATTENTION
            )
            return
        if w.ndim != 2 or w.dtype != np.float32:
            self.keep(
                node, "MatMul", f"weight is {w.dtype} of rank {w.ndim}, not a 2-D fp32 matrix"
            )
            return
        bias: str | None = None
        w_key = node.input[1]
        if node.op_type == "Gemm":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if (
                attrs.get("transA", 0)
                or attrs.get("alpha", 1.0) != 1.0
                or attrs.get("beta", 1.0) != 1.0
            ):
                self.keep(node, "Gemm", "transA, alpha or beta other than the defaults")
                return
            if attrs.get("transB", 0):
                w, w_key = w.T, w_key + "_T"
            bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        k, n = w.shape
        name = label(node)
        if self.heads is not None and node.name in self.heads and not options.heads:
            self.keep(node, f"output head projection [{k}x{n}]", WHY_HEADS)
            return
        if min(k, n) < options.min_features:
            why = f"fewer than {options.min_features} features: an int8 GEMM has nothing to gain"
            self.keep(node, f"narrow projection [{k}x{n}]", why)
            return
        if any(p in name for p in options.keep_fp32):
            self.keep(node, f"projection [{k}x{n}]", "keep_fp32 option")
            return
        qin = self.quantized_input(node.input[0], k)
        wq = self.weight(w_key, w)
        if qin.row_zero is not None and wq.colsum_scaled is None:
            colsum = wq.q.astype(np.int64).sum(axis=0).astype(np.float32) * wq.scale_values
            wq.colsum_scaled = b.const(f"{w_key}_colsum_scaled", colsum)
        out = node.output[0]
        target = b.unique(f"{out}_nobias") if bias else out
        emit_matmul(b, qin, wq, target, f"int8/{name}", options.row_scale)
        if bias:
            b.to("Add", [target, bias], out, f"int8/{name}")
        self.stats.quantized.append({"node": name, "shape": [k, n]})

    def gather(self, node: onnx.NodeProto) -> None:
        table = self.b.value(node.input[0])
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if table is None or table.ndim != 2 or table.dtype != np.float32 or axis != 0:
            self.b.nodes.append(node)
            return
        is_word = node.input[1] in self.graph_inputs
        entry: dict[str, Any] = {
            "node": label(node),
            "what": "word embeddings" if is_word else "position / token-type embeddings",
            "shape": list(table.shape),
            "fp32_bytes": int(table.nbytes),
        }
        if self.options.word_embeddings if is_word else self.options.other_embeddings:
            quantize_gather(self.b, node, table, entry, self.fault_inject)
            self.stats.embeddings.append(entry)
            return
        why = why_positions() if not is_word else "word_embeddings=False"
        self.stats.kept_fp32.append({**entry, "why": why})
        self.b.nodes.append(node)


def rewrite(
    model: onnx.ModelProto,
    options: Int8Options,
    fault_inject: str | None,
    shapes: list[onnx.ValueInfoProto],
) -> Stats:
    """Rewrite `model` in place into its int8 form; returns what was done and kept."""
    return Rewriter(model, options, fault_inject, shapes).run()
