"""deploy/export/passes.py: drop_requantize_after_pass_through, fold_pad_into_conv,
fold_quantized_constants, average_pool_floor_mode and relu_as_max_after_concat keep what the
model computes (onnxruntime with plain Q/DQ semantics is the reference) and rewrite only where
that holds."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from qat_deploy.deploy.export.passes import (
    average_pool_floor_mode,
    drop_requantize_after_pass_through,
    fold_pad_into_conv,
    fold_quantized_constants,
    relu_as_max_after_concat,
)


def _model(nodes, inits, *, x_shape: list[int], y_shape: list[int]) -> onnx.ModelProto:
    """A float32 graph x -> nodes -> y, opset 21."""
    graph = helper.make_graph(
        nodes,
        "passes",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


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
    return _model(nodes, inits, x_shape=[1, 6, 1, 1], y_shape=[1, 1, 6])


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), opts)
    return session.run(None, {"x": x})[0]


def _rewrites_keeping_values(model: onnx.ModelProto, rewrite, x: np.ndarray) -> int:
    """Apply `rewrite`; the result must be a valid model computing bit-identical outputs on x.
    Returns the rewrite's count."""
    before = _run(model, x)
    count = rewrite(model)
    onnx.checker.check_model(model, full_check=True)
    np.testing.assert_array_equal(_run(model, x), before)
    return count


def _quantizers(model: onnx.ModelProto) -> list[str]:
    return [n.name for n in model.graph.node if n.op_type == "QuantizeLinear"]


def test_an_identity_requantizer_after_reshapes_is_dropped_and_values_are_unchanged():
    model = _chain(0.05, zero_point=120, zero_point_after=120)
    x = np.random.default_rng(0).normal(0, 3, (1, 6, 1, 1)).astype(np.float32)  # some clip
    assert _rewrites_keeping_values(model, drop_requantize_after_pass_through, x) == 1
    assert _quantizers(model) == ["q"]


def test_requantizers_that_change_values_or_that_openvino_merges_stay():
    """Another scale or zero point changes values; zero point 0 the CPU plugin merges into
    the reader itself, so the pass leaves it."""
    for scale, zero_point, zero_point_after in ((0.1, 120, 120), (0.05, 120, 110), (0.05, 0, 0)):
        model = _chain(scale, zero_point, zero_point_after)
        assert drop_requantize_after_pass_through(model) == 0
        assert _quantizers(model) == ["q", "q2"]


def _padded_convs(
    *,
    mode: str = "constant",
    value: float = 0.0,
    widths: tuple[int, ...] = (0, 0, 0, 0, 0, 0, 1, 1),
    conv_attrs: dict | None = None,
) -> onnx.ModelProto:
    """x -> Pad -> Q -> DQ -> two 3x3 stride-2 Convs -> Add -> y, as timm's
    "same" padding exports; uint8 quantizer with a nonzero zero point."""
    rng = np.random.default_rng(1)
    inits = [
        numpy_helper.from_array(np.array(widths, np.int64), "widths"),
        numpy_helper.from_array(np.array(value, np.float32), "value"),
        numpy_helper.from_array(np.array(0.04, np.float32), "s"),
        numpy_helper.from_array(np.array(100, np.uint8), "z"),
        numpy_helper.from_array(rng.normal(0, 1, (4, 3, 3, 3)).astype(np.float32), "w3"),
        numpy_helper.from_array(rng.normal(0, 1, (4, 3, 3, 3)).astype(np.float32), "w3b"),
    ]
    if conv_attrs is None:
        conv_attrs = {"pads": [1, 0, 0, 1]}  # begins and ends of its own as well
    nodes = [
        helper.make_node("Pad", ["x", "widths", "value"], ["p"], "pad", mode=mode),
        helper.make_node("QuantizeLinear", ["p", "s", "z"], ["pq"], "q"),
        helper.make_node("DequantizeLinear", ["pq", "s", "z"], ["pd"], "dq"),
        helper.make_node("Conv", ["pd", "w3"], ["a"], "conv3", strides=[2, 2], **conv_attrs),
        helper.make_node("Conv", ["pd", "w3b"], ["b"], "conv3b", strides=[2, 2], **conv_attrs),
        helper.make_node("Add", ["a", "b"], ["y"], "add"),
    ]
    return _model(nodes, inits, x_shape=[1, 3, 8, 8], y_shape=[1, 4, 4, 4])


def _op_types(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def test_zero_padding_before_a_quantized_conv_moves_into_its_pads_and_values_are_unchanged():
    model = _padded_convs()
    x = np.random.default_rng(0).normal(0, 2, (1, 3, 8, 8)).astype(np.float32)
    before = _run(model, x)
    assert fold_pad_into_conv(model) == 1
    onnx.checker.check_model(model, full_check=True)
    assert "Pad" not in _op_types(model)
    q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear")
    assert q.input[0] == "x"
    np.testing.assert_allclose(_run(model, x), before, rtol=1e-5, atol=1e-4)


def test_padding_a_conv_cannot_take_stays():
    """Reflect and nonzero padding, channel padding (begins and ends), cropping and auto_pad
    each change what a Conv's own zero padding computes."""
    cases = [
        {"mode": "reflect"},
        {"value": 0.5},
        {"widths": (0, 1, 0, 0, 0, 0, 1, 1)},
        {"widths": (0, 0, 0, 0, 0, 1, 1, 1)},
        {"widths": (0, 0, 0, 0, 0, 0, -1, 1)},
        {"conv_attrs": {"auto_pad": "SAME_UPPER"}},
    ]
    for case in cases:
        model = _padded_convs(**case)
        assert fold_pad_into_conv(model) == 0, case
        assert "Pad" in _op_types(model)


def test_padding_something_else_also_reads_stays():
    model = _padded_convs()
    model.graph.node.append(helper.make_node("Relu", ["pd"], ["r"], "relu"))
    model.graph.output.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, None))
    assert fold_pad_into_conv(model) == 0


def _position_branch() -> onnx.ModelProto:
    """y = Conv(x) + Conv(Q/DQ(Sin(grid))): an input-independent branch beside an input-
    dependent one, both Convs with int8 weights."""
    rng = np.random.default_rng(2)
    inits = [
        numpy_helper.from_array(rng.uniform(0, 6, (1, 4, 5, 5)).astype(np.float32), "grid"),
        numpy_helper.from_array(np.array(1 / 127, np.float32), "s"),
        numpy_helper.from_array(np.array(0, np.int8), "z"),
    ]
    for name in ("wp", "wx"):
        inits += [
            numpy_helper.from_array(rng.integers(-127, 128, (3, 4, 1, 1)).astype(np.int8), name),
            numpy_helper.from_array(rng.uniform(0.01, 0.02, 3).astype(np.float32), f"{name}_s"),
            numpy_helper.from_array(np.zeros(3, np.int8), f"{name}_z"),
        ]
    nodes = [
        helper.make_node("Sin", ["grid"], ["pos"], "sin"),
        helper.make_node("QuantizeLinear", ["pos", "s", "z"], ["pq"], "q_pos"),
        helper.make_node("DequantizeLinear", ["pq", "s", "z"], ["pd"], "dq_pos"),
        *(
            helper.make_node("DequantizeLinear", [w, f"{w}_s", f"{w}_z"], [f"{w}_d"], axis=0)
            for w in ("wp", "wx")
        ),
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], "q_x"),
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], "dq_x"),
        helper.make_node("Conv", ["pd", "wp_d"], ["p"], "conv_pos"),
        helper.make_node("Conv", ["xd", "wx_d"], ["c"], "conv_x"),
        helper.make_node("Add", ["c", "p"], ["y"], "add"),
    ]
    return _model(nodes, inits, x_shape=[1, 4, 5, 5], y_shape=[1, 3, 5, 5])


def test_an_input_independent_branch_becomes_its_value_and_input_dependent_weights_stay_int8():
    model = _position_branch()
    x = np.random.default_rng(0).normal(0, 0.5, (1, 4, 5, 5)).astype(np.float32)
    before = _run(model, x)
    assert fold_quantized_constants(model) == 1
    onnx.checker.check_model(model, full_check=True)
    assert sorted(_op_types(model)) == sorted(
        ["QuantizeLinear", "DequantizeLinear", "DequantizeLinear", "Conv", "Add"]
    )
    weights = {t.name: t.data_type for t in model.graph.initializer}
    assert weights["wx"] == TensorProto.INT8 and "wp" not in weights and "grid" not in weights
    np.testing.assert_allclose(_run(model, x), before, rtol=1e-6, atol=1e-6)


def test_a_graph_without_constant_branches_is_left_alone():
    model = _padded_convs()
    assert fold_quantized_constants(model) == 0
    assert "Pad" in _op_types(model)


def test_a_constant_node_beside_the_branch_is_read_not_indexed():
    """Constant nodes have no inputs; the walk must not read one as a quantizer's input."""
    model = _position_branch()
    grid = next(t for t in model.graph.initializer if t.name == "grid")
    model.graph.initializer.remove(grid)
    model.graph.node.insert(0, helper.make_node("Constant", [], ["grid"], value=grid))
    x = np.random.default_rng(0).normal(0, 0.5, (1, 4, 5, 5)).astype(np.float32)
    before = _run(model, x)
    assert fold_quantized_constants(model) == 1
    assert "Constant" not in _op_types(model) and "Sin" not in _op_types(model)
    np.testing.assert_allclose(_run(model, x), before, rtol=1e-6, atol=1e-6)


def _pool(
    size: int | str, *, kernel: int = 2, auto_pad: str = "NOTSET", **attrs
) -> onnx.ModelProto:
    """x [1, 3, size, size] -> AveragePool(stride 2, ceil_mode=1, count_include_pad=0) -> y."""
    pool = helper.make_node(
        "AveragePool",
        ["x"],
        ["y"],
        "pool",
        kernel_shape=[kernel, kernel],
        strides=[2, 2],
        ceil_mode=1,
        count_include_pad=0,
        auto_pad=auto_pad,
        **attrs,
    )
    return _model([pool], [], x_shape=[1, 3, size, size], y_shape=[1, 3, None, None])


def _ceil_mode(model: onnx.ModelProto) -> int:
    pool = next(n for n in model.graph.node if n.op_type == "AveragePool")
    return next(a.i for a in pool.attribute if a.name == "ceil_mode")


def test_a_ceil_mode_pool_whose_windows_all_fit_loses_the_flag_and_values_are_unchanged():
    """Even sizes (ResNet-D's 2x2 shortcut pool), and odd ones where a 3x3 kernel or the
    padding makes the windows fit."""
    for size, kernel, attrs in ((8, 2, {}), (9, 3, {}), (7, 2, {"pads": [1, 1, 0, 0]})):
        model = _pool(size, kernel=kernel, **attrs)
        x = np.random.default_rng(0).normal(0, 2, (1, 3, size, size)).astype(np.float32)
        assert _rewrites_keeping_values(model, average_pool_floor_mode, x) == 1, (size, kernel)
        assert _ceil_mode(model) == 0


def test_a_pool_whose_last_window_ceil_mode_adds_or_an_unknown_size_stays():
    """An odd size under a 2x2 kernel has a partial last window (ceil mode's extra output),
    a symbolic size and auto_pad are not worked out."""
    for model in (_pool(7), _pool("h"), _pool(8, auto_pad="SAME_UPPER")):
        assert average_pool_floor_mode(model) == 0
        assert _ceil_mode(model) == 1
    partial = _pool(7)
    assert _run(partial, np.ones((1, 3, 7, 7), np.float32)).shape == (1, 3, 4, 4)


def _concat_bn_relu(
    *,
    first_input_quantized: bool = True,
    relu_read_by: str = "QuantizeLinear",
    negative_scale: bool = False,
    batch: int | str = 1,
) -> onnx.ModelProto:
    """x [batch, 4, 5, 5] -> two Q -> DQ copies (the first optionally float) -> Concat ->
    random BatchNormalization (positive scales, or one negative) -> Relu -> Q -> DQ -> y (or
    Relu -> `relu_read_by` -> y)."""
    rng = np.random.default_rng(0)
    scale = rng.uniform(0.2, 2, 8)
    if negative_scale:
        scale[3] = -scale[3]
    bn = [scale, rng.normal(0, 1, 8), rng.normal(0, 1, 8), rng.uniform(0.5, 2, 8)]
    inits = [
        numpy_helper.from_array(np.array(0.05, np.float32), "s"),
        numpy_helper.from_array(np.array(128, np.uint8), "z"),
        numpy_helper.from_array(np.array(0.02, np.float32), "s_out"),
        numpy_helper.from_array(np.array(0, np.uint8), "z_out"),
        *(
            numpy_helper.from_array(v.astype(np.float32), n)
            for v, n in zip(bn, "gbmv", strict=True)
        ),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], "q"),
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], "dq"),
        helper.make_node("Neg", ["xd"], ["neg"], "neg"),
        helper.make_node("QuantizeLinear", ["neg", "s", "z"], ["nq"], "q_neg"),
        helper.make_node("DequantizeLinear", ["nq", "s", "z"], ["nd"], "dq_neg"),
        helper.make_node("Concat", ["xd" if first_input_quantized else "x", "nd"], ["c"], axis=1),
        helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["bn"], "bn"),
        helper.make_node("Relu", ["bn"], ["r"], "relu"),
    ]
    if relu_read_by == "QuantizeLinear":
        nodes += [
            helper.make_node("QuantizeLinear", ["r", "s_out", "z_out"], ["rq"], "q_out"),
            helper.make_node("DequantizeLinear", ["rq", "s_out", "z_out"], ["y"], "dq_out"),
        ]
    else:
        nodes.append(helper.make_node(relu_read_by, ["r"], ["y"], "reader"))
    return _model(nodes, inits, x_shape=[batch, 4, 5, 5], y_shape=[batch, 8, 5, 5])


def test_a_relu_between_a_quantized_concats_affine_ops_and_a_quantizer_becomes_max_exactly():
    """DenseNet's Concat -> BatchNorm -> ReLU -> Q: Max(x, 0) computes the same codes."""
    model = _concat_bn_relu()
    x = np.random.default_rng(1).normal(0, 2, (1, 4, 5, 5)).astype(np.float32)
    y = _run(model, x)
    assert (y > 0).any() and (y == 0).any()  # the floor at 0 is exercised
    assert _rewrites_keeping_values(model, relu_as_max_after_concat, x) == 1
    assert "Relu" not in _op_types(model) and "Max" in _op_types(model)


def test_relus_off_that_path_stay():
    """A float Concat input, a Relu read by something other than a quantizer, a Relu right
    after a Concat (no affine op for OpenVINO to fold), a BN scale below 0 and a dynamic batch
    (OpenVINO folds without splitting there) are left alone."""
    no_affine = _concat_bn_relu()
    bn = next(n for n in no_affine.graph.node if n.op_type == "BatchNormalization")
    relu = next(n for n in no_affine.graph.node if n.op_type == "Relu")
    relu.input[0] = bn.input[0]
    no_affine.graph.node.remove(bn)
    for model in (
        _concat_bn_relu(first_input_quantized=False),
        _concat_bn_relu(relu_read_by="Neg"),
        no_affine,
        _concat_bn_relu(negative_scale=True),
        _concat_bn_relu(batch="n"),
    ):
        assert relu_as_max_after_concat(model) == 0
        assert "Relu" in _op_types(model) and "Max" not in _op_types(model)
