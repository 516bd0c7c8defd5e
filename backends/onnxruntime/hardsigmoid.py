"""HardSigmoid between quantizers as the Add onnxruntime has an int8 kernel for.

onnxruntime has no int8 HardSigmoid, so DQ -> HardSigmoid -> Q runs in float. But
Q(clip(alpha * x + beta, 0, 1); s, zp) = Q(x + beta / alpha; s / alpha, zp) whenever the Q's
range lies inside [0, 1], which the clip then cannot narrow: with s' = s / alpha,
round((alpha x + beta) / s) = round((x + beta / alpha) / s'). onnxruntime runs
DQ(x) + DQ(constant) -> Q as a QLinearAdd, so the gate of a squeeze-excite block and the
HardSigmoid of a HardSwish (x * HardSigmoid(x), then QLinearMul) stay in 8 bits. The DQ after
that Q keeps its scale: the codes are the same.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from qat_deploy.deploy.export.passes import GraphIndex, drop_dead_nodes, uint8_qparams


def hardsigmoid_as_add(model: onnx.ModelProto) -> int:
    """Rewrite every DQ -> HardSigmoid -> Q whose Q is per-tensor uint8 with a range inside
    [0, 1] as DQ -> Add(DQ(beta / alpha)) -> Q(s / alpha); returns how many."""
    g = GraphIndex(model)
    graph = g.graph
    graph_outputs = {o.name for o in graph.output}
    done = 0
    for node in [n for n in graph.node if n.op_type == "HardSigmoid"]:
        alpha, beta = _attributes(node)
        x_dq = g.producer.get(node.input[0])
        users = g.consumers.get(node.output[0], [])
        if x_dq is None or x_dq.op_type != "DequantizeLinear" or len(users) != 1:
            continue
        quantize = users[0]
        qparams = _unit_range_qparams(quantize, g)
        if qparams is None or alpha <= 0 or beta <= 0 or node.output[0] in graph_outputs:
            continue
        scale, zero_point = qparams
        prefix = node.name or node.output[0]
        offset = np.float32(beta / alpha)
        names = [
            g.add_init(f"{prefix}_offset_code", np.array(255, np.uint8)),
            g.add_init(f"{prefix}_offset_scale", np.array(offset / 255, np.float32)),
            g.add_init(f"{prefix}_offset_zero_point", np.array(0, np.uint8)),
        ]
        constant = helper.make_node(
            "DequantizeLinear", names, [f"{prefix}_offset"], name=f"{prefix}_offset_dq"
        )
        add = helper.make_node(
            "Add", [node.input[0], f"{prefix}_offset"], [node.output[0]], name=f"{prefix}_as_add"
        )
        at = list(graph.node).index(node)
        graph.node.insert(at, add)
        graph.node.insert(at, constant)
        graph.node.remove(node)
        quantize.input[1] = g.add_init(
            f"{prefix}_q_scale", np.array(scale / np.float32(alpha), np.float32)
        )
        quantize.input[2] = g.add_init(f"{prefix}_q_zero_point", np.array(zero_point, np.uint8))
        done += 1
    if done:
        drop_dead_nodes(graph)
        g.drop_unused_inits()
    return done


def _attributes(node: onnx.NodeProto) -> tuple[float, float]:
    values = {a.name: a.f for a in node.attribute}
    return values.get("alpha", 0.2), values.get("beta", 0.5)


def _unit_range_qparams(node: onnx.NodeProto, g: GraphIndex) -> tuple[float, int] | None:
    """(scale, zero point) of a per-tensor uint8 QuantizeLinear whose range lies in [0, 1]."""
    qparams = uint8_qparams(node, g)
    if qparams is None:
        return None
    s, zp = qparams
    low, high = -zp * s, (255 - zp) * s
    if not (s > 0 and low >= 0 and high <= 1 + 1e-6):
        return None
    return s, zp
