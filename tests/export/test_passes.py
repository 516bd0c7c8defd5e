"""deploy/export/passes.py: drop_requantize_after_pass_through keeps what the model computes
(onnxruntime with plain Q/DQ semantics is the reference) and drops only identity requantizers."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from qat_deploy.deploy.export.passes import drop_requantize_after_pass_through


def _chain(scale_after: float, zero_point: int, zero_point_after: int) -> onnx.ModelProto:
    """x -> Q -> DQ -> Squeeze -> Reshape -> Q' -> DQ' -> Mul(2) -> y, Q' with its own qparams."""
    inits = [
        numpy_helper.from_array(np.array(0.05, np.float32), "s"),
        numpy_helper.from_array(np.array(zero_point, np.uint8), "z"),
        numpy_helper.from_array(np.array(scale_after, np.float32), "s2"),
        numpy_helper.from_array(np.array(zero_point_after, np.uint8), "z2"),
        numpy_helper.from_array(np.array([2, 3], np.int64), "axes"),
        numpy_helper.from_array(np.array([1, 1, 6], np.int64), "shape"),
        numpy_helper.from_array(np.array(2.0, np.float32), "two"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], "q"),
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], "dq"),
        helper.make_node("Squeeze", ["xd", "axes"], ["sq"], "squeeze"),
        helper.make_node("Reshape", ["sq", "shape"], ["rs"], "reshape"),
        helper.make_node("QuantizeLinear", ["rs", "s2", "z2"], ["rq"], "q2"),
        helper.make_node("DequantizeLinear", ["rq", "s2", "z2"], ["rd"], "dq2"),
        helper.make_node("Mul", ["rd", "two"], ["y"], "mul"),
    ]
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6, 1, 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 6])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), opts)
    return session.run(None, {"x": x})[0]


def _quantizers(model: onnx.ModelProto) -> list[str]:
    return [n.name for n in model.graph.node if n.op_type == "QuantizeLinear"]


def test_an_identity_requantizer_after_reshapes_is_dropped_and_values_are_unchanged():
    model = _chain(0.05, zero_point=120, zero_point_after=120)
    x = np.random.default_rng(0).normal(0, 3, (1, 6, 1, 1)).astype(np.float32)  # some clip
    before = _run(model, x)
    assert drop_requantize_after_pass_through(model) == 1
    onnx.checker.check_model(model)
    assert _quantizers(model) == ["q"]
    np.testing.assert_array_equal(_run(model, x), before)


def test_requantizers_that_change_values_or_that_openvino_merges_stay():
    """Another scale or zero point changes values; zero point 0 the CPU plugin merges into
    the reader itself, so the pass leaves it."""
    for scale, zero_point, zero_point_after in ((0.1, 120, 120), (0.05, 120, 110), (0.05, 0, 0)):
        model = _chain(scale, zero_point, zero_point_after)
        assert drop_requantize_after_pass_through(model) == 0
        assert _quantizers(model) == ["q", "q2"]
