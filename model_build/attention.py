"""Stage 3b, attention: replace each layer's exported eager attention with onnxruntime's
`MultiHeadAttention`, choosing per batch between a padded and an unpadded form.

Why: the eager export materialises `batch x heads x S x S` float scores several times per layer
(MatMul, scale, mask add, Softmax). For one 8,192-token text that is 4 GiB per tensor, and a
plain export peaks above 10 GB. onnxruntime's CPU `MultiHeadAttention` runs a tiled (flash)
kernel that never holds the whole score matrix, but only when it gets no padding mask. So:

    all_ones = ReduceMin(attention_mask) == 1            # computed once per run
    context  = If(all_ones, MHA(q, k, v), MHA(q, k, v, key_padding_mask))

A batch without padding (one text, or texts of equal length) takes the tiled kernel; a padded
batch takes the masked one, whose score memory the engine bounds by batch planning. Both branches
compute the same softmax(QK^T * scale + mask) V as the eager graph; the build's fidelity gate
checks the result against PyTorch.

The matcher looks for the transformers BERT/XLM-R eager pattern, from the three projection bias
Adds to the Reshape that merges the heads back:

    q_add -> Reshape -> Transpose(0,2,1,3) --------------------\
    k_add -> Reshape -> Transpose(0,2,3,1) -> MatMul -> Mul(scale) -> Add(mask) -> Softmax
    v_add -> Reshape -> Transpose(0,2,1,3) ---------------------------------------> MatMul
          -> Transpose(0,2,1,3) -> Reshape([B, S, hidden])

The projections stay ordinary MatMul + Add, so the int8 quantizer still sees and quantizes them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model_build.errors import BuildError
from model_build.progress import Progress

MS_DOMAIN = "com.microsoft"
ALL_ONES = "attention/all_ones"
MASK_I32 = "attention/key_padding_mask"


@dataclass(frozen=True)
class _Match:
    q: str
    k: str
    v: str
    scale: float
    output: str  # the merged-heads Reshape's output, which the rest of the layer reads
    nodes: tuple[Any, ...]  # the matched nodes, removed once replaced


def fuse_attention(src: Path, dst: Path, *, num_heads: int, progress: Progress) -> dict[str, Any]:
    """Rewrite the graph at `src` (external data beside it) and save it at `dst`."""
    import onnx

    from model_build.recipes import load_with_shapes, save_with_external_data

    # Shapes first: the rewrite types its outputs from the layers' inferred types (_retype).
    proto = load_with_shapes(src)
    count = rewrite(proto, num_heads=num_heads)
    progress.log("attention", f"{count} attention blocks -> MultiHeadAttention ({num_heads} heads)")
    save_with_external_data(proto, dst)
    # Shapes again, now through the If outputs: a graph whose later tensors carry no shapes
    # took onnxruntime about 1 s longer to plan at session creation (measured, full-size int8).
    onnx.shape_inference.infer_shapes_path(str(dst), str(dst))
    onnx.checker.check_model(str(dst))
    return {
        "op": f"{MS_DOMAIN}.MultiHeadAttention",
        "layers": count,
        "num_heads": num_heads,
        "unpadded_batches": "tiled kernel, no key_padding_mask (bounded memory)",
        "padded_batches": "key_padding_mask (scores materialised; the engine bounds batch x S^2)",
    }


def rewrite(proto: Any, *, num_heads: int) -> int:
    """Replace every attention block in place; returns how many. Raises when a Softmax is not
    in the expected pattern: the export changed shape, and a layer left eager would silently
    bring back the S x S memory, so the build must say so."""
    from onnx import helper

    graph = proto.graph
    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    constants = _constants(graph)

    matches = [
        m
        for node in graph.node
        if node.op_type == "Softmax"
        and (m := _match(node, producers, consumers, constants)) is not None
    ]
    softmaxes = sum(1 for node in graph.node if node.op_type == "Softmax")
    if len(matches) != softmaxes:
        raise BuildError(
            f"attention fusion: {softmaxes - len(matches)} of {softmaxes} Softmax nodes are not "
            "in the BERT eager attention pattern; the transformers/torch export changed, "
            "update model_build/attention.py"
        )
    if not matches:
        return 0

    mask_input = next(i.name for i in graph.input if i.name == "attention_mask")
    prologue = [
        helper.make_node("Cast", [mask_input], [MASK_I32], to=6, name="attention/cast_mask"),
        helper.make_node(
            "ReduceMin", [mask_input], ["attention/mask_min"], keepdims=0, name="attention/min"
        ),
        helper.make_node(
            "Constant",
            [],
            ["attention/one"],
            value=helper.make_tensor("one", 7, [], [1]),
            name="attention/one",
        ),
        helper.make_node(
            "Equal", ["attention/mask_min", "attention/one"], [ALL_ONES], name="attention/all_ones"
        ),
    ]

    removed = {id(n) for m in matches for n in m.nodes}
    replacement: dict[int, list[Any]] = {}
    for index, m in enumerate(matches):
        # Insert where the merged-heads Reshape stood: its inputs are all computed by then.
        replacement[id(m.nodes[-1])] = [_if_node(m, num_heads, index)]
    nodes: list[Any] = list(prologue)
    for node in graph.node:
        if id(node) in replacement:
            nodes.extend(replacement[id(node)])
        elif id(node) not in removed:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(_prune(nodes, {o.name for o in graph.output}))
    _retype(graph, matches)
    _set_opset(proto, MS_DOMAIN, 1)
    return len(matches)


def _retype(graph: Any, matches: list[_Match]) -> None:
    """Keep shape inference's token dims the same through every layer.

    onnx cannot infer through a contrib op, so each If output would be untyped and everything
    after it would get freshly minted dims, which the int8 quantizer reads as different shapes
    and onnxruntime then spends most of a second planning. So each If output gets its query
    projection's type ([batch, seq, hidden], the first layer's symbols: an encoder's hidden states
    all share them), and the stale types of everything downstream of an If are dropped for the
    next inference to redo."""
    types = {vi.name: vi.type for vi in [*graph.value_info, *graph.input]}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in _reads(node):
            consumers.setdefault(name, []).append(node)
    downstream: set[str] = set()
    frontier = [m.output for m in matches]
    while frontier:
        name = frontier.pop()
        for node in consumers.get(name, []):
            for out in node.output:
                if out not in downstream:
                    downstream.add(out)
                    frontier.append(out)
    live = {out for node in graph.node for out in node.output}
    outputs = {m.output for m in matches}
    kept = [
        vi
        for vi in graph.value_info
        if vi.name in live and vi.name not in downstream and vi.name not in outputs
    ]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    # Every layer's hidden states share the token dims of the first layer's input.
    first = types.get(matches[0].q)
    if first is None:
        return
    for m in matches:
        vi = graph.value_info.add()
        vi.name = m.output
        vi.type.CopyFrom(first)


def _if_node(m: _Match, num_heads: int, index: int) -> Any:
    from onnx import TensorProto, helper

    def branch(name: str, inputs: list[str]) -> Any:
        out = f"{m.output}/{name}"
        mha = helper.make_node(
            "MultiHeadAttention",
            inputs,
            [out],
            domain=MS_DOMAIN,
            num_heads=num_heads,
            scale=m.scale,
            name=f"attention/{index}/{name}",
        )
        # Subgraph outputs need a type; the shape is the outer Reshape's [batch, seq, hidden].
        value = helper.make_tensor_value_info(out, TensorProto.FLOAT, None)
        return helper.make_graph([mha], f"attention_{index}_{name}", [], [value])

    return helper.make_node(
        "If",
        [ALL_ONES],
        [m.output],
        then_branch=branch("unpadded", [m.q, m.k, m.v]),
        else_branch=branch("padded", [m.q, m.k, m.v, "", MASK_I32]),
        name=f"attention/{index}/if_unpadded",
    )


def _match(
    softmax: Any,
    producers: dict[str, Any],
    consumers: dict[str, list[Any]],
    constants: dict[str, Any],
) -> _Match | None:
    def parent(node: Any, op: str, index: int = 0) -> Any | None:
        if index >= len(node.input):
            return None
        found = producers.get(node.input[index])
        return found if found is not None and found.op_type == op else None

    def only_child(node: Any, op: str) -> Any | None:
        users = consumers.get(node.output[0], [])
        return users[0] if len(users) == 1 and users[0].op_type == op else None

    add_mask = parent(softmax, "Add")
    mul = add_mask and parent(add_mask, "Mul")
    qk = mul and parent(mul, "MatMul")
    if not (add_mask and mul and qk):
        return None
    scale = _scalar(constants, mul.input[1])
    q_t, k_t = parent(qk, "Transpose", 0), parent(qk, "Transpose", 1)
    ctx = only_child(softmax, "MatMul")
    v_t = ctx and parent(ctx, "Transpose", 1)
    out_t = ctx and only_child(ctx, "Transpose")
    merge = out_t and only_child(out_t, "Reshape")
    if scale is None or not (q_t and k_t and ctx and v_t and out_t and merge):
        return None
    if not (
        _perm(q_t) == [0, 2, 1, 3]
        and _perm(k_t) == [0, 2, 3, 1]
        and _perm(v_t) == [0, 2, 1, 3]
        and _perm(out_t) == [0, 2, 1, 3]
    ):
        return None
    found = [parent(t, "Reshape") for t in (q_t, k_t, v_t)]
    splits = [s for s in found if s is not None]
    if len(splits) != 3:
        return None
    q, k, v = (s.input[0] for s in splits)
    nodes = (*splits, q_t, k_t, v_t, qk, mul, add_mask, softmax, ctx, out_t, merge)
    return _Match(q=q, k=k, v=v, scale=scale, output=merge.output[0], nodes=nodes)


def _perm(node: Any) -> list[int] | None:
    from onnx import helper

    for attr in node.attribute:
        if attr.name == "perm":
            return list(helper.get_attribute_value(attr))
    return None


def _constants(graph: Any) -> dict[str, Any]:
    """Name -> numpy value for initializers and Constant nodes (the scale is one of these)."""
    from onnx import numpy_helper

    found = {init.name: init for init in graph.initializer}
    values: dict[str, Any] = {}
    for name, init in found.items():
        if init.data_location != 1 and len(init.dims) == 0:  # scalars only; skip big weights
            values[name] = numpy_helper.to_array(init)
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
    return values


def _scalar(constants: dict[str, Any], name: str) -> float | None:
    value = constants.get(name)
    if value is None or value.size != 1:
        return None
    return float(value.reshape(()))


def _prune(nodes: list[Any], outputs: set[str]) -> list[Any]:
    """Drop nodes nothing reads any more (the eager mask arithmetic), keeping order."""
    live = set(outputs)
    kept: list[Any] = []
    for node in reversed(nodes):
        if any(o in live for o in node.output):
            kept.append(node)
            live.update(_reads(node))
    return list(reversed(kept))


def _reads(node: Any) -> Iterable[str]:
    """A node's inputs, including the outer-scope names its subgraphs read."""
    yield from (i for i in node.input if i)
    for attr in node.attribute:
        if attr.type == 5:  # GRAPH
            for sub in attr.g.node:
                yield from _reads(sub)


def _set_opset(proto: Any, domain: str, version: int) -> None:
    if not any(op.domain == domain for op in proto.opset_import):
        entry = proto.opset_import.add()
        entry.domain = domain
        entry.version = version
