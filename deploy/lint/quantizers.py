"""Checks on each quantizer: its integer type, zero point and granularity against the spec the
target's rules give its role. A quantizer is a QuantizeLinear, or a DequantizeLinear with no
QuantizeLinear before it (a pre-quantized constant); a Q->DQ pair is reported once, at the Q."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum

import numpy as np
from onnx import NodeProto, TensorProto

from qat_deploy.deploy.lint.base import Context, Use, Violation
from qat_deploy.deploy.lint.graph import DEQUANTIZE, QUANTIZE, Graph, attribute
from qat_deploy.deploy.quant.spec import QuantSpec
from qat_deploy.deploy.rules.backend import activation_spec, reader_kinds

#: Which input of an ONNX op holds its weight, and which its bias.
WEIGHT_INPUT = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}
_BIAS_INPUT = {"Conv": 2, "ConvTranspose": 2, "Gemm": 2}


class Role(str, Enum):
    ACTIVATION = "activation"  # a tensor computed at run time
    WEIGHT = "weight"
    BIAS = "bias"
    CONSTANT = "constant"  # any other constant; the rules say nothing about it


@dataclass(frozen=True)
class Quantizer:
    node: NodeProto
    role: Role
    spec: QuantSpec | None  # what the rules want for this role; None when they do not say
    qtype: int | None  # ONNX element type of the integer side
    scale: np.ndarray | None
    zero_point: np.ndarray | None
    uses: tuple[Use, ...]

    @property
    def per_channel(self) -> bool:
        return self.scale is not None and self.scale.size > 1


def find_quantizers(ctx: Context) -> list[Quantizer]:
    return [_describe(ctx, n) for n in ctx.graph.nodes if _is_quantizer(ctx, n)]


def _is_quantizer(ctx: Context, node: NodeProto) -> bool:
    if node.op_type != DEQUANTIZE:
        return node.op_type == QUANTIZE
    source = ctx.graph.producer.get(node.input[0])
    return source is None or source.op_type != QUANTIZE


def _describe(ctx: Context, node: NodeProto) -> Quantizer:
    graph = ctx.graph
    uses = tuple(ctx.uses(node.output[0]))
    role = _role(ctx, node, uses)
    zero_point = node.input[2] if len(node.input) > 2 else ""
    qtype = _qtype(ctx, node, zero_point)
    return Quantizer(
        node=node,
        role=role,
        spec=_spec(ctx, node, role, uses, qtype),
        qtype=qtype,
        scale=graph.value(node.input[1]),
        zero_point=graph.value(zero_point),
        uses=uses,
    )


def _role(ctx: Context, node: NodeProto, uses: tuple[Use, ...]) -> Role:
    if not ctx.graph.is_constant(node.input[0]):
        return Role.ACTIVATION
    if any(WEIGHT_INPUT.get(u.node.op_type) == u.index for u in uses):
        return Role.WEIGHT
    if any(_BIAS_INPUT.get(u.node.op_type) == u.index for u in uses):
        return Role.BIAS
    return Role.CONSTANT


def _spec(
    ctx: Context, node: NodeProto, role: Role, uses: tuple[Use, ...], qtype: int | None
) -> QuantSpec | None:
    """An op rule may override the activation spec (OpenVINO's transformer MatMul: int8), and
    the readers' kinds may choose the signed one (deploy.rules.backend.activation_spec)."""
    if role is not Role.ACTIVATION:
        return ctx.rules.weight if role is Role.WEIGHT else None
    readers = list(_through_requantizers(ctx, uses))
    rules = (ctx.rule(u.node) for u in readers)
    overrides = (r.activation for r in rules if r is not None and r.activation is not None)
    override = next(overrides, None)
    if override is not None:
        return override

    def users(node: NodeProto) -> list[NodeProto]:
        return [use.node for use in ctx.uses(node.output[0])]

    kinds = reader_kinds([u.node for u in readers], ctx.graph.kind, users)
    default = ctx.rules.activation
    signed = activation_spec(ctx.rules, default, kinds, hardly_negative=False)
    if signed == default:
        return default
    # Such readers run either spec correctly; the signed one faster where the value can be
    # well below 0. A hardly negative value shares a signed grid in a Concat with signed
    # values. Hold the file to the spec its type is, else to the one prepare() prefers.
    preferred = default if ctx.hardly_negative(node.input[0]) else signed
    return next((s for s in (default, signed) if qtype == _wanted_type(s)), preferred)


def _through_requantizers(ctx: Context, uses: tuple[Use, ...]) -> Iterator[Use]:
    """A quantizer copied above a reshape (export pass quantize_before_pass_through) serves
    the op that reads the quantizer below it, so it takes that op's spec."""
    for use in uses:
        if use.node.op_type == QUANTIZE and use.index == 0:
            yield from _through_requantizers(ctx, tuple(ctx.uses(use.node.output[0])))
        else:
            yield use


def _qtype(ctx: Context, node: NodeProto, zero_point: str) -> int | None:
    """ONNX defaults: a QuantizeLinear without zero point or output_dtype yields uint8."""
    graph = ctx.graph
    if node.op_type == DEQUANTIZE:
        return graph.elem_type(node.input[0]) or (
            graph.elem_type(zero_point) if zero_point else None
        )
    if zero_point:
        return graph.elem_type(zero_point)
    return attribute(node, "output_dtype", 0) or TensorProto.UINT8


def _type_name(qtype: int) -> str:
    return TensorProto.DataType.Name(qtype).lower()


def _wanted_type(spec: QuantSpec) -> int:
    return TensorProto.INT8 if spec.signed else TensorProto.UINT8


def _zero_point(ctx: Context, q: Quantizer) -> Violation | None:
    wants_zero = q.spec.symmetric if q.spec is not None else ctx.symmetric_only
    if not wants_zero or q.zero_point is None or not np.any(q.zero_point != 0):
        return None
    shown = ", ".join(str(v) for v in np.unique(q.zero_point)[:4])
    return Violation(
        "zero-point",
        Graph.label(q.node),
        f"{q.role.value} zero point {shown} is not 0: {ctx.rules.name} quantizes symmetrically",
    )


def _dtype(ctx: Context, q: Quantizer) -> Violation | None:
    """Rules-covered roles must match their spec; a symmetric-only backend also parses nothing
    but its int8 type elsewhere (TensorRT rejects the int32 bias DQ of onnxruntime's tool)."""
    if q.qtype is None or (q.spec is None and not ctx.symmetric_only):
        return None
    wanted = _wanted_type(q.spec or ctx.rules.weight)
    if q.qtype == wanted:
        return None
    got, want = _type_name(q.qtype), _type_name(wanted)
    if q.spec is None:
        message = f"{got} {q.role.value} Q/DQ: {ctx.rules.name} parses only {want} (keep it float)"
    else:
        message = f"{got} {q.role.value}: {ctx.rules.name} wants {want} {q.role.value}s"
    return Violation("dtype", Graph.label(q.node), message)


def _per_channel_activation(ctx: Context, q: Quantizer) -> Violation | None:
    if q.role is not Role.ACTIVATION or not q.per_channel or q.spec.per_channel:
        return None
    return Violation(
        "per-channel-activation",
        Graph.label(q.node),
        f"activation has {q.scale.size} scales: {ctx.rules.name} wants one scale per activation",
    )


def _weight_axis(ctx: Context, q: Quantizer) -> Violation | None:
    rank = ctx.graph.rank(q.node.input[0])
    if q.role is not Role.WEIGHT or not q.per_channel or rank is None:
        return None
    axis = attribute(q.node, "axis", 1)  # the ONNX default
    axis = axis + rank if axis < 0 else axis
    for use in q.uses:
        expected = _expected_axis(ctx, use, rank)
        if expected is not None and axis != expected:
            return Violation(
                "weight-axis",
                Graph.label(q.node),
                f"weight of {use.node.op_type} {use.node.name!r} is quantized on axis {axis}, "
                f"expected {expected}: {ctx.rules.name} scales weights per output channel",
            )
    return None


def _expected_axis(ctx: Context, use: Use, rank: int) -> int | None:
    """The rules give the axis in torch's weight layout (weight_axis, else the weight spec's).
    ONNX keeps that layout for Conv, ConvTranspose and Gemm(transB=1); MatMul and Gemm(transB=0)
    read the Linear weight transposed, [..., in, out], so output channels are the last axis
    (TensorRT-RTX 1.7 builds that into one int8 gemm layer; another axis gets a Cast/Mul weight
    dequantization at run time). A Transpose between the quantizer and the op moves the axis;
    a reshape loses it."""
    if WEIGHT_INPUT.get(use.node.op_type) != use.index:
        return None
    torch_axis = ctx.rules.weight_axis.get(ctx.graph.kind(use.node), ctx.rules.weight.axis)
    if torch_axis is None:
        return None
    same_layout = use.node.op_type in ("Conv", "ConvTranspose") or (
        use.node.op_type == "Gemm" and attribute(use.node, "transB", 0) == 1
    )
    axis = torch_axis if same_layout else rank - 1 - torch_axis
    for node in reversed(use.path):
        if node.op_type == "Transpose":
            axis = attribute(node, "perm", list(reversed(range(rank))))[axis]
        elif node.op_type != DEQUANTIZE:
            return None
    return axis


_CHECKS: tuple[Callable[[Context, Quantizer], Violation | None], ...] = (
    _zero_point,
    _dtype,
    _per_channel_activation,
    _weight_axis,
)


def check_quantizers(ctx: Context) -> Iterator[Violation]:
    """zero-point, dtype, per-channel-activation and weight-axis, grouped by rule."""
    found = find_quantizers(ctx)
    for check in _CHECKS:
        for quantizer in found:
            violation = check(ctx, quantizer)
            if violation is not None:
                yield violation
