"""BN folding: the folded QAT model with fake quantization off must compute what the float
model computes, in eval mode (running statistics) and in training mode (batch statistics)."""

from __future__ import annotations

import copy

import torch

from qat_deploy.deploy.frontend.prepare import prepare
from qat_deploy.deploy.frontend.quant_modules import QuantConvBn
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
