"""Blocks of real CNNs through prepare -> export -> the CPU engines: every Conv/Linear runs an
int8 kernel, as the engine itself reports it, and the engine computes what the fake-quant
model computes. The blocks are the patterns that left layers in float before the placement
quantized each value once and ahead of pass-through ops (GhostNet, GoogLeNet, ShuffleNetV2;
on OpenVINO GoogLeNet's pools also ran in float),
and LeViT's head, which OpenVINO computed wrong before an export pass kept the mean's axes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from qat_deploy.deploy.engines.adapter import get_adapter
from qat_deploy.deploy.export.qdq import export
from qat_deploy.deploy.frontend.prepare import prepare
from qat_deploy.deploy.training.calibrate import calibrate
from qat_deploy.deploy.verify import closeness
from tests.frontend.blocks import GhostBlock, InceptionStem, TokenMeanHead, randomize_bn


def _ghost_classifier() -> nn.Module:
    """A classifier head after the block, as in GhostNet: onnxruntime runs a Conv in int8 only
    with a quantized output, which a Conv writing the graph output does not have."""
    head = (nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    return nn.Sequential(randomize_bn(GhostBlock()), *head)


BLOCKS = {
    "ghost": (_ghost_classifier, (8, 8, 8), "cnn"),
    "inception_stem": (InceptionStem, (3, 16, 16), "cnn"),  # no BatchNorm
    # OpenVINO 2026.4 fused LeViT's ReduceMean(keepdims=0) -> BatchNorm -> FakeQuantize wrongly
    "token_mean_head": (TokenMeanHead, (16, 32), "transformer"),
}


@pytest.mark.parametrize("target", ["onnxruntime", "openvino"])
@pytest.mark.parametrize("block", list(BLOCKS))
def test_every_compute_layer_runs_int8_and_matches_the_fake_quant_model(block, target, tmp_path):
    cls, shape, mode = BLOCKS[block]
    torch.manual_seed(0)
    example = torch.randn(1, *shape)
    prepared = prepare(cls().eval(), target, example, mode=mode)
    calibrate(prepared, [torch.randn(16, *shape) for _ in range(4)], progress=False)
    path = export(prepared, tmp_path / "m.qdq.onnx", example)
    adapter = get_adapter(target)
    engine = adapter.build(path, tmp_path, precision="int8", threads=1)
    report = adapter.kernel_report(engine)
    assert report.compute_layers and report.fallback_layers == [], report.fallback_layers
    if target == "openvino":  # one quantizer above a MaxPool tree keeps every pool in u8
        pools = [lp for lp in report.layers if lp.layer_type == "Pooling"]
        assert [lp.name for lp in pools if lp.precision != "int8"] == []
    x = torch.randn(32, *shape)
    with torch.no_grad():
        expected = prepared(x).numpy()
    with adapter.runner(engine) as runner:
        name = next(iter(runner.get_input_metadata()))
        got = np.concatenate(
            [next(iter(runner.infer({name: s[None]}).values())) for s in x.numpy()]
        )
    assert closeness.compare(got, expected, closeness.range_step(expected))["p999_err_steps"] < 2
