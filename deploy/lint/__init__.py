"""lint(): check a QDQ ONNX graph, from this project or any other tool (onnxruntime's
quantize_static, NNCF, ModelOpt), against a target's rules before building an engine.

Every check reads backends/<target>/rules.py, so a new backend needs only its rules. Rule ids:

- zero-point: a non-zero zero point where the rules' spec is symmetric (and, on a
  symmetric-only backend such as TensorRT, on any Q/DQ).
- dtype: an integer type other than the spec's: uint8/int8 activations, non-int8 weights; on
  a symmetric-only backend also the int32 bias DequantizeLinear of onnxruntime's tool.
- per-channel-activation: an activation with more than one scale.
- weight-axis: a per-channel weight quantized on another axis than its output channels.
- qoperator: QLinearConv, ConvInteger, ... on a backend that parses only Q/DQ.
- opset: opset < 13, which cannot express the per-channel weights the rules want.
- unquantized-input: an input the op rules select (Conv, Gemm, MatMul, Add, Concat, pooling,
  ...; transformer rules when the graph has LayerNormalization or Softmax) that does not come
  from a DequantizeLinear, possibly through the rules' pass-through ops.
- unquantized-output: an op whose rule quantizes its output too (onnxruntime's Conv) whose
  output (after a fused ReLU) is read by anything but QuantizeLinear, and is no graph output.
- concat-scales: Concat inputs with different scales where the rules want one shared scale.
- qdq-breaks-fusion / unquantized-skip: a residual Add under Inputs.SKIP_BRANCH whose Conv input
  goes through Q/DQ, or whose skip-branch input is not quantized.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import onnx

from qat_deploy.deploy.common.errors import BadInputError, one_line
from qat_deploy.deploy.lint.base import Context, Violation
from qat_deploy.deploy.lint.graph import Graph
from qat_deploy.deploy.lint.quantizers import check_quantizers
from qat_deploy.deploy.lint.structure import (
    check_concat_scales,
    check_opset,
    check_qoperators,
    check_quantized_outputs,
    check_residual_adds,
    check_unquantized_inputs,
)
from qat_deploy.deploy.rules.backend import BackendRules, get_rules
from qat_deploy.deploy.rules.ops import COMPUTE_KINDS

__all__ = ["Violation", "float_by_rule", "lint", "load_model", "quantized_by_rule"]

_CHECKS: tuple[Callable[[Context], Iterator[Violation]], ...] = (
    check_opset,
    check_qoperators,
    check_quantizers,
    check_unquantized_inputs,
    check_quantized_outputs,
    check_concat_scales,
    check_residual_adds,
)


def lint(
    model_or_path: onnx.ModelProto | str | os.PathLike, target: str | BackendRules
) -> list[Violation]:
    """Every place where the graph departs from the target's rules; empty when it conforms.
    `target` is a backend name, or a BackendRules object for rules not shipped in backends/."""
    ctx = _context(model_or_path, target)
    return [violation for check in _CHECKS for violation in check(ctx)]


def float_by_rule(
    model_or_path: onnx.ModelProto | str | os.PathLike, target: str | BackendRules
) -> list[str]:
    """The compute nodes (Conv, Gemm, MatMul, ...) the target's rules leave in float on
    purpose, e.g. onnxruntime's attention MatMuls and ConvTranspose, and the layers the user
    keeps float (prepare's keep_float): an engine running them in float is doing what was
    asked, not falling back."""
    return _compute_nodes(model_or_path, target, quantized=False)


def quantized_by_rule(
    model_or_path: onnx.ModelProto | str | os.PathLike, target: str | BackendRules
) -> list[str]:
    """The compute nodes the target's rules quantize: the layers an engine should run in int8,
    counted on the QDQ model (an engine may merge or split layers)."""
    return _compute_nodes(model_or_path, target, quantized=True)


def _compute_nodes(
    model_or_path: onnx.ModelProto | str | os.PathLike,
    target: str | BackendRules,
    *,
    quantized: bool,
) -> list[str]:
    ctx = _context(model_or_path, target)
    return [
        Graph.label(node)
        for node in ctx.graph.nodes
        if ctx.graph.kind(node) in COMPUTE_KINDS and (ctx.rule(node) is not None) == quantized
    ]


def _context(
    model_or_path: onnx.ModelProto | str | os.PathLike, target: str | BackendRules
) -> Context:
    rules = target if isinstance(target, BackendRules) else get_rules(target)
    if isinstance(model_or_path, onnx.ModelProto):
        return Context(Graph(model_or_path), rules)
    return Context(Graph(load_model(model_or_path)), rules)


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Read an ONNX file, turning every way that can fail into one BadInputError line."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"no such ONNX file: {path}")
    try:
        model = onnx.load(path)
    except Exception as exc:  # DecodeError, missing external data, ...: all "cannot read"
        raise BadInputError(f"cannot read {path} as ONNX: {one_line(exc)}") from exc
    if not model.graph.node:
        raise BadInputError(f"{path} holds no ONNX graph nodes: not an ONNX model?")
    return model
