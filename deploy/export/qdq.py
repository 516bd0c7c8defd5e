"""export(): prepared (fake-quant) model -> QDQ ONNX file.

torch.onnx.export(dynamo=True) turns torch's fake-quant ops into QuantizeLinear/DequantizeLinear
pairs, but leaves weights as float -> Q -> DQ. A post-pass quantizes those weights with the
core's own arithmetic into int8 initializers feeding DequantizeLinear directly, so the file holds
int8 weights (about 1/4 of the fp32 size). Narrow-range weights are exported on [-128, 127] with
a scale of amax/127, so the code -128 never occurs.

Default opset 18: per-channel Q/DQ needs >= 13, and the dynamo exporter emits opset-18
ReduceMean for global pooling that it cannot convert down.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import logging
import os
import warnings
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from qat_deploy.deploy.common.artifacts import write_atomic
from qat_deploy.deploy.common.errors import BadInputError, one_line
from qat_deploy.deploy.common.logs import quieted
from qat_deploy.deploy.export.passes import (
    GraphIndex,
    drop_dead_nodes,
    drop_unused_initializers,
    run_passes,
)
from qat_deploy.deploy.frontend.prepare import PreparedModel, split_inputs
from qat_deploy.deploy.rules.ops import ATEN_KINDS, FLOAT_KEY, KIND_KEY, LAYER_KEY, MODE_KEY, OP_KEY

DEFAULT_OPSET = 18
MIN_OPSET = 13
#: ONNX op a weighted op kind with an int32 bias exports as (a 2-D Linear becomes Gemm; an N-D
#: one becomes MatMul + Add, whose float bias no engine rounds, see deploy/frontend/arithmetic.py).
_BIAS_OP_TYPES = {"conv": "Conv", "conv_transpose": "ConvTranspose", "linear": "Gemm"}


def _register_fake_quant_shape_kernels() -> None:
    """torch ships no fake (shape-only) kernels for the fake-quant ops; with a static shape
    torch.export falls back to running them, with a symbolic batch axis it cannot. They return
    (output, mask), both shaped like the input."""
    ops = (
        "aten::fake_quantize_per_tensor_affine_cachemask",
        "aten::_fake_quantize_per_tensor_affine_cachemask_tensor_qparams",
        "aten::fake_quantize_per_channel_affine_cachemask",
    )
    for op in ops:
        with contextlib.suppress(RuntimeError):  # already registered (e.g. a newer torch)
            torch.library.register_fake(op)(_like_input)


def _like_input(x: torch.Tensor, *args) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(x), torch.empty_like(x, dtype=torch.bool)


_register_fake_quant_shape_kernels()


def export(
    model: PreparedModel,
    path: str | os.PathLike,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor,
    *,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = False,
    float_weights: dict[str, np.ndarray] | None = None,
) -> Path:
    """Write `model` as QDQ ONNX to `path` (atomically) and return the path. `float_weights`,
    when given, receives each int8 weight initializer's float original by name (what per-layer
    debugging compares against)."""
    with export_mode(model):
        proto = _torch_export(model, example_inputs, opset, dynamic_batch)
    tag_op_kinds(proto, (*model.plan.kept_float, *model.plan.float_by_rule))
    fold_weight_quantizers(proto, float_weights)
    quantize_biases(proto, frozenset(_BIAS_OP_TYPES[k] for k in model.rules.int32_bias))
    run_passes(proto, model.rules.export_passes)
    strip_debug_info(proto)
    onnx.helper.set_model_props(proto, {MODE_KEY: model.plan.mode})
    return save_checked(proto, path)


def export_fp32(
    model: nn.Module,
    path: str | os.PathLike,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor,
    *,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = False,
) -> Path:
    """Write the float model as ONNX: the baseline every int8 engine is compared against."""
    proto = _torch_export(model.eval(), example_inputs, opset, dynamic_batch)
    strip_debug_info(proto)
    return save_checked(proto, path)


@contextlib.contextmanager
def export_mode(model: nn.Module) -> Iterator[None]:
    """Switch every quantizer and folded layer to its export form, and back afterwards."""
    switchable = [m for m in model.modules() if hasattr(m, "set_export_mode")]
    was_training = model.training
    model.eval()
    try:
        for m in switchable:
            m.set_export_mode(True)
        yield
    finally:
        for m in switchable:
            m.set_export_mode(False)
        model.train(was_training)


def input_names(example_inputs) -> list[str]:
    """ONNX graph input names: the keywords of keyword inputs, else "input" / "input_<i>"."""
    args, kwargs = split_inputs(example_inputs)
    if kwargs:
        return list(kwargs)
    return ["input"] if len(args) == 1 else [f"input_{i}" for i in range(len(args))]


def _torch_export(model, example_inputs, opset: int, dynamic_batch: bool) -> onnx.ModelProto:
    if opset < MIN_OPSET:
        raise BadInputError(f"opset {opset} is too old: per-channel Q/DQ needs >= {MIN_OPSET}")
    inputs, kwargs = split_inputs(example_inputs)
    names = input_names(example_inputs)
    dynamic = None
    if dynamic_batch:
        batch = torch.export.Dim("batch")
        if kwargs:
            dynamic = {name: {0: batch} for name in kwargs}
        else:
            dynamic = tuple({0: batch} for _ in inputs)
            if _takes_varargs(model):  # forward(*args): one entry holding all inputs
                dynamic = (dynamic,)
    try:
        with torch.no_grad(), warnings.catch_warnings(), quieted(EXPORTER_LOGGERS, logging.ERROR):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model,
                inputs,
                None,
                kwargs=kwargs or None,
                dynamo=True,
                opset_version=opset,
                verbose=False,
                input_names=names,
                output_names=["output"],
                dynamic_shapes=dynamic,
            )
    except Exception as exc:
        root = exc
        while root.__cause__ is not None:
            root = root.__cause__
        raise BadInputError(f"torch.onnx.export failed: {one_line(root)}") from exc
    return program.model_proto


#: loggers whose warnings are not the user's problem: torch.onnx's chatter about torchvision
#: ops, and onnxscript's constant folding, which logs "Evaluation failed" for every node it
#: could not fold (dozens on a BERT) and then leaves it for the runtime
EXPORTER_LOGGERS = ("torch.onnx", "onnxscript.optimizer")


def _takes_varargs(model: nn.Module) -> bool:
    params = inspect.signature(model.forward).parameters.values()
    return any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params)


def _quantize_initializer(
    weight: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int
) -> np.ndarray:
    """ONNX QuantizeLinear semantics (divide, round half to even, saturate) in numpy."""
    if scale.size > 1:
        shape = [1] * weight.ndim
        shape[axis] = -1
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    info = np.iinfo(zero_point.dtype)
    q = np.rint(weight.astype(np.float32) / scale.astype(np.float32)) + zero_point.astype(
        np.float32
    )
    return np.clip(q, info.min, info.max).astype(zero_point.dtype)


def fold_weight_quantizers(
    model: onnx.ModelProto, float_weights: dict[str, np.ndarray] | None = None
) -> int:
    """Replace initializer -> QuantizeLinear with an integer initializer; returns how many.
    `float_weights` (if given) receives the float weight behind each integer initializer."""
    graph = model.graph
    _fold_casts_of_initializers(graph)
    inits = {t.name: t for t in graph.initializer}
    folded = 0
    for node in list(graph.node):
        if node.op_type != "QuantizeLinear" or node.input[0] not in inits:
            continue
        if len(node.input) < 3 or node.input[1] not in inits or node.input[2] not in inits:
            continue
        weight = numpy_helper.to_array(inits[node.input[0]])
        scale = numpy_helper.to_array(inits[node.input[1]])
        zp = numpy_helper.to_array(inits[node.input[2]])
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        q = numpy_helper.from_array(
            _quantize_initializer(weight, scale, zp, axis % max(weight.ndim, 1)), node.output[0]
        )
        graph.initializer.append(q)
        graph.node.remove(node)
        if float_weights is not None:
            float_weights[node.output[0]] = weight
        folded += 1
    drop_dead_nodes(graph)
    drop_unused_initializers(graph)
    return folded


def _fold_casts_of_initializers(graph: onnx.GraphProto) -> None:
    """Cast(initializer) read only as Q/DQ scales or zero points -> a cast initializer. The
    exporter's constant folding stops at a size limit: a 30522-row embedding table's per-row
    zero points stayed int32 -> Cast, which kept its QuantizeLinear from folding and the
    47 MB table float in the file."""
    inits = {t.name: t for t in graph.initializer}
    qparam_reads = defaultdict(list)
    for node in graph.node:
        for index, name in enumerate(node.input):
            qdq = node.op_type in ("QuantizeLinear", "DequantizeLinear") and index > 0
            qparam_reads[name].append(qdq)
    for node in list(graph.node):
        if node.op_type != "Cast" or node.input[0] not in inits:
            continue
        if not all(qparam_reads[node.output[0]]):
            continue
        to = next(a.i for a in node.attribute if a.name == "to")
        value = numpy_helper.to_array(inits[node.input[0]])
        cast = value.astype(onnx.helper.tensor_dtype_to_np_dtype(to))
        graph.initializer.append(numpy_helper.from_array(cast, node.output[0]))
        graph.node.remove(node)


def quantize_biases(model: onnx.ModelProto, op_types: frozenset[str]) -> int:
    """Give ops in `op_types` an int32 bias behind a DequantizeLinear whose scale is input
    scale x weight scale, as backends that fuse only all-quantized inputs require."""
    g = GraphIndex(model)
    done = 0
    for node in g.graph.node:
        if node.op_type not in op_types or len(node.input) < 3 or node.input[2] not in g.inits:
            continue
        x_dq, w_dq = g.producer.get(node.input[0]), g.producer.get(node.input[1])
        if not all(dq is not None and dq.op_type == "DequantizeLinear" for dq in (x_dq, w_dq)):
            continue
        x_scale, w_scale = (g.const(dq.input[1]).astype(np.float32) for dq in (x_dq, w_dq))
        scale = (x_scale * w_scale).astype(np.float32)
        bias = g.const(node.input[2]).astype(np.float32)
        codes = np.clip(np.rint(bias / scale), -(2**31), 2**31 - 1).astype(np.int32)
        # named per node (fresh names): the exporter shares equal constants between layers,
        # and each consumer needs its own scale
        name = f"{node.name or node.output[0]}_bias"
        shape = (-1,) if scale.size > 1 else ()
        inputs = [
            g.add_init(f"{name}_int32", codes),
            g.add_init(f"{name}_scale", scale.reshape(shape)),
            g.add_init(f"{name}_zero_point", np.zeros(scale.shape, np.int32).reshape(shape)),
        ]
        dequantized = g.fresh(f"{name}_dequantized")
        dq = onnx.helper.make_node("DequantizeLinear", inputs, [dequantized], f"{name}_dq", axis=0)
        g.graph.node.insert(list(g.graph.node).index(node), dq)
        g.producer[dequantized] = dq
        node.input[2] = dequantized
        done += 1
    g.drop_unused_inits()
    return done


def tag_op_kinds(model: onnx.ModelProto, kept_float: Sequence[str] = ()) -> int:
    """Write each node's op kind (deploy.rules.ops) and the torch op it came from into its metadata,
    from the exporter's record of the ATen op behind it. lint() then sees the kinds prepare()
    saw: a SiLU exported as Sigmoid + Mul is one "silu", not a Sigmoid and a Mul. Nodes of the
    layers in `kept_float` (module paths) are tagged FLOAT_KEY: float by the user's choice or
    the rules' (BackendRules.float_conv_groups)."""
    tagged = 0
    scopes = tuple(f"/model.{path}: " for path in kept_float)  # PreparedModel holds `model`
    for node in model.graph.node:
        props = {p.key: p.value for p in node.metadata_props}
        scope = props.get("namespace", "")
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") or ": aten." not in scope:
            continue
        op = scope.rsplit(": aten.", 1)[1]  # e.g. "silu.default"
        kind = ATEN_KINDS.get(op.split(".")[0], "")
        entry = node.metadata_props.add()
        entry.key, entry.value = KIND_KEY, kind
        entry = node.metadata_props.add()
        entry.key, entry.value = OP_KEY, hashlib.sha1(scope.encode()).hexdigest()[:12]
        entry = node.metadata_props.add()
        entry.key, entry.value = LAYER_KEY, layer_name(scope)
        if any(s in scope for s in scopes):
            entry = node.metadata_props.add()
            entry.key, entry.value = FLOAT_KEY, "1"
        tagged += 1
    return tagged


def layer_name(scope: str) -> str:
    """The user's layer behind an exporter scope such as "...PreparedModel/model.layer1.conv1:
    QuantConvBn/conv2d_3: aten.conv2d.default": its module path ("layer1.conv1"), or for a
    functional op outside any module the op's own name ("add_3")."""
    segments = [part.split(": ", 1)[0] for part in scope.split("/")]
    modules = [s.removeprefix("model.") for s in segments[1:-1] if s.startswith("model.")]
    return modules[-1] if modules else segments[-1]


def strip_debug_info(model: onnx.ModelProto) -> None:
    """Drop the exporter's per-node stack traces and fx dumps: they embed absolute paths and
    per-process counters, which would make identical models differ byte for byte. Our own
    op tags (tag_op_kinds) stay."""
    for node in model.graph.node:
        ours = [
            (p.key, p.value)
            for p in node.metadata_props
            if p.key in (KIND_KEY, OP_KEY, FLOAT_KEY, LAYER_KEY)
        ]
        del node.metadata_props[:]
        for key, value in ours:
            entry = node.metadata_props.add()
            entry.key, entry.value = key, value
        node.doc_string = ""
    del model.graph.metadata_props[:]
    del model.metadata_props[:]


def save_checked(model: onnx.ModelProto, path: str | os.PathLike) -> Path:
    """Full onnx check + shape inference, then write to a temp file and rename into place."""
    model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    onnx.checker.check_model(model, full_check=True)
    return write_atomic(Path(path), model.SerializeToString(deterministic=True))
