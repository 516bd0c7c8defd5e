"""BN folding: the folded QAT model with fake quantization off must compute what the float
model computes, in eval mode (running statistics) and in training mode (batch statistics)."""

from __future__ import annotations

import copy

import onnx
import pytest
import torch

from qat_deploy.deploy.export.qdq import export
from qat_deploy.deploy.frontend.prepare import prepare
from qat_deploy.deploy.frontend.quant_modules import QuantConvBn
from qat_deploy.deploy.lint import lint
from tests.frontend.blocks import BasicBlock, Bottleneck, InvertedResidual, randomize_bn


def _fake_quant_off(prepared):
    for fq in prepared.quantizers():
        fq.enable_fake_quant(False).enable_observer(False)
    return prepared


def _max_rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_eval_mode_matches_unfolded_float_model():
    torch.manual_seed(0)
    for cls in (BasicBlock, Bottleneck, InvertedResidual):
        model = randomize_bn(cls()).eval()
        prepared = _fake_quant_off(prepare(model, "tensorrt", torch.randn(1, 8, 8, 8))).eval()
        x = torch.randn(4, 8, 8, 8)
        with torch.no_grad():
            assert _max_rel_err(prepared(x), model(x)) < 1e-5, cls.__name__


def test_training_mode_uses_batch_statistics_like_float_bn():
    torch.manual_seed(1)
    model = randomize_bn(Bottleneck())
    prepared = _fake_quant_off(prepare(model, "openvino", torch.randn(1, 8, 8, 8)))
    reference = copy.deepcopy(model).train()
    prepared.train()
    x = torch.randn(6, 8, 8, 8) * 2 + 0.5
    assert _max_rel_err(prepared(x), reference(x)) < 1e-5
    # and the running statistics moved exactly as the float model's did
    folded = prepared.model.conv1
    assert isinstance(folded, QuantConvBn)
    torch.testing.assert_close(folded.bn.running_mean, reference.bn1.running_mean)


def test_frozen_bn_uses_running_statistics_and_stops_updating_them():
    model = randomize_bn(BasicBlock())
    prepared = _fake_quant_off(prepare(model, "tensorrt", torch.randn(1, 8, 8, 8)))
    for m in prepared.modules():
        if isinstance(m, QuantConvBn):
            m.freeze_bn()
    prepared.train()
    before = prepared.model.conv1.bn.running_mean.clone()
    x = torch.randn(4, 8, 8, 8)
    y_train = prepared(x)
    assert torch.equal(prepared.model.conv1.bn.running_mean, before)
    with torch.no_grad():
        assert _max_rel_err(y_train, model.eval()(x)) < 1e-5


def test_weight_quantizer_sees_the_folded_weight():
    model = randomize_bn(BasicBlock()).eval()
    prepared = prepare(model, "tensorrt", torch.randn(1, 8, 8, 8))
    prepared(torch.randn(1, 8, 8, 8))  # observers on: weight ranges come from folded weights
    bn = model.bn1
    folded = model.conv1.weight * (bn.weight / torch.sqrt(bn.running_var + bn.eps)).reshape(
        -1, 1, 1, 1
    )
    expected_scale = folded.abs().reshape(8, -1).max(dim=1).values / 127
    scale, _ = prepared.model.conv1.weight_quant.effective_qparams()
    torch.testing.assert_close(scale, expected_scale)


class MixedConv(torch.nn.Module):
    """Two depthwise Convs (3x3, 5x5) concatenated, then one BatchNorm over all channels:
    MixNet's mixed conv when they read the channel halves of x (lowering then merges them
    into one Conv), else Convs of two different inputs."""

    def __init__(self, c=8, split=True):
        super().__init__()
        nn = torch.nn
        self.split = split
        self.small = nn.Conv2d(c // 2, c // 2, 3, padding=1, groups=c // 2, bias=False)
        self.large = nn.Conv2d(c // 2, c // 2, 5, padding=2, groups=c // 2, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        a, b = x.chunk(2, dim=1) if self.split else (x[:, :4], torch.relu(x[:, :4]))
        return torch.relu(self.bn(torch.cat([self.small(a), self.large(b)], dim=1)))


@pytest.mark.parametrize("split", [True, False], ids=["merged", "parts"])
def test_a_batch_norm_after_a_concat_of_convs_folds_into_each_conv(split, tmp_path):
    """The BN folds into the Conv the parts merged into, or its channel slices into each part
    where they read different inputs; in eval and training mode. The export has no
    BatchNormalization left (timm MixNet-S: 34 of them ran float)."""
    torch.manual_seed(2)
    model = randomize_bn(MixedConv(split=split))
    x = torch.randn(4, 8, 8, 8)
    prepared = _fake_quant_off(prepare(model.eval(), "openvino", x[:1])).eval()
    assert sum(isinstance(m, QuantConvBn) for m in prepared.modules()) == (1 if split else 2)
    with torch.no_grad():
        assert _max_rel_err(prepared(x), model(x)) < 1e-5
    quantized = prepare(model.eval(), "openvino", x[:1])
    with torch.no_grad():
        quantized(x)
    path = export(quantized, tmp_path / "m.onnx", x[:1])
    assert "BatchNormalization" not in {n.op_type for n in onnx.load(str(path)).graph.node}
    assert lint(path, "openvino") == []
    reference = copy.deepcopy(model).train()
    prepared.train()
    assert _max_rel_err(prepared(x), reference(x)) < 1e-5  # batch statistics per channel
