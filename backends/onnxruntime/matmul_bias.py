"""A fusion onnxruntime's optimizer stops short of, done before the session is created.

For DequantizeLinear(x) -> MatMul <- DequantizeLinear(w) with a float output, onnxruntime's QDQ
MatMul action emits MatMulIntegerToFloat without a bias, so the Add of the Linear's bias that
follows stays a separate float op (12 of them in a 2-layer BERT encoder). MatMulIntegerToFloat
has a bias input: this pass writes the node with its bias, which onnxruntime then keeps, runs
and fuses around like the one it would have made. Same arithmetic as the QDQ graph:
(A - a_zp)(B - b_zp) * a_scale * b_scale + bias.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from qat_deploy.deploy.export.passes import GraphIndex, drop_dead_nodes

_INT8 = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)


def fuse_matmul_bias(model: onnx.ModelProto) -> int:
    """Replace every DQ -> MatMul <- DQ(int8 weight) -> Add(constant bias) by one
    com.microsoft MatMulIntegerToFloat with that bias; returns how many."""
    g = GraphIndex(model)
    graph = g.graph
    fused = 0
    for matmul in [n for n in graph.node if n.op_type == "MatMul"]:
        x_dq = g.producer.get(matmul.input[0])
        weight = _weight(g.producer.get(matmul.input[1]), g)
        add = _single_add(matmul, g)
        if add is None or weight is None or not _is_dq(x_dq, g.inits, weight=False):
            continue
        codes, w_scale, w_zero_point = weight
        bias = _bias(add, matmul, g, columns=codes.shape[1])
        if bias is None:
            continue
        prefix = matmul.name or matmul.output[0]
        w, w_s, w_zp, b = (
            g.add_init(f"{prefix}_{what}", array)
            for what, array in (
                ("weight", codes),
                ("weight_scale", w_scale),
                ("weight_zero_point", w_zero_point),
                ("bias", bias),
            )
        )
        fused_node = helper.make_node(
            "MatMulIntegerToFloat",
            [x_dq.input[0], w, x_dq.input[1], w_s, x_dq.input[2], w_zp, b],
            [add.output[0]],
            name=f"{prefix}_int8_bias",
            domain="com.microsoft",
        )
        graph.node.insert(list(graph.node).index(matmul), fused_node)
        graph.node.remove(matmul)
        graph.node.remove(add)
        fused += 1
    if fused:
        drop_dead_nodes(graph)
        g.drop_unused_inits()
        if not any(o.domain == "com.microsoft" for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return fused


def _is_dq(node, inits, weight: bool = False) -> bool:
    """A DequantizeLinear with constant qparams: per-tensor uint8 for an activation (what
    onnxruntime's own QDQ action accepts on x86); for a weight, of a 2-D 8-bit initializer."""
    if node is None or node.op_type != "DequantizeLinear" or len(node.input) < 3:
        return False
    scale = inits.get(node.input[1])
    if scale is None or node.input[2] not in inits:
        return False
    if not weight:  # uint8: onnxruntime runs s8 x s8 only on ARM; on x86 it is 3-4x slower
        zero_point = inits[node.input[2]]
        return int(np.prod(scale.dims)) == 1 and zero_point.data_type == onnx.TensorProto.UINT8
    data = inits.get(node.input[0])
    return data is not None and data.data_type in _INT8 and len(data.dims) == 2


def _weight(node, g: GraphIndex) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(codes [K, N], scale, zero point: per-tensor or per-column) of the MatMul's B input:
    DQ(int8 [K, N], axis 1), or Transpose(DQ(int8 [N, K], axis 0)) as the exporter writes a
    Linear's weight."""
    transposed = node is not None and node.op_type == "Transpose"
    if transposed:
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), [1, 0])
        node = g.producer.get(node.input[0]) if perm == [1, 0] else None
    if not _is_dq(node, g.inits, weight=True):
        return None
    codes, scale, zero_point = (g.const(name) for name in node.input[:3])
    axis = next((a.i for a in node.attribute if a.name == "axis"), 1) % 2
    if scale.size > 1 and (axis != (0 if transposed else 1) or scale.size != codes.shape[axis]):
        return None
    return (codes.T.copy() if transposed else codes), scale, zero_point


def _single_add(matmul, g: GraphIndex) -> onnx.NodeProto | None:
    users = g.consumers.get(matmul.output[0], [])
    graph_outputs = {o.name for o in g.graph.output}
    if len(users) != 1 or users[0].op_type != "Add" or matmul.output[0] in graph_outputs:
        return None
    return users[0]


def _bias(add, matmul, g: GraphIndex, columns: int) -> np.ndarray | None:
    """The Add's other input when it is a float constant of `columns` values on the last axis
    ([N], [1, N], [1, 1, N], ...)."""
    other = [name for name in add.input if name != matmul.output[0]]
    bias = g.const(other[0]) if len(other) == 1 else None
    if bias is None or bias.dtype != np.float32 or bias.ndim == 0:
        return None
    if not bias.size == bias.shape[-1] == columns:
        return None
    return bias.reshape(-1)
