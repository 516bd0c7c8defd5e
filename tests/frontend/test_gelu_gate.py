"""GELU written out for onnxruntime (frontend/lowering.py): x * gate, the gate quantized on a
fixed grid; the float function unchanged; other backends and the tanh form left alone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qat_deploy.deploy.frontend.prepare import prepare
from qat_deploy.deploy.quant import FakeQuantize, FixedRangeObserver
from qat_deploy.deploy.quant.fake_quant import fake_quant_only


class _Mlp(nn.Module):
    def __init__(self, approximate: str = "none") -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 64), nn.Linear(64, 16)
        self.act = nn.GELU(approximate=approximate)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


X = torch.randn(8, 16) * 3


def _fixed(prepared) -> list[FakeQuantize]:
    return [
        q
        for q in prepared.modules()
        if isinstance(q, FakeQuantize) and isinstance(q.observer, FixedRangeObserver)
    ]


def test_onnxruntime_quantizes_the_gate_on_a_fixed_grid_and_keeps_the_float_function():
    model = _Mlp().eval()
    prepared = prepare(model, "onnxruntime", X[:1], reduce_range=False)
    (gate,) = _fixed(prepared)
    assert float(gate.scale) == pytest.approx(1 / 254, rel=1e-6) and int(gate.zero_point) == 0
    assert "act" not in prepared.plan.float_ops  # the product is a quantized Mul now
    quantizers = [q for q in prepared.modules() if isinstance(q, FakeQuantize)]
    with torch.no_grad(), fake_quant_only(quantizers):
        assert torch.allclose(prepared(X), model(X), atol=1e-6)  # the same float function


@pytest.mark.parametrize(
    ("target", "approximate"),
    [
        ("openvino", "none"),
        ("tensorrt", "none"),
        ("onnxruntime", "tanh"),
    ],
)
def test_other_backends_and_the_tanh_form_keep_one_float_gelu(target, approximate):
    prepared = prepare(_Mlp(approximate).eval(), target, X[:1], reduce_range=False)
    assert _fixed(prepared) == []
    assert "act" in prepared.plan.float_ops
