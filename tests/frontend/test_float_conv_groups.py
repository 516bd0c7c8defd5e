"""Convs a runtime runs no faster in int8 stay float by rule: group shapes without a fast int8
kernel (BackendRules.float_conv_groups: onnxruntime's depthwise Convs with a channel
multiplier) and thin stems read float anyway (BackendRules.float_thin_convs); grouped Convs
a runtime computes wrong in int8 stay float too (BackendRules.float_grouped_conv_width)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from qat_deploy.deploy.engines.adapter import get_adapter
from qat_deploy.deploy.export.qdq import export
from qat_deploy.deploy.frontend.prepare import prepare
from qat_deploy.deploy.lint import float_by_rule, lint, quantized_by_rule
from qat_deploy.deploy.rules.ops import conv_groups
from qat_deploy.deploy.training.calibrate import calibrate
from tests.frontend.test_placement import TARGETS


@pytest.mark.parametrize(
    ("channels", "groups", "shape"),
    [
        ((8, 8), 1, "dense"),
        ((8, 8), 8, "depthwise"),
        ((8, 16), 8, "channel_multiplier"),
        ((8, 16), 4, "grouped"),
        ((8, 8), 2, "grouped"),
    ],
)
def test_group_shapes(channels, groups, shape):
    assert conv_groups(*channels, groups) == shape


class _Downsample(nn.Module):
    """FastViT's downsampling: a 7x7 depthwise Conv doubling the channels, between dense ones."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)  # wide: not a thin conv kept float
        self.down = nn.Conv2d(32, 64, 7, stride=2, padding=3, groups=32)
        self.head = nn.Conv2d(64, 16, 1)

    def forward(self, x):
        return self.head(torch.relu(self.down(torch.relu(self.stem(x)))))


X = torch.randn(1, 3, 16, 16)


@pytest.mark.parametrize("target", TARGETS)
def test_only_onnxruntime_keeps_the_channel_multiplier_conv_float(target, tmp_path):
    torch.manual_seed(0)
    prepared = prepare(_Downsample().eval(), target, X, reduce_range=False)
    slow = target == "onnxruntime"
    assert prepared.plan.float_by_rule == (["down"] if slow else [])
    assert prepared.plan.kept_float == []  # the user kept nothing
    assert prepared.plan.weight_layers == ({"stem", "head"} if slow else {"stem", "down", "head"})
    with torch.no_grad():
        prepared(X)
    model = onnx.load(export(prepared, tmp_path / "m.onnx", X))
    assert lint(model, target) == []
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    down = next(n for n in convs if dict((a.name, a.i) for a in n.attribute)["group"] == 32)
    assert (down.name in float_by_rule(model, target)) == slow
    assert (down.name in quantized_by_rule(model, target)) != slow


def _engine_precisions(model: nn.Module, tmp_path) -> list[str]:
    """Per compute layer, what the onnxruntime engine of the calibrated model runs."""
    torch.manual_seed(0)
    prepared = prepare(model.eval(), "onnxruntime", X)
    calibrate(prepared, [torch.randn(4, 3, 16, 16)], progress=False)
    adapter = get_adapter("onnxruntime")
    engine = adapter.build(
        export(prepared, tmp_path / "m.onnx", X), tmp_path / "e", precision="int8", threads=1
    )
    return [layer.precision for layer in adapter.kernel_report(engine).compute_layers]


def test_the_onnxruntime_engine_runs_it_float_between_int8_convs(tmp_path):
    # the head writes the graph output: onnxruntime has no QLinearConv for that
    assert _engine_precisions(_Downsample(), tmp_path)[:2] == ["int8", "float"]


class _FloatActivationStem(nn.Module):
    """An RGB Conv + BN + an activation onnxruntime runs float (tanh GELU), then int8 Convs;
    `relu_stem` puts a fused ReLU there instead, `tap` lets an int8 Conv read the stem's
    output as well, `pool` puts a MaxPool after the stem, `width` is its output channels
    (onnxruntime keeps one of <= 16 float whatever reads it, bar a pooling op)."""

    def __init__(
        self, relu_stem: bool = False, tap: bool = False, pool: bool = False, width: int = 32
    ) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.act = nn.ReLU() if relu_stem else nn.GELU(approximate="tanh")
        self.pool = nn.MaxPool2d(3, 1, 1) if pool else nn.Identity()
        self.body = nn.Conv2d(width, 8, 3, padding=1)
        self.tap = nn.Conv2d(width, 8, 1) if tap else None
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.bn(self.stem(x))
        z = torch.relu(self.body(self.pool(self.act(y))))
        if self.tap is not None:
            z = z + self.tap(y)
        return self.head(z)


@pytest.mark.parametrize("target", TARGETS)
def test_onnxruntime_keeps_a_stem_read_float_float(target, tmp_path):
    torch.manual_seed(0)
    prepared = prepare(_FloatActivationStem().eval(), target, X, reduce_range=False)
    slow = target == "onnxruntime"
    assert prepared.plan.float_by_rule == (["stem"] if slow else [])
    with torch.no_grad():
        prepared(X)
    model = onnx.load(export(prepared, tmp_path / "m.onnx", X))
    assert lint(model, target) == []
    stem = next(n for n in model.graph.node if n.op_type == "Conv")
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    assert (producers.get(stem.input[0]) != "DequantizeLinear") == slow
    assert (stem.name in float_by_rule(model, target)) == slow


@pytest.mark.parametrize(
    "model",
    [_FloatActivationStem(relu_stem=True), _FloatActivationStem(tap=True)],
    ids=["relu", "int8-reader"],
)
def test_a_wide_stem_with_an_int8_reader_stays_int8(model):
    prepared = prepare(model.eval(), "onnxruntime", X, reduce_range=False)
    assert prepared.plan.float_by_rule == []
    assert "stem" in prepared.plan.weight_layers


@pytest.mark.parametrize(("reader", "floated"), [("tap", True), ("pool", False)])
@pytest.mark.parametrize("target", TARGETS)
def test_a_narrow_stem_stays_float_unless_a_pooling_op_reads_it(target, reader, floated):
    model = _FloatActivationStem(relu_stem=True, width=16, **{reader: True}).eval()
    prepared = prepare(model, target, X, reduce_range=False)
    floated = floated and target == "onnxruntime"
    assert prepared.plan.float_by_rule == (["stem"] if floated else [])
    assert ("stem" in prepared.plan.weight_layers) != floated


def test_the_onnxruntime_engine_runs_the_stem_float_and_the_rest_int8(tmp_path):
    assert _engine_precisions(_FloatActivationStem(), tmp_path)[:2] == ["float", "int8"]


class _MixedPointwise(nn.Module):
    """timm MixNet's two-group pointwise Conv, reading `width` channels per group."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 2 * width, 3, padding=1)
        self.pw = nn.Conv2d(2 * width, 40, 1, groups=2)
        self.head = nn.Conv2d(40, 8, 1)

    def forward(self, x):
        return self.head(torch.relu(self.pw(torch.relu(self.stem(x)))))


@pytest.mark.parametrize(("width", "wrong"), [(120, True), (80, True), (64, False), (60, False)])
@pytest.mark.parametrize("target", TARGETS)
def test_openvino_keeps_the_grouped_convs_its_int8_kernel_computes_wrong_float(
    target, width, wrong, tmp_path
):
    """OpenVINO's rules (float_grouped_conv_width 64): a grouped Conv reading more than 64
    channels per group, and not a multiple of 64, stays float, tagged so; the others and
    every other backend keep it int8."""
    prepared = prepare(_MixedPointwise(width).eval(), target, X, reduce_range=False)
    floated = wrong and target == "openvino"
    assert prepared.plan.float_by_rule == (["pw"] if floated else [])
    assert ("pw" in prepared.plan.weight_layers) != floated
    with torch.no_grad():
        prepared(X)
    model = onnx.load(export(prepared, tmp_path / "m.onnx", X))
    assert lint(model, target) == []
    pw = next(n for n in model.graph.node if n.op_type == "Conv" and n.attribute[0].i == 2)
    assert (pw.name in float_by_rule(model, target)) == floated


def test_the_openvino_engine_of_a_wide_grouped_conv_computes_what_its_qdq_file_does(tmp_path):
    """The independent reference is onnxruntime running the same QDQ file. On a Xeon with
    AMX-INT8, OpenVINO 2026.4.1's int8 kernel put 95% of this Conv's outputs up to 255 steps
    off; kept float by the rule, the engine matches."""
    torch.manual_seed(0)
    images = torch.randn(8, 3, 16, 16)
    prepared = prepare(_MixedPointwise(120).eval(), "openvino", X)
    calibrate(prepared, [images], progress=False)
    path = export(prepared, tmp_path / "m.onnx", X)
    adapter = get_adapter("openvino")
    engine = adapter.build(path, tmp_path / "e", precision="int8", threads=1)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    with adapter.runner(engine) as runner:
        for image in images.numpy():
            expected = session.run(None, {name: image[None]})[0]
            got = next(iter(runner.infer({name: image[None]}).values()))
            step = np.ptp(expected) / 255
            assert np.abs(got - expected).max() < 2 * step
