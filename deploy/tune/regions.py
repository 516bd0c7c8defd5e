"""Regions of a QDQ graph and the graph with some of them float, rewritten in ONNX.

A region is one weighted layer (Conv, Gemm, MatMul with a constant weight) named by the layer
tag our export writes (deploy.rules.ops.LAYER_KEY, the module path keep_float globs match), with the
quantizers only it needs. Rewriting the exported graph costs milliseconds where re-preparing
and exporting the model costs seconds, so the search times candidates made here; the placement
it picks is then produced by prepare(keep_float=...) like any user's keep-float choice.

with_float makes a region what prepare's keep_float makes it: float weights (the dequantized
int8 ones: same values the fake-quant model computed with), and no Q/DQ pair that no longer has
an int8 reason to exist (its input quantizer unless another reader or an int8 producer needs it,
its output quantizer in front of an op the rules leave float, the quantizers of an op whose
every neighbour is now float: deploy.rules.backend.float_islands, through lint's Context.rule). The
nodes are tagged FLOAT_KEY, so the linter holds them to no rule.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from qat_deploy.deploy.export.passes import (
    along_axis,
    drop_dead_nodes,
    drop_unused_initializers,
)
from qat_deploy.deploy.lint.base import Context
from qat_deploy.deploy.lint.graph import DEQUANTIZE, QUANTIZE, Graph, attribute
from qat_deploy.deploy.rules.backend import BackendRules
from qat_deploy.deploy.rules.ops import FLOAT_KEY, WEIGHTED_KINDS, layer_of

#: activations a weighted op's output quantizer sits after (the rules fuse them into the op)
_FUSED_ACTIVATIONS = ("relu", "relu6")


@dataclass(frozen=True)
class Region:
    """A weighted layer and its compute nodes, in graph order."""

    layer: str
    nodes: tuple[str, ...]


def regions(model: onnx.ModelProto, rules: BackendRules) -> list[Region]:
    """The weighted layers whose weight is quantized, in graph order: what may move to float."""
    ctx = Context(Graph(model), rules)
    found: dict[str, list[str]] = {}
    for node in ctx.graph.nodes:
        layer = layer_of(node)
        if layer is None or not _quantized_weighted(ctx, node):
            continue
        found.setdefault(layer, []).append(Graph.label(node))
    return [Region(layer, tuple(nodes)) for layer, nodes in found.items()]


def _quantized_weighted(ctx: Context, node: onnx.NodeProto) -> bool:
    if ctx.graph.kind(node) not in WEIGHTED_KINDS or ctx.rule(node) is None:
        return False
    return len(node.input) > 1 and _constant_dequantized(ctx.graph, node.input[1]) is not None


def _constant_dequantized(graph: Graph, name: str) -> tuple[onnx.NodeProto, list | None] | None:
    """The DequantizeLinear of stored constant codes that `name` comes from, and the
    permutation of the Transpose between them if any: a Linear on 3-D inputs exports as MatMul
    reading Transpose(DQ(W)) (every Linear of a transformer). Codes the graph computes from
    constants (EdgeNeXt's position encoding) are not a weight to store in float: None."""
    producer, transpose = graph.producer.get(name), None
    if producer is not None and producer.op_type == "Transpose":
        transpose, producer = producer, graph.producer.get(producer.input[0])
    if producer is None or producer.op_type != DEQUANTIZE:
        return None
    if not graph.is_stored(producer.input[0]):
        return None
    if transpose is None:
        return producer, None
    rank = graph.value(producer.input[0]).ndim
    return producer, list(attribute(transpose, "perm", None) or range(rank)[::-1])


def with_float(
    model: onnx.ModelProto, layers: Iterable[str], rules: BackendRules
) -> onnx.ModelProto:
    """A copy of `model` with the regions of `layers` computing in float."""
    chosen = set(layers)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    if not chosen:
        return out
    graph = Graph(out)
    ctx = Context(graph, rules)
    targets = [n for n in graph.nodes if layer_of(n) in chosen and _quantized_weighted(ctx, n)]
    missing = chosen - {layer_of(n) for n in targets}
    if missing:
        raise ValueError(f"no quantized weighted layer {', '.join(sorted(missing))} in the graph")
    for node in targets:
        _make_float(out.graph, graph, node)
    drop_unneeded_quantizers(out, rules)
    return out


def _make_float(proto: onnx.GraphProto, graph: Graph, node: onnx.NodeProto) -> None:
    """Float weights and the FLOAT_KEY tag; its input quantizer goes in the cleanup when no
    other reader or int8 producer needs it (the kept layer then reads the float tensor)."""
    node.metadata_props.add(key=FLOAT_KEY, value="1")
    for index, name in enumerate(node.input):
        found = _constant_dequantized(graph, name)
        if found is not None:
            dq, perm = found
            values = _dequantized(graph, dq)
            values = values if perm is None else np.ascontiguousarray(values.transpose(perm))
            tensor = numpy_helper.from_array(values, f"{name}_float")
            proto.initializer.append(tensor)
            node.input[index] = tensor.name


def _dequantized(graph: Graph, dq: onnx.NodeProto) -> np.ndarray:
    codes = graph.value(dq.input[0]).astype(np.float64)
    scale = graph.value(dq.input[1]).astype(np.float64)
    zero = graph.value(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else np.zeros(1)
    axis = attribute(dq, "axis", 1)
    scale = along_axis(scale, axis, codes.ndim)
    zero = along_axis(zero.astype(np.float64), axis, codes.ndim)
    return ((codes - zero) * scale).astype(np.float32)


def drop_unneeded_quantizers(model: onnx.ModelProto, rules: BackendRules) -> int:
    """Bypass every activation Q -> DQ pair no int8 op needs: neither the output quantizer of
    a quantized op (through the activations fused into it) nor the input of an op the rules
    quantize or pass quantized data through. Returns how many pairs went. On a graph straight
    from prepare this removes nothing (tested): prepare places no quantizer without a reader."""
    removed = 0
    drop_dead_nodes(model.graph)  # the weight DQs a rewrite left unread
    while True:
        graph = Graph(model)
        ctx = Context(graph, rules)
        pairs = [q for q in graph.nodes if _unneeded(ctx, q)]
        # a pair reading another one's DQ is judged again once that one is gone: its input's
        # producer changes
        dequantized = {dq.output[0] for q in pairs for dq, _ in graph.consumers[q.output[0]]}
        pairs = [q for q in pairs if q.input[0] not in dequantized]
        if not pairs:
            break
        for pair in pairs:
            for dq, _ in graph.consumers[pair.output[0]]:
                for reader, index in graph.consumers[dq.output[0]]:
                    reader.input[index] = pair.input[0]
        drop_dead_nodes(model.graph)
        removed += len(pairs)
    drop_unused_initializers(model.graph)
    return removed


def _unneeded(ctx: Context, quantize: onnx.NodeProto) -> bool:
    graph = ctx.graph
    if quantize.op_type != QUANTIZE or graph.is_constant(quantize.input[0]):
        return False
    dequantizers = graph.consumers[quantize.output[0]]
    if not dequantizers or any(dq.op_type != DEQUANTIZE for dq, _ in dequantizers):
        return False
    outputs = {o.name for o in graph.model.graph.output}
    readers = [r for dq, _ in dequantizers for r, _ in graph.consumers[dq.output[0]]]
    if any(dq.output[0] in outputs for dq, _ in dequantizers):
        return False
    if any(ctx.rule(r) is not None or _carries_to_int8(ctx, r, outputs) for r in readers):
        return False
    return not _quantized_output(ctx, quantize.input[0])


def _carries_to_int8(ctx: Context, node: onnx.NodeProto, outputs: set[str]) -> bool:
    """Whether a pass-through op hands its data, through more of them and Q/DQ pairs, to an
    op the rules quantize or to a graph output: only then must its input stay quantized. A
    reshape, transpose or split between float layers is left float with them."""
    if not ctx.passes_through(node):
        return False
    pending, seen = list(node.output), set()
    while pending:
        name = pending.pop()
        if name in outputs:
            return True
        for reader, _ in ctx.graph.consumers.get(name, ()):
            if id(reader) in seen:
                continue
            seen.add(id(reader))
            if reader.op_type in (QUANTIZE, DEQUANTIZE) or ctx.passes_through(reader):
                pending.extend(reader.output)
            elif ctx.rule(reader) is not None:
                return True
    return False


def _quantized_output(ctx: Context, tensor: str) -> bool:
    """Whether `tensor` is the output of a quantized op whose rule quantizes its output."""
    node = ctx.graph.producer.get(tensor)
    while node is not None and ctx.graph.kind(node) in _FUSED_ACTIVATIONS:
        node = ctx.graph.producer.get(node.input[0])
    if node is None:
        return False
    rule = ctx.rule(node)
    return rule is not None and rule.output
