"""deploy lint: each rule on a hand-built graph that breaks exactly that rule and on its fixed
twin; onnxruntime's own quantizer output; the CLI's exit codes.

Expected violations are written from the backends' rules (backends/<name>/rules.py), never
copied from the linter's output.
"""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from qat_deploy.deploy.app.cli import app
from qat_deploy.deploy.common import errors
from qat_deploy.deploy.lint import lint
from qat_deploy.deploy.quant.spec import INT8_SYM_ACT, INT8_WEIGHT
from qat_deploy.deploy.rules.backend import BackendRules, OpRule, available_targets

TARGETS = available_targets()
AFFINE_TARGETS = ("onnxruntime", "openvino")
C = 4  # channels of the test graphs' input x: [1, C, 8, 8]

#: Activation integer type and zero point each backend's rules ask for.
ACTIVATIONS = {
    "tensorrt": (np.int8, 0),  # INT8_SYM_ACT
    "onnxruntime": (np.uint8, 128),  # UINT8_AFFINE_ACT
    "openvino": (np.uint8, 128),
}


class Net:
    """Builds a small ONNX graph by hand; every node is named after its output."""

    def __init__(self, target: str = "tensorrt") -> None:
        self.dtype, self.zero_point = ACTIVATIONS[target]
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def const(self, name: str, value) -> str:
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], name: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op_type, inputs, [name], name=name, **attrs))
        return name

    def qdq(self, x: str, name: str | None = None, scale=0.05, dtype=None, zero_point=None) -> str:
        """Activation Q->DQ with the target's scheme unless told otherwise; the Q is `name`."""
        name = name or f"q_{x}"
        dtype = dtype or self.dtype
        zero_point = self.zero_point if zero_point is None else zero_point
        s = self.const(f"{name}.scale", np.asarray(scale, np.float32))
        z = self.const(f"{name}.zp", np.full(np.shape(scale), zero_point, dtype))
        attrs = {"axis": 1} if np.ndim(scale) else {}
        q = self.op("QuantizeLinear", [x, s, z], name, **attrs)
        return self.op("DequantizeLinear", [q, s, z], f"{name}.dq", **attrs)

    def weight(self, name: str, shape: tuple[int, ...], axis: int | None = 0) -> str:
        """An int8 symmetric weight initializer behind a DequantizeLinear named `name`.dq."""
        w = self.const(name, np.ones(shape, np.int8))
        count = () if axis is None else (shape[axis],)
        s = self.const(f"{name}.scale", np.full(count, 0.01, np.float32))
        z = self.const(f"{name}.zp", np.zeros(count, np.int8))
        attrs = {} if axis is None else {"axis": axis}
        return self.op("DequantizeLinear", [w, s, z], f"{name}.dq", **attrs)

    def conv(self, x: str, name: str, weight_axis: int | None = 0, bias: str = "") -> str:
        w = self.weight(f"{name}.w", (C, C, 3, 3), weight_axis)
        return self.op("Conv", [x, w, bias] if bias else [x, w], name, pads=[1, 1, 1, 1])

    def model(self, *outputs: str, opset: int = 18) -> onnx.ModelProto:
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C, 8, 8])
        outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs]
        graph = helper.make_graph(self.nodes, "lint_test", [x], outs, self.initializers)
        return checked(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]))


def checked(model: onnx.ModelProto) -> onnx.ModelProto:
    """Strict shape inference (fills in the outputs' shapes) and the checker: every test graph
    is a valid ONNX model, so the linter is not judged on malformed input."""
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model)
    return model


def found(model: onnx.ModelProto, target) -> list[tuple[str, str]]:
    return [(v.rule, v.node) for v in lint(model, target)]


def clean_conv(target: str, opset: int = 18, weight_axis: int | None = 0) -> onnx.ModelProto:
    net = Net(target)
    net.op("Relu", [net.conv(net.qdq("x", "q_in"), "conv", weight_axis)], "relu")
    return net.model("relu", opset=opset)


def residual(target: str, *, conv_qdq: bool, skip_quantized: bool = True) -> onnx.ModelProto:
    """conv1 -> relu -> conv2 -> add(conv2, relu): TensorRT style without Q/DQ on conv2's
    output, onnxruntime/OpenVINO style (conv_qdq) with it."""
    net = Net(target)
    relu = net.op("Relu", [net.conv(net.qdq("x", "q_in"), "conv1")], "relu")
    relu_q = net.qdq(relu, "q_relu")
    conv2 = net.conv(relu_q, "conv2")
    main = net.qdq(conv2, "q_conv2") if conv_qdq else conv2
    net.op("Add", [main, relu_q if skip_quantized else relu], "add")
    return net.model("add")


# -- clean models --------------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_clean_qdq_conv_has_no_violations(target):
    assert found(clean_conv(target), target) == []


@pytest.mark.parametrize(
    "target, conv_qdq", [("tensorrt", False), ("onnxruntime", True), ("openvino", True)]
)
def test_residual_block_in_the_targets_style_is_clean(target, conv_qdq):
    assert found(residual(target, conv_qdq=conv_qdq), target) == []


# -- zero-point, dtype, per-channel-activation ---------------------------------------------------


def input_conv(target: str, **qdq) -> onnx.ModelProto:
    """x -> Q/DQ `q_in` (the target's scheme, unless `qdq` overrides it) -> Conv."""
    net = Net(target)
    net.conv(net.qdq("x", "q_in", **qdq), "conv")
    return net.model("conv")


def test_nonzero_zero_point_is_rejected_by_tensorrt():
    assert found(input_conv("tensorrt", zero_point=3), "tensorrt") == [("zero-point", "q_in")]
    assert found(input_conv("tensorrt", zero_point=0), "tensorrt") == []


@pytest.mark.parametrize("target", AFFINE_TARGETS)
def test_affine_backends_accept_nonzero_activation_zero_point(target):
    assert found(input_conv(target, zero_point=3), target) == []


def test_uint8_activation_is_rejected_by_tensorrt():
    uint8 = input_conv("tensorrt", dtype=np.uint8, zero_point=0)
    assert found(uint8, "tensorrt") == [("dtype", "q_in")]
    assert found(input_conv("tensorrt", dtype=np.int8), "tensorrt") == []


def conv_with_bias(target: str, int32: bool) -> onnx.ModelProto:
    """onnxruntime's tool quantizes Conv biases to int32 behind a DequantizeLinear."""
    net = Net(target)
    if int32:
        bias = net.const("bias", np.zeros(C, np.int32))
        scale = net.const("bias.scale", np.full(C, 5e-4, np.float32))
        zero = net.const("bias.zp", np.zeros(C, np.int32))
        bias = net.op("DequantizeLinear", [bias, scale, zero], "bias_dq", axis=0)
    else:
        bias = net.const("bias", np.zeros(C, np.float32))
    net.conv(net.qdq("x", "q_in"), "conv", bias=bias)
    return net.model("conv")


def test_int32_bias_dequantize_is_rejected_by_tensorrt():
    assert found(conv_with_bias("tensorrt", int32=True), "tensorrt") == [("dtype", "bias_dq")]
    assert found(conv_with_bias("tensorrt", int32=False), "tensorrt") == []


@pytest.mark.parametrize("target", AFFINE_TARGETS)
def test_affine_backends_accept_int32_bias(target):
    assert found(conv_with_bias(target, int32=True), target) == []


def input_conv_add(target: str, **qdq) -> onnx.ModelProto:
    """x -> Q/DQ `q_in` (as input_conv) -> Conv -> Q/DQ -> Add, which reads x too."""
    net = Net(target)
    x = net.qdq("x", "q_in", **qdq)
    net.op("Add", [net.qdq(net.conv(x, "conv"), "q_conv"), x], "add")
    return net.model("add")


@pytest.mark.parametrize("target", AFFINE_TARGETS)
def test_signed_activation_is_flagged_but_int8_weights_are_not(target):
    signed = input_conv_add(target, dtype=np.int8, zero_point=0)
    assert found(signed, target) == [("dtype", "q_in")]
    assert found(input_conv_add(target, dtype=np.uint8, zero_point=128), target) == []


@pytest.mark.parametrize("target", AFFINE_TARGETS)
def test_a_value_only_convs_read_may_be_signed_on_openvino_alone(target):
    """OpenVINO's zero_point_free_readers name Conv: there the input of a lone Conv may be
    int8 with zero point 0 or uint8; onnxruntime's rules keep it uint8."""
    signed = found(input_conv(target, dtype=np.int8, zero_point=0), target)
    assert signed == ([] if target == "openvino" else [("dtype", "q_in")])
    assert found(input_conv(target, dtype=np.uint8, zero_point=128), target) == []


@pytest.mark.parametrize("target", TARGETS)
def test_per_channel_activation_is_flagged(target):
    per_channel = input_conv(target, scale=[0.05] * C)
    assert found(per_channel, target) == [("per-channel-activation", "q_in")]
    assert found(input_conv(target, scale=0.05), target) == []


# -- weight-axis -------------------------------------------------------------------------------


def weighted(target: str, layer: str, axis: int) -> onnx.ModelProto:
    """One weighted op whose weight DequantizeLinear `layer.w.dq` is per-channel on `axis`."""
    net = Net(target)
    x = net.qdq("x", "q_in")
    k, n = C * 64, 3  # flattened input features, output features
    if layer == "Conv":
        out = net.conv(x, "layer", weight_axis=axis)
    elif layer == "ConvTranspose":  # weight [in, out, kh, kw]
        out = net.op("ConvTranspose", [x, net.weight("layer.w", (C, 2, 3, 3), axis)], "layer")
    else:
        flat = net.op("Flatten", [x], "flat")
        if layer == "Gemm(transB=1)":  # weight [out, in], as torch's Linear
            out = net.op("Gemm", [flat, net.weight("layer.w", (n, k), axis)], "layer", transB=1)
        elif layer == "Gemm(transB=0)":  # weight [in, out]
            out = net.op("Gemm", [flat, net.weight("layer.w", (k, n), axis)], "layer")
        elif layer == "MatMul":  # weight [K, N]
            out = net.op("MatMul", [flat, net.weight("layer.w", (k, n), axis)], "layer")
        else:  # "Transpose->MatMul": torch's [out, in] weight transposed in the graph
            w = net.op("Transpose", [net.weight("layer.w", (n, k), axis)], "w_t", perm=[1, 0])
            out = net.op("MatMul", [flat, w], "layer")
    return net.model(out)


#: (layer, output-channel axis of its weight DequantizeLinear, some other axis)
WEIGHT_AXES = [
    ("Conv", 0, 1),
    ("ConvTranspose", 1, 0),
    ("Gemm(transB=1)", 0, 1),
    ("Gemm(transB=0)", 1, 0),
    ("MatMul", 1, 0),
    ("Transpose->MatMul", 0, 1),
]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("layer, good, bad", WEIGHT_AXES)
def test_weight_axis_must_be_the_output_channels(target, layer, good, bad):
    assert found(weighted(target, layer, bad), target) == [("weight-axis", "layer.w.dq")]
    assert found(weighted(target, layer, good), target) == []


# -- qoperator, opset ------------------------------------------------------------------------------


def qlinear_conv() -> onnx.ModelProto:
    """The QOperator form of a quantized Conv: integer tensors in and out, no Q/DQ."""
    init = [
        numpy_helper.from_array(np.asarray(v), name)
        for name, v in [
            ("xs", np.float32(0.05)),
            ("xz", np.int8(0)),
            ("w", np.ones((C, C, 3, 3), np.int8)),
            ("ws", np.float32(0.01)),
            ("wz", np.int8(0)),
            ("ys", np.float32(0.1)),
            ("yz", np.int8(0)),
        ]
    ]
    node = helper.make_node(
        "QLinearConv", ["xq", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["yq"], name="qconv"
    )
    graph = helper.make_graph(
        [node],
        "qoperator",
        [helper.make_tensor_value_info("xq", TensorProto.INT8, [1, C, 8, 8])],
        [helper.make_tensor_value_info("yq", TensorProto.INT8, None)],
        init,
    )
    return checked(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))


def test_qoperator_ops_are_rejected_by_tensorrt():
    assert found(qlinear_conv(), "tensorrt") == [("qoperator", "qconv")]


@pytest.mark.parametrize("target", AFFINE_TARGETS)
def test_qoperator_ops_pass_affine_backends(target):
    assert found(qlinear_conv(), target) == []


@pytest.mark.parametrize("target", TARGETS)
def test_opset_below_13_cannot_carry_per_channel_weights(target):
    assert found(clean_conv(target, opset=12, weight_axis=None), target) == [("opset", "")]
    assert found(clean_conv(target, opset=13, weight_axis=None), target) == []


# -- residual Adds (TensorRT: Inputs.SKIP_BRANCH) ----------------------------------------------


def test_qdq_between_conv_and_residual_add_breaks_tensorrt_fusion():
    model = residual("tensorrt", conv_qdq=True)
    assert found(model, "tensorrt") == [("qdq-breaks-fusion", "q_conv2")]


def test_a_quantized_conv_output_that_other_ops_read_is_no_broken_fusion():
    """ConvNeXt's downsampling Conv feeds the next block's Conv and that block's residual Add
    through one Q/DQ: the Conv has two readers, so TensorRT could not fuse it into the Add."""
    net = Net("tensorrt")
    conv = net.conv(net.qdq("x", "q_in"), "down")
    shared = net.qdq(conv, "q_down")
    branch = net.op("Relu", [net.conv(shared, "dw")], "relu")
    net.op("Add", [net.qdq(branch, "q_branch"), shared], "add")
    assert found(net.model("add"), "tensorrt") == []


def test_unquantized_skip_branch_is_flagged_for_tensorrt():
    model = residual("tensorrt", conv_qdq=False, skip_quantized=False)
    assert found(model, "tensorrt") == [("unquantized-skip", "add")]


@pytest.mark.parametrize("target", AFFINE_TARGETS)
def test_affine_backends_want_both_residual_inputs_quantized(target):
    """Their rules quantize every Add input (Inputs.ALL), so the TensorRT layout misses one
    (which onnxruntime also reports as a Conv writing float, see unquantized-output)."""
    output = [("unquantized-output", "conv2")] if target == "onnxruntime" else []
    assert found(residual(target, conv_qdq=False), target) == [
        ("unquantized-input", "add"),
        *output,
    ]
    unquantized_skip = residual(target, conv_qdq=True, skip_quantized=False)
    output = [("unquantized-output", "conv1")] if target == "onnxruntime" else []
    assert found(unquantized_skip, target) == [("unquantized-input", "add"), *output]


# -- unquantized-output ---------------------------------------------------------------------------


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("target", TARGETS)
def test_onnxruntime_wants_every_conv_output_quantized(target, quantized):
    """QLinearConv writes a Q: a Conv whose output (after its ReLU) a float op reads runs in
    float on onnxruntime. A Conv the graph returns is exempt (clean_conv)."""
    net = Net(target)
    relu = net.op("Relu", [net.conv(net.qdq("x", "q_in"), "conv")], "relu")
    net.op("HardSwish", [net.qdq(relu, "q_relu") if quantized else relu], "act")
    expected = [("unquantized-output", "conv")] if target == "onnxruntime" and not quantized else []
    assert found(net.model("act"), target) == expected


# -- unquantized-input ----------------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_conv_with_float_input_is_flagged(target):
    net = Net(target)
    net.conv("x", "conv")
    assert found(net.model("conv"), target) == [("unquantized-input", "conv")]


@pytest.mark.parametrize("target", TARGETS)
def test_conv_with_float_weight_is_flagged(target):
    net = Net(target)
    w = net.const("w", np.ones((C, C, 3, 3), np.float32))
    net.op("Conv", [net.qdq("x", "q_in"), w], "conv")
    violations = lint(net.model("conv"), target)
    assert [(v.rule, v.node) for v in violations] == [("unquantized-input", "conv")]
    assert "weight" in violations[0].message


@pytest.mark.parametrize("target", TARGETS)
def test_quantization_passes_through_maxpool_but_not_relu(target):
    for op, expected in [("MaxPool", []), ("Relu", [("unquantized-input", "conv")])]:
        net = Net(target)
        attrs = {"kernel_shape": [2, 2]} if op == "MaxPool" else {}
        net.conv(net.op(op, [net.qdq("x", "q_in")], "between", **attrs), "conv")
        assert found(net.model("conv"), target) == expected, op


@pytest.mark.parametrize("target", AFFINE_TARGETS)
@pytest.mark.parametrize("op", ["Add", "Mul"])
def test_binary_op_needs_both_runtime_inputs_quantized(target, op):
    for first, second, expected in [
        ("x_q", "relu", [("unquantized-input", "out")]),
        ("x_q", "relu_q", []),
        ("x", "const", []),  # float x times a constant: nothing to requantize
    ]:
        net = Net(target)
        relu = net.op("Relu", ["x"], "relu")
        inputs = {
            "x": "x",
            "x_q": net.qdq("x", "q_in"),
            "relu": relu,
            "relu_q": net.qdq(relu),
            "const": net.const("c", np.float32(2)),
        }
        net.op(op, [inputs[first], inputs[second]], "out")
        assert found(net.model("out"), target) == expected, (first, second)


@pytest.mark.parametrize("target", TARGETS)
def test_matmul_with_weight_checks_only_its_data_input(target):
    for quantize_input, expected in [(False, [("unquantized-input", "mm")]), (True, [])]:
        net = Net(target)
        flat = net.op("Flatten", [net.qdq("x", "q_in") if quantize_input else "x"], "flat")
        net.op("MatMul", [flat, net.weight("w", (C * 64, 3), axis=1)], "mm")
        assert found(net.model("mm"), target) == expected


@pytest.mark.parametrize("target", TARGETS)
def test_matmul_of_two_activations_needs_both_quantized(target):
    net = Net(target)
    flat = net.op("Flatten", ["x"], "flat")
    other = net.op("Transpose", [net.op("Relu", [flat], "relu")], "t", perm=[1, 0])
    net.op("MatMul", [net.qdq(flat), other], "mm")
    assert found(net.model("mm"), target) == [("unquantized-input", "mm")]


def attention_tail(net: Net, x: str) -> str:
    """softmax(x x^T) x on the flattened x: attention, which makes a graph a transformer."""
    flat = net.op("Flatten", [x], "flat")
    q = net.qdq(flat, "q_attn", dtype=np.int8, zero_point=0)
    kt = net.op("Transpose", [q], "kt", perm=[1, 0])
    probs = net.op("Softmax", [net.op("MatMul", [q, kt], "scores")], "probs")
    return net.op("MatMul", [net.qdq(probs, "q_probs", dtype=np.int8, zero_point=0), q], "ctx")


def two_conv_add(target: str, marker: str, same_input: bool = False) -> onnx.ModelProto:
    """Add of two float Conv outputs (of x and ReLU(x), or both of x: a parallel-branch sum),
    then `marker`: attention flips to transformer rules; a Softmax alone (a classifier head)
    or a LayerNorm (ConvNeXt) keeps CNN rules, as in prepare (deploy.rules.ops.is_transformer)."""
    net = Net(target)
    x = net.qdq("x", "q_in")
    other = x if same_input else net.qdq(net.op("Relu", ["x"], "relu"), "q_relu")
    add = net.op("Add", [net.conv(x, "conv_a"), net.conv(other, "conv_b")], "add")
    if marker == "attention":
        return net.model(attention_tail(net, add))
    if marker == "LayerNormalization":
        scale = net.const("ln_scale", np.ones(8, np.float32))
        net.op(marker, [add, scale], "out", axis=-1)
    else:
        net.op(marker, [add], "out")
    return net.model("out")


@pytest.mark.parametrize("target", AFFINE_TARGETS)
def test_transformer_rules_leave_residual_add_float(target):
    """Both affine backends quantize Add inputs in CNNs but keep Add float in a transformer's
    token stream; Identity is pass-through, so the Add is the only op the CNN rules select.
    An Add of two Conv outputs is part of a conv stage even in a transformer (a hybrid's
    MobileNet block, deploy.rules.backend.conv_stage): CNN rules there."""
    cnn = found(two_conv_add(target, "Identity"), target)
    inputs = [v for v in cnn if v[0] == "unquantized-input"]
    assert inputs == [("unquantized-input", "add"), ("unquantized-input", "add")]
    for marker in ("Softmax", "LayerNormalization", "attention"):
        assert found(two_conv_add(target, marker), target).count(("unquantized-input", "add")) == 2
    net = Net(target)  # a ViT: patch embedding Conv -> tokens -> attention -> residual Add
    tokens = net.op("Flatten", [net.conv(net.qdq("x", "q_in"), "patch")], "tokens")
    q = net.qdq(tokens, "q_tokens", dtype=np.int8, zero_point=0)
    projected = net.op("MatMul", [q, net.weight("w", (C * 64, C * 64), axis=1)], "proj")
    net.op("Add", [tokens, attention_tail(net, projected)], "residual")
    assert ("unquantized-input", "residual") not in found(net.model("residual"), target)


@pytest.mark.parametrize("target", ["tensorrt", "openvino", "onnxruntime"])
def test_a_sum_of_parallel_branches_stays_float_where_the_rules_say(target):
    """Conv_a(x) + Conv_b(x) sums branches of one value (RepVGG): every backend's rules
    (float_branch_sums) leave it float, TensorRT's residual rule included; Conv_a(x) +
    Conv_b(ReLU(x)) is a residual Add there (the test above)."""
    violations = found(two_conv_add(target, "Identity", same_input=True), target)
    assert [v for v in violations if v[1] == "add"] == []


def int8_transformer_matmul(target: str) -> onnx.ModelProto:
    """A MatMul with int8 symmetric input activations in a graph with attention."""
    net = Net(target)
    flat = net.op("Flatten", [net.qdq("x", "q_in", dtype=np.int8, zero_point=0)], "flat0")
    matmul = net.op("MatMul", [flat, net.weight("w", (C * 64, 3), axis=1)], "mm")
    return net.model(attention_tail(net, matmul))


def test_op_rule_can_override_the_activation_spec():
    """OpenVINO's transformer rules quantize MatMul inputs int8 symmetric (NNCF TRANSFORMER);
    onnxruntime's keep the backend's uint8."""
    assert found(int8_transformer_matmul("openvino"), "openvino") == []
    ort_found = found(int8_transformer_matmul("onnxruntime"), "onnxruntime")
    assert [v for v in ort_found if v[1] == "q_in"] == [("dtype", "q_in")]


@pytest.mark.parametrize("above", [np.int8, np.uint8])
def test_a_quantizer_copied_above_a_reshape_takes_its_readers_spec(above):
    """OpenVINO's export copies a quantizer above a flatten (quantize_before_pass_through:
    MobileViT's pooled features -> flatten -> classifier in transformer mode); the copy serves
    the MatMul below, so it must be that MatMul's int8, not the backend's default uint8."""
    net = Net("openvino")
    axes = net.const("axes", np.asarray([2, 3], np.int64))
    pooled = net.op("ReduceMean", ["x", axes], "pooled", keepdims=0)
    flat = net.op("Flatten", [net.qdq(pooled, "q_above", dtype=above, zero_point=0)], "fl")
    q_in = net.qdq(flat, "q_in", dtype=np.int8, zero_point=0)
    matmul = net.op("MatMul", [q_in, net.weight("w", (C, 3), axis=1)], "mm")
    violations = found(net.model(attention_tail(net, matmul)), "openvino")
    assert violations == ([] if above == np.int8 else [("dtype", "q_above")])


def test_rules_from_data_drive_the_linter():
    """A new backend is data only: a toy rule set that quantizes Sigmoid inputs."""
    toy = BackendRules(
        name="toy",
        activation=INT8_SYM_ACT,
        weight=INT8_WEIGHT,
        ops={"sigmoid": OpRule()},
        pass_through=frozenset(),
        fusions=(),
    )
    net = Net("tensorrt")
    net.op("Sigmoid", ["x"], "sig")
    model = net.model("sig")
    assert found(model, toy) == [("unquantized-input", "sig")]
    assert found(model, "openvino") == []  # OpenVINO's rules give Sigmoid no int8 kernel


# -- concat-scales -----------------------------------------------------------------------------


def concat(target: str, scales: tuple[float, float], relu: bool = True) -> onnx.ModelProto:
    net = Net(target)
    second = net.op("Relu" if relu else "Neg", ["x"], "second")
    a, b = net.qdq("x", scale=scales[0]), net.qdq(second, scale=scales[1])
    net.op("Concat", [a, b], "cat", axis=1)
    return net.model("cat")


@pytest.mark.parametrize("target", AFFINE_TARGETS)
def test_concat_inputs_must_share_one_scale(target):
    """The graph input x is signed, relu(x) is not: onnxruntime folds a ReLU into its Q only
    at zero point 0 (relu_fold_needs_lowest_zero_point), so there the ReLU keeps its own
    scale; two signed inputs must share one everywhere."""
    expected = [] if target == "onnxruntime" else [("concat-scales", "cat")]
    assert found(concat(target, (0.1, 0.2)), target) == expected
    assert found(concat(target, (0.1, 0.1)), target) == []
    assert found(concat(target, (0.1, 0.2), relu=False), target) == [("concat-scales", "cat")]


def test_tensorrt_lets_concat_pass_quantization_through():
    assert found(concat("tensorrt", (0.1, 0.2)), "tensorrt") == []


def shuffle_unit(target: str, next_scale: float) -> onnx.ModelProto:
    """ShuffleNet's chain with no Q/DQ on the halves: cat(x, relu) at scale 0.1, one half to a
    Conv and the other, with relu2 at `next_scale`, to the next Concat."""
    net = Net(target)
    relu = net.op("Relu", ["x"], "relu")
    cat = net.op("Concat", [net.qdq("x", scale=0.1), net.qdq(relu, scale=0.1)], "cat", axis=1)
    starts, ends, axes = (net.const(n, np.array([v])) for n, v in (("s", 0), ("e", C), ("a", 1)))
    half = net.op("Slice", [cat, starts, ends, axes], "half")
    conv = net.conv(half, "conv")
    relu2 = net.op("Relu", [conv], "relu2")
    net.op("Concat", [half, net.qdq(relu2, scale=next_scale)], "cat2", axis=1)
    return net.model("cat2")


def test_openvino_reads_a_concat_output_as_quantized_on_its_inputs_grid():
    """shared_scale_outputs_quantized (OpenVINO, as NNCF's unified scales): a Conv reading a
    quantized Concat through a slice needs no Q/DQ of its own, and the next Concat must take
    that grid's scale; onnxruntime's rules still want the Conv's own."""
    assert found(shuffle_unit("openvino", 0.1), "openvino") == []
    assert found(shuffle_unit("openvino", 0.2), "openvino") == [("concat-scales", "cat2")]
    assert ("unquantized-input", "conv") in found(shuffle_unit("onnxruntime", 0.1), "onnxruntime")


# -- API errors ----------------------------------------------------------------------------------


def test_unknown_target_and_missing_file_are_bad_input(tmp_path):
    with pytest.raises(errors.BadInputError, match="unknown target"):
        lint(clean_conv("tensorrt"), "tpu")
    with pytest.raises(errors.BadInputError, match="no such"):
        lint(tmp_path / "missing.onnx", "tensorrt")


# -- onnxruntime's quantize_static output ------------------------------------------------------


@pytest.fixture(scope="module")
def ort_models(tmp_path_factory) -> dict[str, onnx.ModelProto]:
    """A small residual CNN exported with the dynamo exporter and quantized by onnxruntime's
    tool: "u8" (its defaults, uint8 affine activations) and "s8" (int8 symmetric)."""
    import torch
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Residual(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = torch.nn.Conv2d(3, C, 3, padding=1)
            self.conv2 = torch.nn.Conv2d(C, C, 3, padding=1)
            self.fc = torch.nn.Linear(C * 64, 5)

        def forward(self, x):
            y = torch.relu(self.conv1(x))
            return self.fc(torch.relu(self.conv2(y) + y).flatten(1))

    class Batches(CalibrationDataReader):
        def __init__(self, name: str) -> None:
            rng = np.random.default_rng(0)
            self.batches = iter(
                {name: rng.standard_normal((1, 3, 8, 8), np.float32)} for _ in range(4)
            )

        def get_next(self):
            return next(self.batches, None)

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("ort")
    fp32 = folder / "fp32.onnx"
    torch.onnx.export(Residual().eval(), (torch.randn(1, 3, 8, 8),), fp32, dynamo=True)
    input_name = onnx.load(fp32).graph.input[0].name
    variants = {
        "u8": {"activation_type": QuantType.QUInt8},
        "s8": {"activation_type": QuantType.QInt8, "extra_options": {"ActivationSymmetric": True}},
    }
    models = {}
    for name, options in variants.items():
        path = folder / f"{name}.onnx"
        quantize_static(
            fp32,
            path,
            Batches(input_name),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            weight_type=QuantType.QInt8,
            **options,
        )
        models[name] = onnx.load(path)
    return models


def input_quantizer(model: onnx.ModelProto) -> str:
    graph_input = model.graph.input[0].name
    return next(
        n.name
        for n in model.graph.node
        if n.op_type == "QuantizeLinear" and n.input[0] == graph_input
    )


def int32_dequantizers(model: onnx.ModelProto) -> set[str]:
    int32 = {t.name for t in model.graph.initializer if t.data_type == TensorProto.INT32}
    return {
        n.name for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in int32
    }


def test_ort_uint8_model_breaks_tensorrt_rules(ort_models):
    model = ort_models["u8"]
    violations = set(found(model, "tensorrt"))
    # N(0, 1) calibration data: the input's uint8 range needs a zero point near 128
    assert ("zero-point", input_quantizer(model)) in violations
    assert ("dtype", input_quantizer(model)) in violations
    biases = int32_dequantizers(model)
    assert len(biases) == 3  # conv1, conv2 and fc biases
    assert {("dtype", name) for name in biases} <= violations
    # the tool quantizes both Add inputs, so conv2's output reaches the Add through Q/DQ
    assert "qdq-breaks-fusion" in {rule for rule, _ in violations}
    # its per-channel axes are the output channels (Conv 0, Gemm with transB=1 0)
    assert "weight-axis" not in {rule for rule, _ in violations}


@pytest.mark.parametrize("target", AFFINE_TARGETS)
def test_ort_uint8_model_meets_affine_rules(ort_models, target):
    assert found(ort_models["u8"], target) == []


def test_ort_signed_symmetric_model_breaks_onnxruntime_rules(ort_models):
    model = ort_models["s8"]
    violations = found(model, "onnxruntime")
    assert ("dtype", input_quantizer(model)) in violations
    assert {rule for rule, _ in violations} == {"dtype"}
    quantize_nodes = {n.name for n in model.graph.node if n.op_type == "QuantizeLinear"}
    assert {node for _, node in violations} <= quantize_nodes  # activations only, no weights


# -- CLI -------------------------------------------------------------------------------------------


def run_lint(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qat_deploy.deploy.app.cli", "lint", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def cli(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """Each exit code once, run side by side: every run starts an interpreter that imports
    torch (deploy/__init__), which is most of this file's time."""
    folder = tmp_path_factory.mktemp("cli")
    clean = save(clean_conv("tensorrt"), folder / "clean.onnx")
    broken = save(input_conv("tensorrt", zero_point=3), folder / "zero_point.onnx")
    (folder / "garbage.onnx").write_bytes(b"\xff\xfenot onnx\x00" * 8)
    cases = {
        "clean": [clean, "--target", "tensorrt"],
        "violations": [broken, "--target", "tensorrt", "--json"],
        "missing": [folder / "missing.onnx", "--target", "tensorrt"],
        "garbage": [folder / "garbage.onnx", "--target", "tensorrt"],
        "unknown target": [clean, "--target", "tpu"],
    }
    with ThreadPoolExecutor(max_workers=len(cases)) as pool:
        runs = {name: pool.submit(run_lint, *map(str, args)) for name, args in cases.items()}
    return {name: run.result() for name, run in runs.items()}


def assert_one_line_error(proc: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_cli_clean_model_exits_0(cli):
    proc = cli["clean"]
    assert proc.returncode == errors.OK, proc.stderr
    assert "no violations" in proc.stdout


def test_cli_violations_exit_4_and_list_as_json(cli):
    proc = cli["violations"]
    assert proc.returncode == errors.CHECK_FAILED
    assert_one_line_error(proc)
    rows = json.loads(proc.stdout)
    assert [(r["rule"], r["node"]) for r in rows] == [("zero-point", "q_in")]
    assert "3" in rows[0]["message"]


@pytest.mark.parametrize("case", ["missing", "garbage", "unknown target"])
def test_cli_bad_input_exits_2_with_one_line(cli, case):
    proc = cli[case]
    assert proc.returncode == errors.BAD_INPUT
    assert_one_line_error(proc)
    culprit = {"missing": "missing.onnx", "unknown target": "tpu"}.get(case, f"{case}.onnx")
    assert culprit in proc.stderr  # the line names what to fix


def test_cli_table_names_rule_and_node(tmp_path):
    """In process (the subprocess runs above cover exit codes): the default table output."""
    path = save(input_conv("tensorrt", zero_point=3), tmp_path / "zero_point.onnx")
    result = CliRunner().invoke(app, ["lint", str(path), "--target", "tensorrt"])
    assert isinstance(result.exception, errors.CheckFailedError)
    assert "zero-point" in result.stdout and "q_in" in result.stdout


def test_truncated_file_is_bad_input(tmp_path):
    data = clean_conv("tensorrt").SerializeToString()
    path = tmp_path / "truncated.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(errors.BadInputError, match="truncated.onnx"):
        lint(path, "tensorrt")


def test_our_tensorrt_conv_transpose_export_is_lint_clean(tmp_path):
    """A ConvTranspose2d exports through aten.convolution: its weight axis (1) must be read
    from the ONNX op, not from the torch op's kind."""
    import torch

    from qat_deploy.deploy.export.qdq import export
    from qat_deploy.deploy.frontend.prepare import prepare
    from qat_deploy.deploy.training.calibrate import calibrate

    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.ConvTranspose2d(8, 4, 2, stride=2)
    ).eval()
    prepared = prepare(model, "tensorrt", torch.randn(1, 3, 8, 8))
    calibrate(prepared, [torch.randn(4, 3, 8, 8)], progress=False)
    path = export(prepared, tmp_path / "m.onnx", torch.randn(1, 3, 8, 8))
    assert lint(path, "tensorrt") == []


@pytest.mark.parametrize("target", available_targets())
@pytest.mark.parametrize("name", ["mnist_cnn", "bert_tiny"])
def test_our_zoo_exports_are_lint_clean(name, target, tmp_path):
    """Export passes included: a quantizer hoisted above a reshape must still be the one its
    consumer's rule asks for."""
    import torch

    from qat_deploy.deploy.data import default_dataset
    from qat_deploy.deploy.export.qdq import export
    from qat_deploy.deploy.frontend.prepare import prepare
    from qat_deploy.deploy.training.calibrate import calibrate
    from qat_deploy.models import load_model

    model, spec = load_model(name)
    data = torch.from_numpy(default_dataset(spec, 16, split="calib").inputs)
    prepared = prepare(model, target, data[:1])
    calibrate(prepared, data.split(8), progress=False)
    path = export(prepared, tmp_path / "m.onnx", data[:1])
    assert lint(path, target) == []


# -- float_by_rule -------------------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_float_by_rule_names_the_compute_ops_the_rules_keep_float(target, tmp_path):
    """onnxruntime keeps the attention MatMuls float (transformer rules), the CPU backends
    ConvTranspose (CNN rules); TensorRT quantizes every compute op. Written by hand from
    backends/<name>/rules.py; the export keeps each op's kind, so names are those of the ONNX
    nodes of the two attention MatMuls and of the ConvTranspose."""
    import torch

    from qat_deploy.deploy.export.qdq import export
    from qat_deploy.deploy.frontend.prepare import prepare
    from qat_deploy.deploy.lint import float_by_rule
    from tests.frontend.blocks import EncoderBlock

    encoder = prepare(EncoderBlock().eval(), target, torch.randn(1, 5, 16))
    path = export(encoder, tmp_path / "encoder.onnx", torch.randn(1, 5, 16))
    floats = float_by_rule(path, target)
    assert len(floats) == (2 if target == "onnxruntime" else 0)
    graph = onnx.load(str(path)).graph
    assert all(n.op_type == "MatMul" for n in graph.node if n.name in floats)
    up = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 1), torch.nn.ConvTranspose2d(4, 4, 2, 2))
    decoder = prepare(up.eval(), target, torch.randn(1, 4, 8, 8))
    path = export(decoder, tmp_path / "decoder.onnx", torch.randn(1, 4, 8, 8))
    floats = float_by_rule(path, target)
    graph = onnx.load(str(path)).graph
    assert [n.op_type for n in graph.node if n.name in floats] == (
        [] if target == "tensorrt" else ["ConvTranspose"]
    )


def test_timm_fused_qkv_attention_exported_for_openvino_is_lint_clean(tmp_path):
    """timm's qkv Linear -> reshape -> permute -> unbind -> attention MatMuls: the unbind
    exports as Slice then Squeeze, one torch op. The lint must follow the quantized value
    through both to the MatMuls, whose OpenVINO transformer rule asks int8, as prepare()
    does; stopping at the Squeeze it asked uint8 of the qkv quantizers (timm DeiT-Tiny's
    build failed with 36 such violations)."""
    import torch

    from qat_deploy.deploy.export.qdq import export
    from qat_deploy.deploy.frontend.prepare import prepare
    from qat_deploy.deploy.training.calibrate import calibrate
    from tests.frontend.blocks import FusedQKVAttention

    torch.manual_seed(0)
    model, x = FusedQKVAttention().eval(), torch.randn(1, 5, 64)
    prepared = prepare(model, "openvino", x)
    calibrate(prepared, [x + 0.1 * torch.randn_like(x) for _ in range(4)], progress=False)
    path = export(prepared, tmp_path / "attention.qdq.onnx", x)
    assert lint(path, "openvino") == []
