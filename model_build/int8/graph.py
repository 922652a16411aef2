"""An ONNX graph being rewritten: new nodes and initializers with unique names, and the graph's
file I/O (external data, inferred shapes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class GraphBuilder:
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


def drop_unused_initializers(graph: onnx.GraphProto) -> None:
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


def inferred_shapes(src: Path) -> list[onnx.ValueInfoProto]:
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


def restore_value_info(graph: onnx.GraphProto, shapes: list[onnx.ValueInfoProto]) -> None:
    produced = {out for node in graph.node for out in node.output}
    known = {v.name for v in graph.value_info}
    graph.value_info.extend(v for v in shapes if v.name in produced and v.name not in known)


def model_bytes(path: Path) -> int:
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


def label(node: onnx.NodeProto) -> str:
    return node.name or node.output[0]
