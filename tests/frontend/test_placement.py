"""Quantizer placement per target on reference blocks. Every expected placement below is
written by hand from the rules in backends/<name>/rules.py and ../shared/REFERENCE.md:

- tensorrt: quantize inputs of Conv/Linear/MatMul; residual Add gets a quantizer on the skip
  branch only (never between the Conv+BN and the Add it feeds); Concat and MaxPool commute.
- openvino / onnxruntime: also both Add inputs; Concat inputs share one quantizer.
- transformer blocks (all targets): only Linear and MatMul inputs; Softmax, LayerNorm, GELU and
  Adds stay float. onnxruntime: only Linear inputs (the attention MatMuls stay float too).
"""

from __future__ import annotations

import pytest
import torch

from qat_deploy.deploy.export.qdq import export
from qat_deploy.deploy.frontend.prepare import prepare
from qat_deploy.deploy.lint import lint
from qat_deploy.deploy.quant.spec import QuantSpec
from qat_deploy.deploy.rules.backend import available_targets
from tests.frontend.blocks import (
    BasicBlock,
    Bottleneck,
    ChannelGate,
    ConcatBlock,
    EncoderBlock,
    GhostBlock,
    InceptionStem,
    InvertedResidual,
    SqueezeExcite,
    randomize_bn,
)

INT8_SYM = QuantSpec(bits=8, signed=True, symmetric=True)
UINT8_AFFINE = QuantSpec(bits=8, signed=False, symmetric=False)
WEIGHT = QuantSpec(bits=8, signed=True, symmetric=True, axis=0, narrow_range=True)
IMG = torch.randn(2, 8, 8, 8)
IMG3 = torch.randn(2, 3, 16, 16)  # an image
SEQ = torch.randn(2, 5, 16)

EXPECTED = {
    "basic": {
        "tensorrt": {("x", "conv1"), ("relu1", "conv2"), ("x", "add")},
        "cpu": {("x", "conv1"), ("relu1", "conv2"), ("x", "add"), ("conv2", "add")},
    },
    "bottleneck": {
        "tensorrt": {
            ("x", "conv1"),
            ("relu1", "conv2"),
            ("relu2", "conv3"),
            ("x", "downsample_0"),
            ("downsample_0", "add"),
        },
        "cpu": {
            ("x", "conv1"),
            ("relu1", "conv2"),
            ("relu2", "conv3"),
            ("x", "downsample_0"),
            ("downsample_0", "add"),
            ("conv3", "add"),
        },
    },
    "inverted_residual": {
        "tensorrt": {("x", "conv_0"), ("conv_2", "conv_3"), ("conv_5", "conv_6"), ("x", "add")},
        "cpu": {
            ("x", "conv_0"),
            ("conv_2", "conv_3"),
            ("conv_5", "conv_6"),
            ("x", "add"),
            ("conv_6", "add"),
        },
    },
    "concat": {
        "tensorrt": {("x", "conv_a"), ("x", "conv_b"), ("cat", "conv_out")},
        "cpu": {
            ("x", "conv_a"),
            ("x", "conv_b"),
            ("relu_a", "cat"),
            ("relu_b", "cat"),
            ("pool", "cat"),
            ("cat", "conv_out"),
        },
        # the Concat writes its inputs' shared grid (shared_scale_outputs_quantized): conv_out
        # reads it as it is, like NNCF, with no requantization
        "openvino": {
            ("x", "conv_a"),
            ("x", "conv_b"),
            ("relu_a", "cat"),
            ("relu_b", "cat"),
            ("pool", "cat"),
        },
    },
}
ENCODER_EDGES = {
    ("x", "q_proj"),
    ("x", "k_proj"),
    ("x", "v_proj"),
    ("q_proj", "matmul"),
    ("transpose", "matmul"),
    ("softmax", "matmul_1"),
    ("v_proj", "matmul_1"),
    ("matmul_1", "out_proj"),
    ("norm1", "fc1"),
    ("act", "fc2"),
}
# onnxruntime keeps the two attention MatMuls (activation x activation) in float: written by hand
# from backends/onnxruntime/rules.py (transformer_ops = Linear only), changed because their
# QuantizeLinear + MatMulIntegerToFloat / QLinearMatMul cost more than fp32 FusedMatMul on the
# x86 CPU EP (measured on bert_tiny, see docs/performance.md).
ENCODER_EDGES_LINEAR_ONLY = {
    ("x", "q_proj"),
    ("x", "k_proj"),
    ("x", "v_proj"),
    ("matmul_1", "out_proj"),
    ("norm1", "fc1"),
    ("act", "fc2"),
}
ENCODER = {
    "tensorrt": (ENCODER_EDGES, set()),
    # OpenVINO quantizes k_proj's output above the transpose too (quantize_pass_through_inputs):
    # the Linear writes int8 and the transpose moves int8
    "openvino": (ENCODER_EDGES | {("k_proj", "transpose")}, set()),
    "onnxruntime": (ENCODER_EDGES_LINEAR_ONLY, {"matmul", "matmul_1"}),
}
BLOCKS = {
    "basic": (BasicBlock, {"conv1", "conv2"}),
    "bottleneck": (Bottleneck, {"conv1", "conv2", "conv3", "downsample_0"}),
    "inverted_residual": (InvertedResidual, {"conv_0", "conv_3", "conv_6"}),
    "concat": (ConcatBlock, {"conv_a", "conv_b", "conv_out"}),
}
ACTIVATION = {"tensorrt": INT8_SYM, "openvino": UINT8_AFFINE, "onnxruntime": UINT8_AFFINE}
TARGETS = list(ACTIVATION)
# OpenVINO's signed values (zero_point_free_readers), written by hand from its rules: the
# graph input, which can be negative, read only by Convs (Bottleneck: conv1 and the
# downsample; ConcatBlock: conv_a, conv_b and, through the MaxPool, the Concat, whose one
# grid conv_out alone reads). A value the residual Add reads too keeps uint8.
OPENVINO_SIGNED = {
    "bottleneck": {("x", "conv1"), ("x", "downsample_0")},
    "concat": {
        ("x", "conv_a"),
        ("x", "conv_b"),
        ("relu_a", "cat"),
        ("relu_b", "cat"),
        ("pool", "cat"),
    },
}


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("block", list(BLOCKS))
def test_cnn_block_placement(block, target):
    cls, weighted = BLOCKS[block]
    prepared = prepare(randomize_bn(cls()), target, IMG, reduce_range=False)
    plan = prepared.plan
    rows = EXPECTED[block]
    expected = rows.get(target) or rows["tensorrt" if target == "tensorrt" else "cpu"]
    assert plan.mode == "cnn"
    assert plan.activation_edges == expected
    assert plan.weight_layers == weighted
    signed = OPENVINO_SIGNED.get(block, set()) if target == "openvino" else set()
    for site in plan.sites:
        if site.role == "weight":
            assert site.spec == WEIGHT
        else:
            assert site.spec == (INT8_SYM if set(site.edges) <= signed else ACTIVATION[target])
    assert {e for s in plan.sites if s.spec == INT8_SYM for e in s.edges} >= signed


def test_fusion_chains_follow_each_backend():
    """TensorRT fuses Conv+BN+Add+ReLU (the residual), the CPU backends Conv+BN(+ReLU)."""
    trt = prepare(Bottleneck(), "tensorrt", IMG).plan
    assert sorted(trt.fused) == sorted(
        [
            ("conv1", "bn1", "relu1"),
            ("conv2", "bn2", "relu2"),
            ("conv3", "bn3", "add", "relu3"),
            ("downsample_0", "downsample_1"),
        ]
    )
    ov = prepare(Bottleneck(), "openvino", IMG).plan
    assert sorted(ov.fused) == sorted(
        [
            ("conv1", "bn1", "relu1"),
            ("conv2", "bn2", "relu2"),
            ("conv3", "bn3"),
            ("downsample_0", "downsample_1"),
        ]
    )
    ort = prepare(InvertedResidual(), "onnxruntime", IMG).plan
    assert ("conv_0", "conv_1", "conv_2") in ort.fused  # Conv+BN+ReLU6


def test_relu_before_an_affine_quantizer_folds_into_its_range():
    """onnxruntime drops a ReLU whose following Q has zero point qmin: calibration must give
    exactly that for post-ReLU quantizers."""
    from qat_deploy.deploy.training.calibrate import calibrate

    prepared = prepare(randomize_bn(BasicBlock()), "onnxruntime", IMG)
    calibrate(prepared, [torch.randn(4, 8, 8, 8)], progress=False)
    site = prepared.plan.site_for_edge("relu1", "conv2")
    fq = dict(prepared.named_modules())[site.module]
    assert int(fq.effective_qparams()[1]) == 0


@pytest.mark.parametrize("target", ["openvino", "onnxruntime"])
def test_concat_inputs_share_one_quantizer(target):
    plan = prepare(ConcatBlock(), target, IMG).plan
    sites = {p: plan.site_for_edge(p, "cat").module for p in ("relu_a", "relu_b", "pool")}
    if target == "onnxruntime":  # relu_fold_needs_lowest_zero_point: pool(x) is signed
        assert sites["pool"] not in (sites["relu_a"], sites["relu_b"])
    else:
        assert len(set(sites.values())) == 1


def test_one_quantizer_per_value_shared_by_its_consumers():
    plan = prepare(BasicBlock(), "tensorrt", IMG).plan
    assert plan.site_for_edge("x", "conv1") == plan.site_for_edge("x", "add")


@pytest.mark.parametrize("target", TARGETS)
def test_transformer_block_keeps_softmax_layernorm_gelu_add_float(target):
    prepared = prepare(EncoderBlock(), target, SEQ)
    plan = prepared.plan
    assert plan.mode == "transformer"
    edges, float_matmuls = ENCODER[target]
    assert plan.activation_edges == edges
    assert plan.weight_layers == {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}
    always_float = {"mul", "softmax", "add", "norm1", "act", "add_1", "norm2"}
    if target == "onnxruntime":  # its GELU is written out (x * gate), all of it float here
        always_float |= {"act_div", "act_erf", "act_add", "act_gate"}
    assert set(plan.float_ops) == always_float | float_matmuls
    act = INT8_SYM if target in ("tensorrt", "openvino") else UINT8_AFFINE
    assert all(s.spec == act for s in plan.sites if s.role == "activation")


@pytest.mark.parametrize("block", list(BLOCKS))
def test_tensorrt_and_openvino_differ_exactly_where_rules_differ(block):
    cls, _ = BLOCKS[block]
    model = cls()
    trt, ov = prepare(model, "tensorrt", IMG).plan, prepare(model, "openvino", IMG).plan
    extra = ov.activation_edges - trt.activation_edges
    if block == "concat":  # OpenVINO quantizes Concat inputs; TensorRT lets Q/DQ commute
        assert extra == {("relu_a", "cat"), ("relu_b", "cat"), ("pool", "cat")}
        # and its reader reads the Concat's grid as it is (shared_scale_outputs_quantized)
        assert trt.activation_edges - ov.activation_edges == {("cat", "conv_out")}
    else:  # OpenVINO also quantizes the Conv branch of the residual Add
        assert len(extra) == 1 and next(iter(extra))[1] == "add"
        assert trt.activation_edges <= ov.activation_edges
    assert {s.spec for s in trt.sites if s.role == "activation"} == {INT8_SYM}
    ov_specs = {e: s.spec for s in ov.sites if s.role == "activation" for e in s.edges}
    signed = OPENVINO_SIGNED.get(block, set())
    assert ov_specs == {e: INT8_SYM if e in signed else UINT8_AFFINE for e in ov_specs}
    assert signed <= ov_specs.keys()
    assert trt.weight_layers == ov.weight_layers


def test_conv_transpose_weights_use_axis_1():
    """A ConvTranspose TensorRT keeps (kernel 3, stride 2: no exact Conv + pixel shuffle) has
    its weight [in, out, kh, kw] quantized per output channel, axis 1."""
    model = torch.nn.Sequential(torch.nn.ConvTranspose2d(8, 6, 3, stride=2))
    plan = prepare(model, "tensorrt", IMG).plan
    (weight,) = [s for s in plan.sites if s.role == "weight"]
    assert weight.spec.axis == 1
    prepared = prepare(model, "tensorrt", IMG)
    assert prepared(IMG).shape == (2, 6, 17, 17)


def test_bits_override_reaches_every_quantizer():
    plan = prepare(BasicBlock(), "onnxruntime", IMG, bits=4).plan
    assert {s.spec.bits for s in plan.sites} == {4}


@pytest.mark.parametrize("target", TARGETS)
def test_reduced_range_gives_7_bit_weights_only_where_the_engine_saturates(target):
    """onnxruntime's and OpenVINO's u8 x s8 kernels add product pairs in int16 on x86 without
    VNNI: 7-bit weights keep 255 * 63 * 2 below 32767. TensorRT keeps 8-bit weights."""
    plan = prepare(BasicBlock(), target, IMG, reduce_range=True).plan
    weights = {s.spec.bits for s in plan.sites if s.role == "weight"}
    assert weights == ({8} if target == "tensorrt" else {7})
    assert {s.spec.bits for s in plan.sites if s.role == "activation"} == {8}


@pytest.mark.parametrize("target", available_targets())
def test_a_softmax_head_keeps_cnn_rules_and_attention_switches_to_transformer_rules(target):
    """A Softmax alone is a classifier head: the Conv must still get its quantized input."""
    cnn = torch.nn.Sequential(  # 4 channels in: no thin RGB stem, kept float by rule
        torch.nn.Conv2d(4, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(288, 10)
    )
    model = torch.nn.Sequential(cnn, torch.nn.Softmax(-1)).eval()
    head = prepare(model, target, torch.randn(1, 4, 8, 8))
    assert head.plan.mode == "cnn"
    conv_input = [s for s in head.plan.sites if ("input_1", "_0_0") in s.edges]
    assert len(conv_input) == 1
    encoder = prepare(EncoderBlock().eval(), target, torch.randn(1, 5, 16))
    assert encoder.plan.mode == "transformer"


class MobileBlock(torch.nn.Module):
    """What EfficientNet / MobileNetV3 blocks contain: SiLU, a depthwise Conv, HardSwish, a
    squeeze-excite gate with HardSigmoid, and a ConvTranspose decoder layer."""

    def __init__(self, c=8):
        super().__init__()
        nn = torch.nn
        self.conv1, self.bn1, self.act1 = (
            nn.Conv2d(c, c, 3, padding=1),
            nn.BatchNorm2d(c),
            nn.SiLU(),
        )
        self.conv2, self.act2 = nn.Conv2d(c, c, 3, padding=1, groups=c), nn.Hardswish()
        self.pool, self.fc1, self.relu = nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, 4, 1), nn.ReLU()
        self.fc2, self.gate = nn.Conv2d(4, c, 1), nn.Hardsigmoid()
        self.conv3, self.up = nn.Conv2d(c, c, 1), nn.ConvTranspose2d(c, c, 2, stride=2)

    def forward(self, x):
        y = self.act2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        g = self.gate(self.fc2(self.relu(self.fc1(self.pool(y)))))
        return self.up(self.conv3(y * g))


# Written by hand from backends/<name>/rules.py: every backend quantizes Conv inputs, the
# pooling input and the SE gate's Mul (CPU backends). onnxruntime writes SiLU out as
# Sigmoid x Mul and HardSwish as HardSigmoid x Mul and quantizes all four (QLinearSigmoid,
# QLinearAdd for the HardSigmoid, QLinearMul), and quantizes every Conv's output (QLinearConv
# writes a Q), so the SE gate's HardSigmoid and the float ConvTranspose read quantized values;
# OpenVINO keeps all three activations float with only Conv inputs quantized; the CPU
# backends keep ConvTranspose float.
MOBILE_COMMON = {("x", "conv1"), ("pool", "fc1"), ("relu", "fc2")}
MOBILE = {
    "onnxruntime": MOBILE_COMMON
    | {
        ("conv1", "sigmoid_default"),
        ("conv1", "mul_tensor"),
        ("sigmoid_default", "mul_tensor"),
        ("mul_tensor", "conv2"),
        ("conv2", "hardsigmoid_default"),
        ("conv2", "mul_tensor_1"),
        ("hardsigmoid_default", "mul_tensor_1"),
        ("mul_tensor_1", "pool"),
        ("fc2", "gate"),
        ("mul_tensor_1", "mul"),
        ("gate", "mul"),
        ("mul", "conv3"),
        ("conv3", "up"),
    },
    "openvino": MOBILE_COMMON
    | {("act2", "pool"), ("act1", "conv2"), ("act2", "mul"), ("gate", "mul"), ("mul", "conv3")},
    "tensorrt": MOBILE_COMMON
    | {("act2", "pool"), ("act1", "conv2"), ("mul", "conv3"), ("conv3", "up")},
}


@pytest.mark.parametrize("target", TARGETS)
def test_mobile_block_placement_follows_each_backends_kernels(target):
    plan = prepare(MobileBlock().eval(), target, torch.randn(1, 8, 8, 8)).plan
    assert plan.mode == "cnn"
    assert plan.activation_edges == MOBILE[target]
    weighted = {"conv1", "conv2", "conv3", "fc1", "fc2"}
    assert plan.weight_layers == (weighted | {"up"} if target == "tensorrt" else weighted)
    assert ("fc1", "relu") in plan.fused  # Conv + ReLU without BN fuses too
    if target != "tensorrt":
        assert "up" in plan.float_ops


class MeanSqueezeExcite(torch.nn.Module):
    """timm's squeeze-excite: x.mean((2, 3), keepdim=True) of a SiLU output, no pooling module."""

    def __init__(self, c=8):
        super().__init__()
        nn = torch.nn
        self.conv, self.act = nn.Conv2d(c, c, 3, padding=1), nn.SiLU()
        self.fc1, self.fc2, self.out = nn.Conv2d(c, 4, 1), nn.Conv2d(4, c, 1), nn.Conv2d(c, c, 1)

    def forward(self, x):
        y = self.act(self.conv(x))
        g = torch.sigmoid(self.fc2(torch.relu(self.fc1(y.mean((2, 3), keepdim=True)))))
        return self.out(y * g)


@pytest.mark.parametrize("target", TARGETS)
def test_a_spatial_mean_of_a_silu_is_global_pooling_on_every_backend(target, tmp_path):
    """onnxruntime's rules write the SiLU out as Sigmoid x Mul, so the mean reads a node that
    lowering made; it is still a 4-D global pooling, quantized by the rules (timm MixNet-S on
    onnxruntime: 13 unquantized GlobalAveragePools, exit 4)."""
    example = torch.randn(1, 8, 8, 8)
    prepared = prepare(MeanSqueezeExcite().eval(), target, example)
    assert any(consumer == "mean" for _, consumer in prepared.plan.activation_edges)
    with torch.no_grad():
        prepared(example)
    assert lint(export(prepared, tmp_path / "m.onnx", example), target) == []


def _activation_groups(plan) -> list[set[tuple[str, str]]]:
    return [set(s.edges) for s in plan.sites if s.role == "activation"]


# Written by hand from the rules: a value read by a Conv and a Concat gets one quantizer (the
# Concat's shared one) where Concat inputs share a scale, so a runtime sees one Q after the
# primary Conv; TensorRT lets Concat pass quantization through.
GHOST = {
    # the Concat's output quantizer joins its inputs' group (its values are on that grid)
    "onnxruntime": [
        {("x", "primary")},
        {("primary", "cheap"), ("primary", "cat"), ("cheap", "cat"), ("cat", "conv_out")},
    ],
    # conv_out reads the Concat's grid as it is (shared_scale_outputs_quantized)
    "openvino": [{("x", "primary")}, {("primary", "cheap"), ("primary", "cat"), ("cheap", "cat")}],
    "tensorrt": [{("x", "primary")}, {("primary", "cheap")}, {("cat", "conv_out")}],
}


@pytest.mark.parametrize("target", TARGETS)
def test_a_value_read_by_a_conv_and_a_concat_has_one_quantizer(target):
    prepared = prepare(randomize_bn(GhostBlock()), target, IMG)
    expected = GHOST[target]
    groups = _activation_groups(prepared.plan)
    assert sorted(groups, key=sorted) == sorted(expected, key=sorted)
    calls = [
        n for n in prepared.model.graph.nodes if n.op == "call_module" and "act_quant" in n.target
    ]
    assert len(calls) == len({(n.target, n.args[0].name) for n in calls})  # each value once


# onnxruntime fuses a Conv with the one Q that reads its output (through a ReLU) and does not
# move a Q up across MaxPool; nor does OpenVINO, which otherwise runs both pools and the Conv's
# output in float: the ReLU output is quantized before the pools, in one group with everything
# the pools reach. TensorRT quantizes where the Conv inputs are.
ONE_GROUP_ABOVE_THE_POOLS = [
    {
        ("relu", "pool"),
        ("pool", "branch_a"),
        ("pool", "branch_b"),
        ("pool", "branch_pool"),
        ("branch_pool", "branch_c"),
    }
]
INCEPTION_POOLS = {
    "onnxruntime": ONE_GROUP_ABOVE_THE_POOLS,
    "openvino": ONE_GROUP_ABOVE_THE_POOLS,
    "tensorrt": [{("pool", "branch_a"), ("pool", "branch_b")}, {("branch_pool", "branch_c")}],
}


@pytest.mark.parametrize("target", TARGETS)
def test_pooled_branches_are_quantized_where_each_runtime_fuses_them(target):
    plan = prepare(InceptionStem(), target, torch.randn(2, 3, 16, 16)).plan
    pooled = [g for g in _activation_groups(plan) if any("pool" in p for p, _ in g)]
    assert sorted(pooled, key=sorted) == sorted(INCEPTION_POOLS[target], key=sorted)
    # x.mean([2, 3]) without keepdim is a global average pool: its input is quantized, on
    # OpenVINO as the Concat's inputs' grid (shared_scale_outputs_quantized), read as it is
    assert ("mean", "fc") in plan.activation_edges
    if target == "openvino":
        assert ("cat", "mean") not in plan.activation_edges
        assert {("branch_a", "cat"), ("branch_b", "cat")} <= plan.activation_edges
    else:
        assert ("cat", "mean") in plan.activation_edges


@pytest.mark.parametrize("gate", ["conv", None, "linear_bn"])
def test_a_gate_quantizer_moves_up_to_a_sigmoid_the_conv_before_it_runs_as_a_post_op(gate):
    """OpenVINO (post_op_activations): the Mul's gate quantizer also sits right after the
    sigmoid when the Conv1d before it runs the sigmoid as a post-op, so the Conv writes u8
    and the view moves u8. A sigmoid of the pooled values themselves is a float op of its
    own, and so is one after a Linear's BatchNorm (no Linear+BN fold): their view's output
    is quantized, as before."""
    edges = prepare(ChannelGate(gate=gate).eval(), "openvino", IMG).plan.activation_edges
    viewed = "view_1" if gate == "conv" else "view"  # the Conv1d path views twice
    assert (viewed, "mul") in edges
    assert (("sigmoid", viewed) in edges) == (gate == "conv")


@pytest.mark.parametrize("target", ["openvino", "onnxruntime"])
def test_a_signed_value_only_elementwise_ops_read_is_int8_on_openvino(target, tmp_path):
    """OpenVINO (zero_point_free_readers): the values that can be negative and that only
    Convs, the pooling and the gate Mul read (the input, the Conv output, its channel means
    into the Conv1d) are int8 with zero point 0 (the CPU plugin subtracts a uint8 zero point
    in a kernel of its own there, and its AMX Convs run slower with one). The sigmoid gate
    (never negative: zero point 0 on the uint8 grid) stays uint8; so does everything on
    onnxruntime. Lint accepts the export."""
    prepared = prepare(ChannelGate(gate="conv").eval(), target, IMG)
    spec = {e: s.spec for s in prepared.plan.sites if s.role == "activation" for e in s.edges}
    signed = INT8_SYM if target == "openvino" else UINT8_AFFINE
    assert spec[("conv", "mean")] == spec[("conv", "mul")] == signed
    assert spec[("x", "conv")] == signed
    assert spec[("sigmoid", "view_1")] == UINT8_AFFINE
    if target == "openvino":
        assert spec[("mean", "view")] == INT8_SYM
    with torch.no_grad():
        prepared(IMG)
    assert lint(export(prepared, tmp_path / "m.onnx", IMG[:1]), target) == []


@pytest.mark.parametrize("pool", ["mean", "adaptive"])
def test_squeeze_excite_means_and_gated_values_keep_uint8_on_openvino(pool, tmp_path):
    """Conv is a zero_point_free_reader on OpenVINO, but a SiLU output's channel means and
    its product with a sigmoid gate are never below SiLU's minimum (-0.28): a symmetric
    grid would halve their resolution (EfficientNet-B0's cosine vs fp32 fell 0.9758 ->
    0.9614 when they were int8), so they stay uint8; the image into the stem turns int8.
    The bound is checked on calibrated ranges; lint accepts the export."""
    from qat_deploy.deploy.training.calibrate import calibrate

    torch.manual_seed(0)
    prepared = prepare(randomize_bn(SqueezeExcite(pool=pool)).eval(), "openvino", IMG3)
    sites = {e: s for s in prepared.plan.sites if s.role == "activation" for e in s.edges}
    pooled = "mean" if pool == "mean" else "adaptive_avg_pool2d"
    assert sites[("x", "stem")].spec == INT8_SYM
    hardly_negative = [sites[(pooled, "fc1")], sites[("mul", "proj")]]
    assert {s.spec for s in hardly_negative} == {UINT8_AFFINE}
    calibrate(prepared, [4 * torch.randn(8, 3, 16, 16) for _ in range(4)], progress=False)
    silu_min = torch.nn.functional.silu(torch.linspace(-4, 0, 40001)).min()
    for site in hardly_negative:
        observer = prepared.get_submodule(site.module).observer
        assert observer.min_val >= silu_min - 1e-6 and observer.max_val > 0
    assert lint(export(prepared, tmp_path / "m.onnx", IMG3[:1]), "openvino") == []


def test_a_product_with_an_unbounded_factor_is_signed_on_openvino():
    """Only a [0, 1] gate keeps a Mul's lower bound: times a Conv's output the SiLU values
    can be well below 0, and the product into the projection Conv is int8."""
    plan = prepare(SqueezeExcite(gate=False).eval(), "openvino", IMG3).plan
    assert plan.site_for_edge("mul", "proj").spec == INT8_SYM
    assert plan.site_for_edge("mean", "fc1").spec == UINT8_AFFINE


class DenseStem(torch.nn.Module):
    """DenseNet's first block in small: the stem's ReLU -> MaxPool output is read by both
    Concats beside the signed outputs of the dense layers' Convs."""

    def __init__(self, c=8, growth=4):
        super().__init__()
        nn = torch.nn
        self.stem, self.bn, self.pool = (
            nn.Conv2d(4, c, 3, padding=1),
            nn.BatchNorm2d(c),
            nn.MaxPool2d(2),
        )
        self.conv_a = nn.Conv2d(c, growth, 3, padding=1)
        self.conv_b = nn.Conv2d(c + growth, growth, 3, padding=1)

    def forward(self, x):
        p = self.pool(torch.relu(self.bn(self.stem(x))))
        a = self.conv_a(p)
        b = self.conv_b(torch.cat([p, a], 1))
        return torch.cat([p, a, b], 1).mean((2, 3))


@pytest.mark.parametrize("target", TARGETS)
def test_a_rectified_concat_input_keeps_its_own_scale_only_where_relus_need_zero_point_0(
    target, tmp_path
):
    """onnxruntime (relu_fold_needs_lowest_zero_point) folds a ReLU into the Q after it only
    at zero point 0: the stem's ReLU -> MaxPool output gets a quantizer of its own, not the
    Concats' shared one, which the Convs' signed outputs put above 0. OpenVINO shares one
    scale over all Concat inputs; TensorRT's symmetric grid has zero point 0 everywhere."""
    example = torch.randn(1, 4, 8, 8)
    prepared = prepare(randomize_bn(DenseStem()).eval(), target, example)
    groups = _activation_groups(prepared.plan)
    pooled = next((g for g in groups if ("pool", "cat") in g), set())  # none on TensorRT
    if target == "onnxruntime":
        assert ("relu", "pool") in pooled and not {p for p, _ in pooled} & {"conv_a", "conv_b"}
        signed = next(g for g in groups if ("conv_a", "cat") in g)
        assert {("conv_b", "cat_1"), ("cat_1", "mean")} <= signed  # the Concats' shared grid
    elif target == "openvino":
        assert {("conv_a", "cat"), ("conv_b", "cat_1")} <= pooled
    with torch.no_grad():
        prepared(example)
    assert lint(export(prepared, tmp_path / "m.onnx", example), target) == []
