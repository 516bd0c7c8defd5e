"""Checks on the graph around the quantizers: which ops a backend cannot parse, which int8 ops
miss quantized inputs, Concat scales, and TensorRT-style residual Adds (Inputs.SKIP_BRANCH)."""

from __future__ import annotations

from collections.abc import Iterator

from onnx import NodeProto

from qat_deploy.deploy.lint.base import Context, Violation
from qat_deploy.deploy.lint.graph import DEQUANTIZE, QUANTIZE, Graph
from qat_deploy.deploy.lint.quantizers import WEIGHT_INPUT as _WEIGHT_INPUT
from qat_deploy.deploy.rules.backend import (
    BackendRules,
    InputFacts,
    Inputs,
    OpRule,
    branch_sum_root,
    fused_output,
    selected_inputs,
    shared_scale_members,
)

#: onnxruntime's QOperator format: integer ops with the quantization folded in, no Q/DQ.
_QOPERATORS = frozenset(
    {"ConvInteger", "MatMulInteger", "QGemm", "QAttention", "MatMulIntegerToFloat"}
)
#: DequantizeLinear gained its `axis` attribute (per-channel scales) in opset 13.
PER_CHANNEL_OPSET = 13


def check_qoperators(ctx: Context) -> Iterator[Violation]:
    if not ctx.symmetric_only:
        return
    for node in ctx.graph.nodes:
        if node.op_type.startswith("QLinear") or node.op_type in _QOPERATORS:
            yield Violation(
                "qoperator",
                Graph.label(node),
                f"{node.op_type} is a QOperator op: {ctx.rules.name} reads only "
                "QuantizeLinear/DequantizeLinear (export in QDQ format)",
            )


def check_opset(ctx: Context) -> Iterator[Violation]:
    opset = ctx.graph.opset()
    if ctx.rules.weight.per_channel and opset < PER_CHANNEL_OPSET:
        yield Violation(
            "opset",
            "",
            f"opset {opset} < {PER_CHANNEL_OPSET}: Q/DQ has no axis there, so the per-channel "
            f"weights {ctx.rules.name} wants cannot be expressed",
        )


def check_unquantized_inputs(ctx: Context) -> Iterator[Violation]:
    """Every input the op rules select must come from a DequantizeLinear (through pass-through
    ops), or the backend runs that op in float."""
    for node in ctx.graph.nodes:
        kind = ctx.graph.kind(node)
        rule = ctx.rule(node)
        if rule is None or rule.inputs is Inputs.SKIP_BRANCH:
            continue
        for name, what in _selected_inputs(ctx, node, kind, rule):
            if not ctx.is_quantized(name):
                yield Violation(
                    "unquantized-input",
                    Graph.label(node),
                    f"{what} {name!r} of {node.op_type} is not quantized: {ctx.rules.name} "
                    f"runs {kind} in int8 only on quantized inputs",
                )


def check_quantized_outputs(ctx: Context) -> Iterator[Violation]:
    """OpRule.output: the op's output (after a fused ReLU) must go only into QuantizeLinear,
    unless the graph returns it, or the backend runs the op in float."""
    graph = ctx.graph
    outputs = {o.name for o in graph.model.graph.output}

    def users(node: NodeProto) -> list[NodeProto]:
        return [user for user, _ in graph.consumers.get(node.output[0], ())]

    for node in graph.nodes:
        rule = ctx.rule(node)
        if rule is None or not rule.output or _WEIGHT_INPUT.get(node.op_type) is None:
            continue
        last = fused_output(node, users, graph.kind)
        if last.output[0] in outputs or all(u.op_type == QUANTIZE for u in users(last)):
            continue
        yield Violation(
            "unquantized-output",
            Graph.label(node),
            f"output {last.output[0]!r} of {node.op_type} is not quantized: {ctx.rules.name} "
            f"runs {graph.kind(node)} in int8 only when a QuantizeLinear reads its output",
        )


def _selected_inputs(
    ctx: Context, node: NodeProto, kind: str, rule: OpRule
) -> list[tuple[str, str]]:
    """The inputs deploy.rules.backend.selected_inputs picks (what prepare() quantized), plus the
    weight of a weighted op. Of a weighted op exported as several nodes (MatMul + Add),
    only the node with the weight is checked."""
    graph = ctx.graph
    if rule.inputs is Inputs.ACTIVATION:
        if _WEIGHT_INPUT.get(node.op_type) is None:
            return []
        names = [node.input[0]]
    else:
        names = graph.data_inputs(node)
    branch_sum = kind == "add" and _branch_sum_root(graph, node) is not None
    facts = [
        InputFacts(
            graph.is_constant(n),
            fusible_conv=_fusible_conv(ctx, n) is not None,
            branch_sum=branch_sum,
        )
        for n in names
    ]
    chosen = selected_inputs(kind, rule, facts, ctx.rules.float_branch_sums)
    selected = [(names[i], "input") for i in chosen]
    if rule.inputs is Inputs.ACTIVATION and len(node.input) > 1:
        selected.append((node.input[_WEIGHT_INPUT[node.op_type]], "weight"))
    return selected


def check_concat_scales(ctx: Context) -> Iterator[Violation]:
    """A shared_scale op (Concat) needs one scale on the inputs that share it (all, or the
    signed ones: BackendRules.relu_fold_needs_lowest_zero_point), or it requantizes them."""
    for node in ctx.graph.nodes:
        rule = ctx.rule(node)
        if rule is None or not rule.shared_scale:
            continue
        scales = {
            tuple(scale.ravel().tolist())
            for name in _shared_scale_members(ctx, node)
            for dq in ctx.dequantizers(name) or ()
            if (scale := ctx.graph.value(dq.input[1])) is not None
        }
        if len(scales) > 1:
            shown = ", ".join(
                f"{s[0]:.4g}" if len(s) == 1 else f"{len(s)} channels" for s in scales
            )
            yield Violation(
                "concat-scales",
                Graph.label(node),
                f"inputs have {len(scales)} different scales ({shown}): {ctx.rules.name} wants "
                "one shared scale",
            )


def _shared_scale_members(ctx: Context, node: NodeProto) -> list[str]:
    """deploy.rules.backend.shared_scale_members on the ONNX graph, through Q/DQ pairs."""

    def carries(op: NodeProto) -> bool:
        rule = ctx.rule(op)
        return ctx.passes_through(op) or (rule is not None and rule.shared_scale)

    return shared_scale_members(
        ctx.graph.runtime_inputs(node), lambda name: ctx.rectified(name, carries), ctx.rules
    )


def check_residual_adds(ctx: Context) -> Iterator[Violation]:
    """Inputs.SKIP_BRANCH: the backend fuses a Conv into the Add that reads its output, so that
    input must not pass through Q/DQ, and every other (skip-branch) input must be quantized."""
    for node in ctx.graph.nodes:
        if ctx.graph.kind(node) != "add" or (rule := ctx.rule(node)) is None:
            continue
        if ctx.rules.float_branch_sums and _branch_sum_root(ctx.graph, node) is not None:
            continue  # parallel branches of one value: the rules leave their sum float
        inputs = ctx.graph.runtime_inputs(node) if rule.inputs is Inputs.SKIP_BRANCH else []
        if len(inputs) > 1:
            yield from _check_residual(ctx, node, inputs)


def _check_residual(ctx: Context, add: NodeProto, inputs: list[str]) -> Iterator[Violation]:
    fused = [(name, conv) for name in inputs if (conv := _fusible_conv(ctx, name)) is not None]
    if fused:
        main, conv = fused[0]
    else:
        behind_qdq = [(name, _conv_behind_qdq(ctx, name)) for name in inputs]
        blocked = [(name, found) for name, found in behind_qdq if found is not None]
        if not blocked:
            return  # no Conv feeds this Add: not a residual
        main, (quantize, conv) = blocked[0]
        yield Violation(
            "qdq-breaks-fusion",
            Graph.label(quantize),
            f"Q/DQ between {Graph.label(conv)} and residual Add {Graph.label(add)} stops "
            f"{ctx.rules.name} fusing them: quantize the skip-branch input instead",
        )
    for name in inputs:
        if name != main and not ctx.is_quantized(name):
            yield Violation(
                "unquantized-skip",
                Graph.label(add),
                f"skip-branch input {name!r} is not quantized: {ctx.rules.name} needs it int8 "
                f"to fuse {Graph.label(conv)} into this Add",
            )


def _add_chains(rules: BackendRules) -> list[tuple[str, ...]]:
    """The op chains the rules' fusions run into an Add, e.g. ("conv", "bn")."""
    return [f[: f.index("add")] for f in rules.fusions if "add" in f[1:]]


def _fusible_conv(ctx: Context, name: str) -> NodeProto | None:
    """The Conv computing `name` when the backend can fuse it into its only reader; the tail
    of the chain (BN) is optional because exporters fold it into the Conv."""
    graph = ctx.graph
    if len(graph.consumers.get(name, ())) != 1:
        return None
    for chain in _add_chains(ctx.rules):
        node = graph.producer.get(name)
        for kind in reversed(chain[1:]):
            if node is not None and graph.kind(node) == kind:
                node = graph.producer.get(node.input[0])
        if node is not None and graph.kind(node) == chain[0]:
            return node
    return None


def _conv_behind_qdq(ctx: Context, name: str) -> tuple[NodeProto, NodeProto] | None:
    """(QuantizeLinear, Conv) when `name` is a fusible Conv's output sent only through Q->DQ."""
    quantize = _quantize_of(ctx.graph, name)
    if quantize is None:
        return None
    if len(ctx.graph.consumers.get(name, ())) != 1:
        return None  # the quantized value feeds other ops too: the Conv cannot fuse anyway
    conv = _fusible_conv(ctx, quantize.input[0])
    return (quantize, conv) if conv is not None else None


def _branch_sum_root(graph: Graph, add: NodeProto) -> str | None:
    """deploy.rules.backend.branch_sum_root on the ONNX graph, through the Q/DQ pairs that
    quantize a Conv's input or (onnxruntime) its output."""

    def read_once(name: str) -> bool:
        return len(graph.consumers.get(name, ())) == 1

    def terms(node: NodeProto) -> list[NodeProto | None]:
        pairs = [(name, _behind_qdq(graph, name)) for name in graph.data_inputs(node)]
        return [
            graph.producer.get(value) if read_once(name) and read_once(value) else None
            for name, value in pairs
        ]

    return branch_sum_root(add, terms, graph.kind, lambda node: _behind_qdq(graph, node.input[0]))


def _behind_qdq(graph: Graph, name: str) -> str:
    """The value a DequantizeLinear(QuantizeLinear(value)) pair reproduces, else `name`."""
    quantize = _quantize_of(graph, name)
    return quantize.input[0] if quantize is not None else name


def _quantize_of(graph: Graph, name: str) -> NodeProto | None:
    """The QuantizeLinear of the Q->DQ pair that produces `name`, if one does."""
    dequantize = graph.producer.get(name)
    if dequantize is None or dequantize.op_type != DEQUANTIZE:
        return None
    quantize = graph.producer.get(dequantize.input[0])
    return quantize if quantize is not None and quantize.op_type == QUANTIZE else None
