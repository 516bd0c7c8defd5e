"""ONNX post-passes that let a runtime fuse more of the exported QDQ graph into int8 kernels.

A backend lists the passes it wants in its rules (`export_passes` in backends/<name>/rules.py,
data like the rest of its rules); export() runs them after folding the weights. Every pass keeps
what the model computes exactly (same values, same broadcasts); they only change how a runtime's
graph optimizer sees the graph.

- global_average_pool: the dynamo exporter writes adaptive average pooling to 1x1 as
  ReduceMean(axes=[2, 3], keepdims=1); GlobalAveragePool is the same op under the name
  onnxruntime's QDQ fusion knows (DQ -> GlobalAveragePool -> Q becomes
  QLinearGlobalAveragePool). x.mean([2, 3]) (keepdims=0, ShuffleNetV2) becomes
  GlobalAveragePool -> Squeeze: onnxruntime moves the Q after the Squeeze up to the pool.
- matmul_bias_3d: Linear layers on 3-D inputs export as MatMul + Add(bias [N]). onnxruntime's
  MatMulAddFusion turns that into Reshape -> Gemm(float bias) -> Reshape, a Gemm its QDQ
  selector leaves in float (it needs an int32 bias), and the reshapes cost time. It only fuses
  a 1-D bias when the input is 3-D, so a [1, 1, N] bias keeps the MatMul, which becomes
  MatMulIntegerToFloat followed by the bias Add (measured faster on bert_tiny than int32 bias
  + QGemm: no reshapes).
- reduce_mean_keepdims: ReduceMean(keepdims=0) -> ReduceMean(keepdims=1) -> Squeeze of the
  reduced axes. OpenVINO 2026.4's CPU plugin fuses ReduceMean(keepdims=0) -> per-channel
  BatchNormalization -> FakeQuantize into one Reduce node and computes it wrong (LeViT's head:
  about 100% relative error at that quantizer, int8 vs fake-quant cosine 0.987); keeping the
  axes stops that fusion.
- quantize_before_pass_through: the front end quantizes the output of a MaxPool or a
  reshape (they are quantization-agnostic); OpenVINO does not move that FakeQuantize above
  them, so the producing Conv (ResNet's stem) or ReduceMean (global pooling before the
  classifier's flatten) writes fp32 and the op runs in fp32. A copy of the quantizer above
  the op keeps both in u8, as in NNCF's graphs.
- fold_pad_into_conv: timm's "same" padding (Conv2dSame, and EfficientNetV2's strided Convs)
  exports as Pad -> Conv. The exporter folds that Pad into the Conv's pads in an fp32 graph,
  but the Conv's input quantizer sits between them in ours: Pad -> Q -> DQ -> Conv. Both
  runtimes then run the Pad alone in float (OpenVINO: a bf16 reference kernel and Reorders).
  Zero padding commutes with the quantizer (0 is on every grid: it quantizes to the zero
  point and back to 0), so the Pad moves into the Conv's pads, behind the Q -> DQ pair.
- fold_quantized_constants: a quantized branch no graph input reaches (timm EdgeNeXt's Fourier
  positional encoding: Sin/Cos of a fixed grid -> Q -> DQ -> Conv with int8 weights) becomes
  the initializer it computes, as the fp32 export's optimizer folds it. Runtimes fold such a
  branch anyway, so its quantizers buy no int8 kernel; OpenVINO 2026.4 folds it wrong:
  EdgeNeXt-XXS's position Conv came out 77% off and the engine's cosine to its own file
  fell to 0.9952 (with the quantizer alone folded, the CPU plugin failed to compile).
- drop_requantize_after_pass_through: the quantizer after such an op is then an identity on
  values already on its grid. With a nonzero zero point OpenVINO still runs it, as a
  Subgraph that subtracts the zero point and requantizes (two per gate in timm's
  ECA-ResNet26t, between the pooling and the Conv1d); without it the dequantization moves
  through the op into the reader, as in NNCF's graphs.
- average_pool_floor_mode: ResNet-D shortcuts (timm's ResNet-D family, ECA-ResNet26t)
  average-pool with ceil_mode=1. Where every window fits the input, floor mode gives the same
  windows and output; the OpenVINO 2026.4 CPU plugin runs DQ -> AveragePool -> Q in f32 with
  ceil_mode=1 and in u8 with ceil_mode=0 (a 256x56x56 pool: 213 -> 53 us, and its
  quantizer's f32 Subgraph shrinks with it), so such pools lose the flag.
- relu_as_max_after_concat: DenseNet's pre-activation Concat -> BatchNorm -> ReLU -> Q. Where
  every BN multiplier is positive and the batch is fixed, OpenVINO 2026.4 folds the BN and the
  ReLU into the FakeQuantize (MulFakeQuantizeFusion refuses multipliers <= 0) and then splits
  that per-channel FakeQuantize over the Concat's inputs (MoveFakeQuantize): one Subgraph per
  input, O(layers^2) per dense block, 594 on DenseNet-121 instead of 63. The ReLU written as
  Max(x, 0), the same function, is not folded, so the Concat runs on the int8 inputs and one
  Subgraph dequantizes, normalizes, clamps and requantizes its output. Only there: with a
  multiplier <= 0 or a dynamic batch OpenVINO folds BN + ReLU into one quantizer after the
  Concat, without a split, and that ran faster than BN + Max + Q (DenseNet-121 with mixed-sign
  BN scales: 1.013-1.015x the time with the ReLUs rewritten).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper


class GraphIndex:
    """Lookups over an ONNX graph that graph rewrites need (rebuilt after each rewrite), and
    initializers added under fresh names."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.graph = model.graph
        self.inits = {t.name: t for t in self.graph.initializer}
        self.producer = {o: n for n in self.graph.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in self.graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)

    def const(self, name: str) -> np.ndarray | None:
        init = self.inits.get(name)
        return None if init is None else numpy_helper.to_array(init)

    def made_by(self, name: str, op_type: str) -> onnx.NodeProto | None:
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op_type else None

    def fresh(self, base: str) -> str:
        taken = set(self.inits) | set(self.producer) | {i.name for i in self.graph.input}
        name, i = base, 0
        while name in taken:
            i += 1
            name = f"{base}_{i}"
        return name

    def add_init(self, base: str, value: np.ndarray) -> str:
        name = self.fresh(base)
        tensor = numpy_helper.from_array(value, name)
        self.graph.initializer.append(tensor)
        self.inits[name] = tensor
        return name

    def drop_unused_inits(self) -> None:
        drop_unused_initializers(self.graph)


def uint8_qparams(node: onnx.NodeProto, g: GraphIndex) -> tuple[float, int] | None:
    """(scale, zero point) of a per-tensor uint8 QuantizeLinear with constant qparams; None
    for anything else."""
    if node.op_type != "QuantizeLinear" or len(node.input) < 3:
        return None
    scale, zero_point = g.const(node.input[1]), g.const(node.input[2])
    if scale is None or zero_point is None or scale.size != 1 or zero_point.dtype != np.uint8:
        return None
    return float(scale.reshape(())), int(zero_point.reshape(()))


def along_axis(param: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    """A Q/DQ parameter (scale, zero point) shaped to broadcast against its ndim-dimensional
    tensor: a per-channel one along `axis` (ONNX's, may be negative), a per-tensor one as a
    scalar."""
    if param.size == 1:
        return param.reshape(())
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return param.reshape(shape)


def drop_dead_nodes(graph: onnx.GraphProto) -> None:
    """Remove nodes whose outputs nothing reads any more (a rewrite's leftovers)."""
    while True:
        used = {name for n in graph.node for name in n.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            return
        for node in dead:
            graph.node.remove(node)


def drop_unused_initializers(graph: onnx.GraphProto) -> None:
    """Remove initializers no node reads and no graph output names."""
    used = {name for node in graph.node for name in node.input}
    used |= {o.name for o in graph.output}
    for init in list(graph.initializer):
        if init.name not in used:
            graph.initializer.remove(init)


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _dims(model: onnx.ModelProto, name: str) -> list[int] | None:
    """The recorded shape of a tensor, 0 for a dimension that is not a fixed number; None
    when no shape is recorded."""
    for v in [*model.graph.value_info, *model.graph.input, *model.graph.output]:
        if v.name == name and v.type.tensor_type.HasField("shape"):
            return [
                d.dim_value if d.HasField("dim_value") else 0 for d in v.type.tensor_type.shape.dim
            ]
    return None


def _rank(model: onnx.ModelProto, name: str) -> int | None:
    dims = _dims(model, name)
    return None if dims is None else len(dims)


def global_average_pool(model: onnx.ModelProto) -> int:
    """ReduceMean over the spatial axes of a 4-D tensor -> GlobalAveragePool (-> Squeeze of
    those axes when keepdims=0)."""
    g = GraphIndex(model)
    inferred = onnx.shape_inference.infer_shapes(model)
    rewritten = 0
    for node in list(g.graph.node):
        if node.op_type != "ReduceMean":
            continue
        axes = _attr(node, "axes", None)
        if axes is None and len(node.input) > 1:
            found = g.const(node.input[1])
            axes = None if found is None else found.tolist()
        if _rank(inferred, node.input[0]) != 4 or sorted(a % 4 for a in axes or []) != [2, 3]:
            continue
        at = list(g.graph.node).index(node)
        outputs = list(node.output)
        if _attr(node, "keepdims", 1) != 1:
            pooled = g.fresh(f"{node.output[0]}_pooled")
            axes_name = g.add_init(f"{node.name}_axes", np.array([2, 3], np.int64))
            squeeze = helper.make_node(
                "Squeeze", [pooled, axes_name], outputs, f"{node.name}_squeeze"
            )
            g.graph.node.insert(at, squeeze)
            outputs = [pooled]
        pool = helper.make_node("GlobalAveragePool", [node.input[0]], outputs, node.name)
        g.graph.node.remove(node)
        g.graph.node.insert(at, pool)
        rewritten += 1
    g.drop_unused_inits()
    return rewritten


def matmul_bias_3d(model: onnx.ModelProto) -> int:
    """Add(MatMul(DQ x, DQ w), bias of shape [N]) with a 3-D x: the bias becomes [1, 1, N]
    (the same broadcast, so the same values)."""
    g = GraphIndex(model)
    inferred = onnx.shape_inference.infer_shapes(model)
    rewritten = 0
    for node in list(g.graph.node):
        if node.op_type != "Add":
            continue
        for side in (0, 1):
            matmul = g.made_by(node.input[side], "MatMul")
            bias = g.const(node.input[1 - side])
            if matmul is None or bias is None or bias.ndim != 1:
                continue
            if (
                _rank(inferred, matmul.input[0]) != 3
                or g.made_by(matmul.input[0], "DequantizeLinear") is None
            ):
                continue
            node.input[1 - side] = g.add_init(
                f"{node.name or matmul.name}_bias_3d", bias.reshape(1, 1, -1)
            )
            rewritten += 1
            break
    g.drop_unused_inits()
    return rewritten


def reduce_mean_keepdims(model: onnx.ModelProto) -> int:
    """ReduceMean(keepdims=0) -> ReduceMean(keepdims=1) -> Squeeze(the reduced axes)."""
    g = GraphIndex(model)
    rewritten = 0
    for node in list(g.graph.node):
        if node.op_type != "ReduceMean" or _attr(node, "keepdims", 1) != 0:
            continue
        axes = _attr(node, "axes", None)
        if axes is None and len(node.input) > 1:
            found = g.const(node.input[1])
            axes = None if found is None else found.tolist()
        if not axes:  # all axes (or run-time axes): leave it
            continue
        for attribute in node.attribute:
            if attribute.name == "keepdims":
                attribute.i = 1
        kept = g.fresh(f"{node.output[0]}_kept")
        axes_name = g.add_init(f"{node.name}_squeeze_axes", np.array(axes, np.int64))
        squeeze = helper.make_node(
            "Squeeze", [kept, axes_name], [node.output[0]], f"{node.name}_squeeze"
        )
        node.output[0] = kept
        g.graph.node.insert(list(g.graph.node).index(node) + 1, squeeze)
        rewritten += 1
    return rewritten


#: Ops that commute with per-tensor quantization of their data input (input 0).
_QUANTIZATION_AGNOSTIC = frozenset({"MaxPool", "Reshape", "Flatten", "Squeeze", "Unsqueeze"})
#: Producers a reshape's quantizer moves up to: the pooling and Conv outputs of a CNN tail.
#: Not transformer head reshapes, whose quantizers belong to the MatMul that reads them.
_RESHAPED_PRODUCERS = frozenset(
    {"MaxPool", "AveragePool", "GlobalAveragePool", "ReduceMean", "Conv", "Relu", "Clip"}
)


def quantize_before_pass_through(model: onnx.ModelProto) -> int:
    """op -> Q -> DQ becomes Q -> DQ -> op -> Q -> DQ with the same scale and zero point, for
    MaxPool and reshapes. Exact: per-tensor quantization is elementwise and monotonic, so it
    commutes with max and with moving elements, and the second pair is an identity on values
    already on the grid. The runtime then sees a quantized input and keeps the op and its
    producer (a Conv, a ReduceMean) in 8 bits. Only where the op is the producer's one
    consumer: otherwise the float output is computed anyway."""
    g = GraphIndex(model)
    rewritten = 0
    # consumers first, so MaxPool -> Flatten -> Q moves up through both ops
    for node in reversed(list(g.graph.node)):
        if node.op_type not in _QUANTIZATION_AGNOSTIC or len(node.output) != 1:
            continue
        users = g.consumers.get(node.output[0], [])
        if not users or any(u.op_type != "QuantizeLinear" for u in users):
            continue
        params = {tuple(u.input[1:]) for u in users}
        producer = g.producer.get(node.input[0])
        if len(params) != 1 or producer is None or producer.op_type == "DequantizeLinear":
            continue
        if node.op_type != "MaxPool" and producer.op_type not in _RESHAPED_PRODUCERS:
            continue
        if len(g.consumers[node.input[0]]) != 1:  # the producer's float output is needed too
            continue
        (qparams,) = params
        base = f"{node.name or node.output[0]}_input"
        quantized, dequantized = g.fresh(f"{base}_quantized"), g.fresh(f"{base}_dequantized")
        q = helper.make_node("QuantizeLinear", [node.input[0], *qparams], [quantized], f"{base}_q")
        dq = helper.make_node(
            "DequantizeLinear", [quantized, *qparams], [dequantized], f"{base}_dq"
        )
        at = list(g.graph.node).index(node)
        g.graph.node.insert(at, dq)
        g.graph.node.insert(at, q)
        g.producer[quantized], g.producer[dequantized] = q, dq
        g.consumers[node.input[0]] = [q]  # the op was its producer's one consumer
        g.consumers[quantized], g.consumers[dequantized] = [dq], [node]
        node.input[0] = dequantized
        rewritten += 1
    return rewritten


def fold_pad_into_conv(model: onnx.ModelProto) -> int:
    """Pad(constant 0 on spatial axes) -> [Q -> DQ ->] Conv loses the Pad; each Conv reading
    it adds the padding to its own pads. Exact: a Conv pads with zeros itself, and zero
    padding commutes with per-tensor and per-channel quantization. Only where the Pad's one
    reader is the Conv, or a quantizer whose every copy only Convs read as their input."""
    g = GraphIndex(model)
    outputs = {o.name for o in g.graph.output}
    rewritten = 0
    for pad in [n for n in g.graph.node if n.op_type == "Pad"]:
        widths = _spatial_zero_padding(pad, g)
        users = g.consumers.get(pad.output[0], [])
        if widths is None or len(users) != 1 or pad.output[0] in outputs:
            continue
        convs = _convs_reading(g, users[0], outputs)
        if not convs:
            continue
        for conv in convs:
            pads = list(_attr(conv, "pads", [0] * len(widths)))
            _set_ints(conv, "pads", [a + b for a, b in zip(pads, widths, strict=True)])
        users[0].input[list(users[0].input).index(pad.output[0])] = pad.input[0]
        _forget_shapes(g.graph, _outputs_between(g, users[0]))
        g.graph.node.remove(pad)
        rewritten += 1
    g.drop_unused_inits()
    return rewritten


def _spatial_zero_padding(pad: onnx.NodeProto, g: GraphIndex) -> list[int] | None:
    """A Pad's widths as a Conv's pads (begins, then ends, spatial axes only), if it pads with
    zeros, non-negatively, on no axis but the spatial ones of an NC... tensor."""
    widths = g.const(pad.input[1]) if len(pad.input) > 1 else None
    value = g.const(pad.input[2]) if len(pad.input) > 2 and pad.input[2] else np.zeros(1)
    if _attr(pad, "mode", b"constant") != b"constant":
        return None
    if widths is None or value is None or np.any(value != 0) or any(pad.input[3:]):
        return None
    rank = widths.size // 2
    begins, ends = widths[:rank].tolist(), widths[rank:].tolist()
    if rank < 3 or np.any(widths < 0) or any(begins[:2]) or any(ends[:2]):
        return None
    return begins[2:] + ends[2:]


def _convs_reading(
    g: GraphIndex, user: onnx.NodeProto, outputs: set[str]
) -> list[onnx.NodeProto] | None:
    """The Convs that read `user` (a Conv itself, or a QuantizeLinear whose DequantizeLinears
    only Convs read) as their data input; None where anything else reads it on the way."""
    if user.op_type == "Conv":
        return [user] if _pads_explicitly(user) else None
    if user.op_type != "QuantizeLinear" or user.output[0] in outputs:
        return None
    convs: list[onnx.NodeProto] = []
    for dequantize in g.consumers.get(user.output[0], []):
        if dequantize.op_type != "DequantizeLinear" or dequantize.output[0] in outputs:
            return None
        readers = g.consumers.get(dequantize.output[0], [])
        if not readers or not all(
            r.op_type == "Conv" and r.input[0] == dequantize.output[0] and _pads_explicitly(r)
            for r in readers
        ):
            return None
        convs += readers
    return convs or None


def _pads_explicitly(node: onnx.NodeProto) -> bool:
    """Whether a Conv's or a pool's padding is its pads attribute (auto_pad ignores pads)."""
    return _attr(node, "auto_pad", b"NOTSET") == b"NOTSET"


def _set_ints(node: onnx.NodeProto, name: str, values: list[int]) -> None:
    for a in list(node.attribute):
        if a.name == name:
            node.attribute.remove(a)
    node.attribute.append(helper.make_attribute(name, values))


def _outputs_between(g: GraphIndex, user: onnx.NodeProto) -> set[str]:
    """Tensors from `user` up to the Convs, whose recorded shapes lose the padding."""
    names = set(user.output)
    for dequantize in g.consumers.get(user.output[0], []):
        names.update(dequantize.output)
    return names


def _forget_shapes(graph: onnx.GraphProto, names: set[str]) -> None:
    for info in [v for v in graph.value_info if v.name in names]:
        graph.value_info.remove(info)


#: Ops whose output is not a function of their inputs: never folded to a constant.
_NONDETERMINISTIC = frozenset(
    {
        "RandomNormal",
        "RandomNormalLike",
        "RandomUniform",
        "RandomUniformLike",
        "Multinomial",
        "Bernoulli",
        "Dropout",
    }
)


def fold_quantized_constants(model: onnx.ModelProto) -> int:
    """Values no graph input reaches, computed through an activation quantizer (Q -> DQ on a
    computed value), become initializers where an input-dependent node reads them: the values
    onnxruntime's plain semantics compute, so the file computes the same. Other constant math
    (a weight's DequantizeLinear and what transposes it, shape arithmetic) stays: runtimes
    need weights as DequantizeLinear(int8) to pick int8 kernels. Returns how many values were
    folded."""
    g = GraphIndex(model)
    constant = _input_independent(g.graph)
    quantized = _behind_computed_quantizers(g, constant)
    boundary = {
        name
        for n in g.graph.node
        if not all(o in constant for o in n.output)
        for name in n.input
        if name in quantized
    }
    boundary |= {o.name for o in g.graph.output if o.name in quantized}
    if not boundary:
        return 0
    names = sorted(boundary)
    for name, value in zip(names, _evaluate(model, g, names), strict=True):
        g.graph.initializer.append(numpy_helper.from_array(value, name))
        producer = g.producer[name]
        producer.output[list(producer.output).index(name)] = g.fresh(f"{name}_folded")
    drop_dead_nodes(g.graph)
    drop_unused_initializers(g.graph)
    _forget_shapes(g.graph, {v.name for v in g.graph.value_info} - _tensor_names(g.graph))
    return len(names)


def _behind_computed_quantizers(g: GraphIndex, constant: set[str]) -> set[str]:
    """Input-independent values that a QuantizeLinear of a computed value (not a weight
    initializer or Constant) feeds, directly or through other ops."""
    found: set[str] = set()
    for node in g.graph.node:  # topological order
        if not all(o in constant for o in node.output):
            continue
        quantizes_computed = node.op_type == "QuantizeLinear" and not (
            node.input[0] in g.inits or g.made_by(node.input[0], "Constant") is not None
        )
        if quantizes_computed or any(i in found for i in node.input):
            found.update(node.output)
    return found


def _input_independent(graph: onnx.GraphProto) -> set[str]:
    """Names of the tensors computed from initializers and constants alone, deterministically."""
    known = {t.name for t in graph.initializer}
    for node in graph.node:  # topological order
        if node.op_type in _NONDETERMINISTIC or any(
            a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
            for a in node.attribute
        ):
            continue
        if all(not name or name in known for name in node.input):
            known.update(node.output)
    return known


def _evaluate(model: onnx.ModelProto, g: GraphIndex, names: list[str]) -> list[np.ndarray]:
    """The values of input-independent tensors: their ancestors alone, run by onnxruntime with
    its graph optimizations off (the plain ONNX semantics)."""
    import onnxruntime as ort

    needed: dict[str, onnx.NodeProto] = {}
    todo = list(names)
    while todo:
        node = g.producer.get(todo.pop())
        if node is not None and node.output[0] not in needed:
            needed[node.output[0]] = node
            todo.extend(i for i in node.input if i)
    nodes = [n for n in g.graph.node if n.output[0] in needed]  # graph order
    used = {i for n in nodes for i in n.input}
    graph = helper.make_graph(
        nodes,
        "constants",
        [],
        [helper.make_empty_tensor_value_info(name) for name in names],
        [t for name, t in g.inits.items() if name in used],
    )
    sub = helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    typed = onnx.shape_inference.infer_shapes(sub)
    known = {v.name: v for v in typed.graph.value_info}
    del sub.graph.output[:]
    sub.graph.output.extend(  # a DequantizeLinear's output where inference cannot tell
        known.get(name) or helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
        for name in names
    )
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(sub.SerializeToString(), options, ["CPUExecutionProvider"])
    return session.run(names, {})


def _tensor_names(graph: onnx.GraphProto) -> set[str]:
    names = {t.name for t in graph.initializer} | {i.name for i in graph.input}
    return names | {o for n in graph.node for o in n.output}


def drop_requantize_after_pass_through(model: onnx.ModelProto) -> int:
    """DQ -> pass-through ops -> Q -> DQ with the same uint8 scale and nonzero zero point
    loses that Q -> DQ pair: its values are on the grid already, so the pair is an identity.
    OpenVINO keeps such a pair as a Subgraph that subtracts the zero point and requantizes
    (two per block on timm ECA-ResNet26t's pooled gate input, after the squeeze and the
    view); it moves the DQ through the ops into the reader instead. With zero point 0 it
    merges the pair into the reader itself, so those stay."""
    g = GraphIndex(model)
    rewritten = 0
    for quantize in list(g.graph.node):
        params = uint8_qparams(quantize, g)
        if params is None or params[1] == 0:
            continue
        source = _dequantized_source(g, quantize.input[0])
        if source is None or uint8_qparams(g.producer[source.input[0]], g) != params:
            continue
        readers = g.consumers.get(quantize.output[0], [])
        if not readers or any(r.op_type != "DequantizeLinear" for r in readers):
            continue
        if any(o.name in {r.output[0] for r in readers} for o in g.graph.output):
            continue
        for dequantize in readers:
            for user in g.consumers.get(dequantize.output[0], []):
                user.input[:] = [
                    quantize.input[0] if i == dequantize.output[0] else i for i in user.input
                ]
                g.consumers.setdefault(quantize.input[0], []).append(user)
            g.graph.node.remove(dequantize)
        g.graph.node.remove(quantize)
        g.consumers[quantize.input[0]].remove(quantize)
        rewritten += 1
    g.drop_unused_inits()
    return rewritten


def average_pool_floor_mode(model: onnx.ModelProto) -> int:
    """AveragePool(ceil_mode=1) -> ceil_mode=0 where that changes no window: on every spatial
    axis (size + pads - dilated kernel) is a multiple of the stride, so ceil and floor agree on
    the output size. Pools with an unknown input size or auto_pad are left alone."""
    pools = [
        n
        for n in model.graph.node
        if n.op_type == "AveragePool" and _attr(n, "ceil_mode", 0) == 1 and _pads_explicitly(n)
    ]
    if not pools:  # most models: no shape inference needed
        return 0
    inferred = onnx.shape_inference.infer_shapes(model)
    rewritten = 0
    for node in pools:
        kernel = _attr(node, "kernel_shape", [])
        spatial = (_dims(inferred, node.input[0]) or [])[2:]
        if not kernel or len(spatial) != len(kernel) or not all(spatial):
            continue
        strides = _attr(node, "strides", None) or [1] * len(kernel)
        dilations = _attr(node, "dilations", None) or [1] * len(kernel)
        pads = _attr(node, "pads", None) or [0] * (2 * len(kernel))
        spans = [
            size + pads[i] + pads[i + len(kernel)] - (k - 1) * d - 1
            for i, (size, k, d) in enumerate(zip(spatial, kernel, dilations, strict=True))
        ]
        if all(span >= 0 and span % s == 0 for span, s in zip(spans, strides, strict=True)):
            next(a for a in node.attribute if a.name == "ceil_mode").i = 0
            rewritten += 1
    return rewritten


def relu_as_max_after_concat(model: onnx.ModelProto) -> int:
    """Concat of dequantized inputs -> per-channel affine ops with positive multipliers
    (BatchNormalization, or Mul/Add by a constant) -> Relu -> QuantizeLinear, with a fixed
    shape: the Relu becomes Max(x, 0), the same function. Only where each node on that path has
    the next as its one reader. Exactly where OpenVINO would split the quantizer: elsewhere it
    folds BN + ReLU into one quantizer after the Concat, which runs faster than BN + Max + Q."""
    g = GraphIndex(model)
    found = [
        (relu, concat)
        for relu in model.graph.node
        if relu.op_type == "Relu"
        and [r.op_type for r in g.consumers.get(relu.output[0], [])] == ["QuantizeLinear"]
        and (concat := _positive_affine_path_from_quantized_concat(g, relu.input[0]))
    ]
    if not found:  # most models: no shape inference needed
        return 0
    inferred = onnx.shape_inference.infer_shapes(model)
    zero = None
    rewritten = 0
    for relu, concat in found:
        if not all(_dims(inferred, concat.output[0]) or [0]):  # a dynamic batch: no split
            continue
        zero = zero or g.add_init("relu_floor", np.zeros((), np.float32))
        relu.op_type = "Max"
        relu.input.append(zero)
        rewritten += 1
    return rewritten


def _positive_affine_path_from_quantized_concat(g: GraphIndex, name: str) -> onnx.NodeProto | None:
    """The Concat of DequantizeLinear outputs that `name` comes from through one or more
    per-channel affine ops with positive multipliers, each read only by the next; None if
    there is none."""
    node, affine = g.producer.get(name), 0
    while node is not None and len(g.consumers.get(node.output[0], [])) == 1:
        if node.op_type == "Concat":
            quantized = all(g.made_by(i, "DequantizeLinear") for i in node.input)
            return node if affine and quantized else None
        data = _positive_affine_data_input(g, node)
        if data is None:
            return None
        node, affine = g.producer.get(data), affine + 1
    return None


def _positive_affine_data_input(g: GraphIndex, node: onnx.NodeProto) -> str | None:
    """The one computed input of an inference BatchNormalization with positive scales, of a
    Mul by a positive constant or of an Add of a constant; None for any other node."""
    if node.op_type == "BatchNormalization" and len(node.output) == 1:
        if not all(i in g.inits for i in node.input[1:]):
            return None
        return node.input[0] if (g.const(node.input[1]) > 0).all() else None
    if node.op_type in ("Mul", "Add"):
        computed = [i for i in node.input if i not in g.inits]
        if len(computed) != 1:
            return None
        operand = g.const(next(i for i in node.input if i in g.inits))
        return computed[0] if node.op_type == "Add" or (operand > 0).all() else None
    return None


def _dequantized_source(g: GraphIndex, name: str) -> onnx.NodeProto | None:
    """The DequantizeLinear of a quantized value that reaches `name` through pass-through ops
    (at least one), if one does and its producer is a QuantizeLinear."""
    node, crossed = g.producer.get(name), 0
    while node is not None and node.op_type in _QUANTIZATION_AGNOSTIC:
        node, crossed = g.producer.get(node.input[0]), crossed + 1
    if node is None or node.op_type != "DequantizeLinear" or not crossed:
        return None
    return node if g.made_by(node.input[0], "QuantizeLinear") is not None else None


PASSES: dict[str, Callable[[onnx.ModelProto], int]] = {
    "fold_pad_into_conv": fold_pad_into_conv,
    "fold_quantized_constants": fold_quantized_constants,
    "global_average_pool": global_average_pool,
    "matmul_bias_3d": matmul_bias_3d,
    "reduce_mean_keepdims": reduce_mean_keepdims,
    "quantize_before_pass_through": quantize_before_pass_through,
    "drop_requantize_after_pass_through": drop_requantize_after_pass_through,
    "average_pool_floor_mode": average_pool_floor_mode,
    "relu_as_max_after_concat": relu_as_max_after_concat,
}


def run_passes(model: onnx.ModelProto, names: tuple[str, ...]) -> dict[str, int]:
    """Apply the named passes in order; returns how many rewrites each made."""
    return {name: PASSES[name](model) for name in names}
