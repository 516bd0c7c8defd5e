"""FakeQuantize module: switches, state_dict round-trip, learnable scales, export form."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from qat_deploy.deploy.common.errors import BadInputError
from qat_deploy.deploy.quant import (
    INT8_SYM_ACT,
    INT8_WEIGHT,
    UINT8_AFFINE_ACT,
    FakeQuantize,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    QuantSpec,
)


def test_observer_switch_freezes_range():
    fq = FakeQuantize(UINT8_AFFINE_ACT)
    fq(torch.tensor([-1.0, 1.0]))
    scale = fq.scale.clone()
    fq.enable_observer(False)
    fq(torch.tensor([-10.0, 10.0]))
    assert torch.equal(fq.scale, scale)
    fq.enable_observer(True)
    fq(torch.tensor([-10.0, 10.0]))
    assert fq.scale.item() > scale.item()


def test_fake_quant_switch_gives_identity_but_keeps_observing():
    fq = FakeQuantize(INT8_SYM_ACT).enable_fake_quant(False)
    x = torch.randn(100)
    assert torch.equal(fq(x), x)
    assert fq.observer.has_data
    fq.enable_fake_quant(True)
    y = fq(x)
    assert not torch.equal(y, x)
    assert (y - x).abs().max() <= fq.scale / 2 + 1e-7


@pytest.mark.parametrize("learnable", [False, True])
def test_state_dict_round_trip(learnable):
    torch.manual_seed(0)
    spec = QuantSpec(bits=8, signed=True, symmetric=True, axis=0, narrow_range=True)
    src = FakeQuantize(spec, MovingAverageMinMaxObserver, channels=4, learnable=learnable)
    for _ in range(3):
        src(torch.randn(4, 10) * 3)
    src.enable_observer(False)
    dst = FakeQuantize(spec, MovingAverageMinMaxObserver, channels=4, learnable=learnable)
    dst.load_state_dict(src.state_dict())
    assert not bool(dst.observer_enabled) and bool(dst.fake_quant_enabled)
    assert torch.equal(dst.observer.min_val, src.observer.min_val)
    x = torch.randn(4, 10) * 3
    assert torch.equal(dst(x), src(x))


def test_learnable_scale_is_a_parameter_initialised_by_the_observer():
    fq = FakeQuantize(UINT8_AFFINE_ACT, learnable=True)
    names = {n for n, _ in fq.named_parameters()}
    assert names == {"scale", "zero_point"}
    fq(torch.tensor([-1.0, 3.0]))
    assert fq.scale.item() == pytest.approx(4.0 / 255)
    fq.enable_observer(False)
    x = torch.randn(64) * 2
    fq(x).pow(2).sum().backward()
    assert fq.scale.grad is not None and fq.scale.grad.abs().item() > 0


def test_learnable_symmetric_zero_point_is_frozen():
    fq = FakeQuantize(INT8_SYM_ACT, learnable=True)
    assert not fq.zero_point.requires_grad


def test_narrow_range_exports_as_int8_full_range_and_low_bits_refuse():
    fq = FakeQuantize(INT8_WEIGHT, channels=2)
    assert fq.export_range() == (-128, 127)
    low = FakeQuantize(QuantSpec(bits=4))
    low.location = "fc.weight"
    with pytest.raises(BadInputError, match="fc.weight.*8-bit"):
        low.export_range()


def test_per_channel_needs_channels():
    with pytest.raises(BadInputError):
        FakeQuantize(INT8_WEIGHT)


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.act = FakeQuantize(UINT8_AFFINE_ACT, MinMaxObserver)

    def forward(self, x):
        return self.act(x) * 2.0


def test_export_mode_becomes_quantize_dequantize_in_onnx(tmp_path):
    """The exported Q/DQ pair, run by onnxruntime, reproduces the core's fake quantization."""
    model = _Tiny().eval()
    model(torch.randn(2, 16) * 3)
    model.act.enable_observer(False)
    x = torch.randn(2, 16) * 4
    expected = model(x).numpy()
    model.act.set_export_mode(True)
    path = tmp_path / "tiny.onnx"
    with torch.no_grad():
        torch.onnx.export(model, (x,), str(path), dynamo=True, opset_version=17)
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    np.testing.assert_array_equal(got, expected)
