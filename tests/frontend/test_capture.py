"""Graph capture: untraceable models fall back, naming the module that stopped the tracer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deploy.errors import BadInputError
from deploy.prepare import prepare


class DataDependentGate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # Python control flow on a tensor: fx cannot trace this
            return x
        return -x


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.gate = DataDependentGate()
        self.fc = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x):
        return self.fc(torch.flatten(self.gate(self.conv(x)), 1))


def test_untraceable_model_falls_back_and_names_the_module():
    x = torch.randn(2, 3, 8, 8)
    with pytest.warns(UserWarning, match=r"module 'gate'.*fell back.*2 Conv/Linear"):
        prepared = prepare(Untraceable(), "onnxruntime", x)
    plan = prepared.plan
    assert plan.mode == "fallback" and "gate" in plan.fallback_reason
    assert plan.weight_layers == {"conv", "fc"}
    assert {s.producer for s in plan.sites if s.role == "activation"} == {"conv", "fc"}
    assert prepared(x).shape == (2, 5)


def test_unknown_target_and_bad_example_input():
    with pytest.raises(BadInputError, match="unknown target 'tensorrtx'.*onnxruntime"):
        prepare(nn.Linear(4, 2), "tensorrtx", torch.randn(1, 4))
    with pytest.raises(BadInputError, match=r"example input of shape \(1, 5\) does not fit"):
        prepare(nn.Linear(4, 2), "openvino", torch.randn(1, 5))


def test_prepare_leaves_the_users_model_untouched():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prepare(model, "tensorrt", torch.randn(1, 3, 8, 8))
    assert isinstance(model[1], nn.BatchNorm2d)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_summary_lists_every_quantizer_with_its_scales():
    from rich.console import Console

    prepared = prepare(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), "openvino", torch.randn(1, 3, 8, 8)
    )
    prepared(torch.randn(2, 3, 8, 8))
    console = Console(record=True, width=200)
    console.print(prepared.summary())
    text = console.export_text()
    assert "int8 sym narrow per-channel(axis=0)" in text and "uint8 affine per-tensor" in text
    assert "uncalibrated" not in text
