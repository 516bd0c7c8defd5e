"""Parallel-branch sums (RepVGG, ACNet in training form): lowering merges the Conv branches
into one Conv, exactly; the CPU backends leave the remaining sum float, and lint agrees."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qat_deploy.deploy.export.qdq import export
from qat_deploy.deploy.frontend.capture import capture
from qat_deploy.deploy.frontend.lowering import lower
from qat_deploy.deploy.frontend.prepare import prepare
from qat_deploy.deploy.lint import lint
from tests.frontend.blocks import RepVGGBlock, conv_bn, randomize_bn

IMG = torch.randn(2, 8, 10, 10)


class ACNetBlock(nn.Module):
    """Asymmetric convolution block: 3x3 + 1x3 + 3x1 Conv+BN branches of one input."""

    def __init__(self, c=8):
        super().__init__()
        self.square, self.bn_s = conv_bn(c, c, 3)
        self.hor = nn.Conv2d(c, c, (1, 3), padding=(0, 1), bias=False)
        self.ver = nn.Conv2d(c, c, (3, 1), padding=(1, 0), bias=True)
        self.bn_h = nn.BatchNorm2d(c)

    def forward(self, x):
        return self.bn_s(self.square(x)) + self.bn_h(self.hor(x)) + self.ver(x)


class DepthwisePlusPointwise(nn.Module):
    """Branches of one input that differ in groups: no single Conv computes their sum."""

    def __init__(self, c=8):
        super().__init__()
        self.dw, self.bn_dw = conv_bn(c, c, 3, groups=c)
        self.pw, self.bn_pw = conv_bn(c, c, 1)

    def forward(self, x):
        return self.bn_dw(self.dw(x)) + self.bn_pw(self.pw(x))


class MobileOneBlock(nn.Module):
    """MobileOne / FastViT in training form: the identity BN added between the Conv branches,
    (Conv1x1+BN(x) + BN(x)) + Conv3x3+BN(x)."""

    def __init__(self, c=8):
        super().__init__()
        self.scale, self.bn_scale = conv_bn(c, c, 1)
        self.identity = nn.BatchNorm2d(c)
        self.kxk, self.bn_kxk = conv_bn(c, c, 3)

    def forward(self, x):
        out = self.bn_scale(self.scale(x)) + self.identity(x)
        return out + self.bn_kxk(self.kxk(x))


class SharedConv(nn.Module):
    """One Conv called on two inputs and summed: merging would change its other call."""

    def __init__(self, c=8):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(x) + self.conv(torch.relu(x))


def _lowered(model: nn.Module) -> torch.fx.GraphModule:
    gm = capture(model, (IMG,), {})
    lower(gm)
    return gm


def _count(gm: torch.fx.GraphModule, cls: type) -> int:
    modules = dict(gm.named_modules())
    return sum(n.op == "call_module" and isinstance(modules[n.target], cls) for n in gm.graph.nodes)


@pytest.mark.parametrize(
    ("model", "convs", "bns"),
    [
        (RepVGGBlock(), 1, 1),  # the identity BN is no Conv: it stays a branch
        (RepVGGBlock(dilation=2), 1, 1),
        (ACNetBlock(), 1, 0),
        (DepthwisePlusPointwise(), 2, 2),
        (SharedConv(), 2, 0),
        (MobileOneBlock(), 1, 1),
    ],
    ids=[
        "repvgg",
        "repvgg_dilated",
        "acnet",
        "depthwise_plus_pointwise",
        "shared_conv",
        "mobileone",
    ],
)
def test_parallel_conv_branches_become_one_conv_that_computes_the_same(model, convs, bns):
    model = randomize_bn(model).eval()
    gm = _lowered(model)
    assert _count(gm, nn.Conv2d) == convs
    assert _count(gm, nn.BatchNorm2d) == bns
    with torch.no_grad():
        torch.testing.assert_close(gm(IMG), model(IMG), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block", [RepVGGBlock, MobileOneBlock])
@pytest.mark.parametrize("target", ["tensorrt", "openvino", "onnxruntime"])
def test_a_branch_sum_is_quantized_once_where_the_backend_keeps_it_float(block, target, tmp_path):
    """The identity BN's output is the one branch no per-tensor scale fits: no backend
    quantizes it into the Add (onnxruntime still quantizes the merged Conv's output:
    QLinearConv writes int8)."""
    prepared = prepare(randomize_bn(block()), target, IMG, reduce_range=False)
    quantized = {value for value, _ in prepared.plan.activation_edges}
    assert "identity" not in quantized
    with torch.no_grad():
        prepared(IMG)
    assert lint(export(prepared, tmp_path / "m.onnx", IMG), target) == []


@pytest.mark.parametrize("target", ["tensorrt", "openvino", "onnxruntime"])
def test_a_residual_add_is_no_branch_sum(target):
    """x + Conv(x): x is not a branch of itself, so the Add keeps each backend's residual
    rule: both inputs quantized on the CPU backends, the skip input alone on TensorRT."""

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = conv_bn(8, 8, 3)

        def forward(self, x):
            return x + self.bn(self.conv(x))

    prepared = prepare(randomize_bn(Residual()), target, IMG, reduce_range=False)
    into_adds = {edge for edge in prepared.plan.activation_edges if edge[1].startswith("add")}
    assert len(into_adds) == (1 if target == "tensorrt" else 2)


class RepMixer(nn.Module):
    """FastViT's token mixer: x + (Conv(x) + BN_a(x)) - BN_b(x), two identity BatchNorms of one
    input (MobileOne blocks in training form)."""

    def __init__(self, c=8):
        super().__init__()
        self.conv, self.bn_conv = conv_bn(c, c, 3)
        self.bn_a, self.bn_b = nn.BatchNorm2d(c), nn.BatchNorm2d(c)

    def forward(self, x):
        return x + (self.bn_conv(self.conv(x)) + self.bn_a(x)) - self.bn_b(x)


@pytest.mark.parametrize("equal", [True, False])
@pytest.mark.parametrize("target", ["tensorrt", "openvino", "onnxruntime"])
def test_equal_norms_of_one_value_are_one_value_as_in_the_export(equal, target, tmp_path):
    """At equal tensors the exporter merges BN_a and BN_b into one node read twice (timm
    FastViT-T8 at random weights: 20 lint violations on onnxruntime, exit 4): lowering does
    too, so the sum is no private branch sum and the export lints clean."""
    model = randomize_bn(RepMixer())
    if equal:
        model.bn_b.load_state_dict(model.bn_a.state_dict())
    model.eval()
    gm = _lowered(model)
    assert _count(gm, nn.BatchNorm2d) == (2 if equal else 3)  # bn_conv folds later, in prepare
    with torch.no_grad():
        torch.testing.assert_close(gm(IMG), model(IMG), atol=1e-5, rtol=1e-5)
    prepared = prepare(model, target, IMG, reduce_range=False)
    with torch.no_grad():
        prepared(IMG)
    assert lint(export(prepared, tmp_path / "m.onnx", IMG), target) == []
