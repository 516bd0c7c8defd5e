"""Convs on the channel parts of one value, concatenated (MixNet's mixed depthwise and split
pointwise convs): lowering merges them into one grouped Conv, exactly, and the export runs
no Split or Concat between quantizers."""

from __future__ import annotations

import onnx
import pytest
import torch
from torch import nn

from qat_deploy.deploy.export.qdq import export
from qat_deploy.deploy.frontend.capture import capture
from qat_deploy.deploy.frontend.lowering import lower
from qat_deploy.deploy.frontend.prepare import prepare
from qat_deploy.deploy.lint import lint
from qat_deploy.deploy.rules.backend import available_targets

X = torch.randn(2, 8, 12, 12)


class Mixed(nn.Module):
    """Channel parts of x (sizes `sizes`) through one Conv each, concatenated."""

    def __init__(self, sizes, kernels, out=None, stride=1, depthwise=True, dilations=None):
        super().__init__()
        out = out or sizes
        dilations = dilations or [1] * len(sizes)
        self.sizes = list(sizes)
        self.parts = nn.ModuleList(
            nn.Conv2d(c, o, k, stride, k // 2 * d, d, groups=c if depthwise else 1, bias=i == 0)
            for i, (c, o, k, d) in enumerate(zip(sizes, out, kernels, dilations, strict=True))
        )

    def forward(self, x):
        pieces = torch.split(x, self.sizes, dim=1)
        return torch.cat([conv(p) for conv, p in zip(self.parts, pieces, strict=True)], dim=1)


class MixedBlock(nn.Module):
    """MixNet-like: split pointwise expansion, BN, mixed depthwise (stride 2), BN."""

    def __init__(self):
        super().__init__()
        self.pw = Mixed([4, 4], [1, 1], out=[8, 8], depthwise=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.dw = Mixed([8, 4, 4], [3, 5, 7], stride=2)
        self.bn2 = nn.BatchNorm2d(16)

    def forward(self, x):
        return self.bn2(self.dw(torch.relu(self.bn1(self.pw(x)))))


def _lowered(model: nn.Module) -> torch.fx.GraphModule:
    gm = capture(model, (X,), {})
    lower(gm)
    return gm


def _convs(gm: torch.fx.GraphModule) -> dict[str, nn.Conv2d]:
    modules = dict(gm.named_modules())
    return {
        n.target: modules[n.target]
        for n in gm.graph.nodes
        if n.op == "call_module" and isinstance(modules[n.target], nn.Conv2d)
    }


def _randomized(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 2)
    return model


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_parts_merge_into_one_grouped_conv_that_computes_the_same(train):
    model = _randomized(MixedBlock()).eval()
    gm = _lowered(model).train(train)
    model.train(train)  # BatchNorm on batch statistics, in both
    convs = _convs(gm)
    # at the path of the module that held the parts
    assert set(convs) == {"pw.parts", "dw.parts"}
    pw, dw = convs["pw.parts"], convs["dw.parts"]
    assert (pw.groups, pw.kernel_size) == (2, (1, 1))
    assert (dw.groups, dw.kernel_size, dw.stride) == (16, (7, 7), (2, 2))
    called = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert not called & {torch.ops.aten.split_with_sizes.default, torch.ops.aten.cat.default}
    with torch.no_grad():
        torch.testing.assert_close(gm(X), model(X), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "model",
    [
        Mixed([4, 4], [1, 1], out=[6, 2], depthwise=False),  # groups of different shapes
        Mixed([4, 4], [3, 3], dilations=[1, 2]),  # taps of different spacing
    ],
    ids=["unequal_groups", "dilations"],
)
def test_parts_no_grouped_conv_computes_stay_apart(model):
    gm = _lowered(model.eval())
    assert len(_convs(gm)) == 2
    with torch.no_grad():
        torch.testing.assert_close(gm(X), model(X), atol=1e-5, rtol=1e-5)


def test_a_part_read_elsewhere_keeps_the_split():
    class Tapped(Mixed):
        def forward(self, x):
            pieces = torch.split(x, self.sizes, dim=1)
            out = torch.cat([conv(p) for conv, p in zip(self.parts, pieces, strict=True)], 1)
            return out, pieces[0].mean()

    model = Tapped([4, 4], [3, 3]).eval()
    assert len(_convs(_lowered(model))) == 2


@pytest.mark.parametrize("target", available_targets())
def test_the_export_has_no_split_or_concat_and_lints_clean(target, tmp_path):
    prepared = prepare(_randomized(MixedBlock()).eval(), target, X[:1], reduce_range=False)
    with torch.no_grad():
        prepared(X)
    path = export(prepared, tmp_path / "m.onnx", X[:1])
    op_types = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert not op_types & {"Split", "Concat", "BatchNormalization"}, op_types
    assert lint(path, target) == []
