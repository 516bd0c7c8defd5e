"""The fake-quant model computes what the int8 engines compute (deploy/frontend/arithmetic.py).

Each engine here runs for real. An emulation is right when switching it off makes the engine
disagree more with the fake-quant model: the comparison is engine vs model, never model vs a
copy of its own formula.
"""

from __future__ import annotations

import io

import numpy as np
import onnx
import onnxruntime as ort
import openvino as ov
import pytest
import torch
from onnx import numpy_helper
from rich.console import Console
from torch import nn

from qat_deploy.deploy.export.qdq import export
from qat_deploy.deploy.frontend.prepare import prepare
from qat_deploy.deploy.frontend.quant_modules import BIASED_KINDS
from qat_deploy.deploy.quant.fake_quant import FakeQuantize
from qat_deploy.deploy.training.calibrate import calibrate
from qat_deploy.deploy.verify import closeness
from tests.frontend.blocks import InvertedResidual, conv_bn, randomize_bn
from tests.ort_outputs import ort_outputs

BLOCKS = 4
#: input channels: 4, so the stem is no thin RGB Conv that onnxruntime's rules keep float
CHANNELS = 4


def residual_stack() -> nn.Module:
    """A MobileNetV2-like stem and inverted residuals: Conv->ReLU6, linear bottleneck + Add."""
    torch.manual_seed(0)
    blocks = [InvertedResidual(8) for _ in range(BLOCKS)]
    model = nn.Sequential(*conv_bn(CHANNELS, 8), nn.ReLU6(), *blocks)
    return randomize_bn(model).eval()


@pytest.fixture(scope="module")
def inputs() -> torch.Tensor:
    return torch.randn(64, CHANNELS, 16, 16, generator=torch.Generator().manual_seed(1))


def _prepared(target: str):
    example = torch.randn(1, CHANNELS, 16, 16)
    prepared = prepare(residual_stack(), target, example)
    calibrate(prepared, [torch.randn(16, CHANNELS, 16, 16) for _ in range(4)], progress=False)
    return prepared, example


def _weighted(prepared):
    return [m for m in prepared.model.modules() if getattr(m, "op_kind", None) in BIASED_KINDS]


def _fake_quant(prepared, inputs) -> np.ndarray:
    with torch.no_grad():
        return prepared(inputs).numpy()


def _mean_err_steps(engine: np.ndarray, reference: np.ndarray) -> float:
    return float(np.mean(np.abs(engine - reference)) / closeness.range_step(reference))


def test_only_onnxruntime_rounds_biases_and_only_openvino_skips_add_rounding():
    for target, rounds_bias, unrounded in (
        ("onnxruntime", True, 0),
        ("openvino", False, BLOCKS),
        ("tensorrt", False, 0),
    ):
        prepared, _ = _prepared(target)
        linked = [m._bias_source is not None for m in _weighted(prepared)]
        assert linked and all(x == rounds_bias for x in linked), target
        quantizers = [m for m in prepared.model.modules() if isinstance(m, FakeQuantize)]
        assert sum(not q.rounding for q in quantizers) == unrounded, target
        console = Console(width=400, record=True, file=io.StringIO())
        console.print(prepared.plan.table(prepared))
        assert console.export_text().count("clamp only") == unrounded, target


def test_onnxruntime_engine_agrees_with_the_rounded_bias_model(tmp_path, inputs):
    prepared, example = _prepared("onnxruntime")
    path = export(prepared, tmp_path / "m.onnx", example)
    graph = onnx.load(str(path)).graph
    conv_biases = [n.input[2] for n in graph.node if n.op_type == "Conv"]
    producers = {o: n for n in graph.node for o in n.output}
    assert conv_biases and all(producers[b].op_type == "DequantizeLinear" for b in conv_biases)
    engine = ort_outputs(path, inputs.numpy())
    emulated = _fake_quant(prepared, inputs)
    for module in _weighted(prepared):
        module.__dict__["_bias_source"] = None
    float_bias = _fake_quant(prepared, inputs)
    # measured: 4e-5 vs 9e-3 mean steps
    assert _mean_err_steps(engine, emulated) < 0.1 * _mean_err_steps(engine, float_bias)


def test_onnxruntime_reference_semantics_of_the_export_match_the_model(tmp_path, inputs):
    """With graph optimizations off onnxruntime evaluates the Q/DQ graph literally, int32
    bias DequantizeLinear included: the same function as the fake-quant model."""
    prepared, example = _prepared("onnxruntime")
    path = export(prepared, tmp_path / "m.onnx", example)
    literal = ort_outputs(path, inputs.numpy(), ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    model = onnx.load(str(path))
    assert any(numpy_helper.to_array(t).dtype == np.int32 for t in model.graph.initializer)
    metrics = closeness.compare(literal, _fake_quant(prepared, inputs), None)
    assert metrics["p999_err_steps"] <= 1.0 and metrics["top1_agreement"] == 1.0


def test_openvino_engine_agrees_with_unrounded_fused_add_operands(tmp_path, inputs):
    prepared, example = _prepared("openvino")
    path = export(prepared, tmp_path / "m.onnx", example)
    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    engine = np.concatenate([compiled(x[None].numpy())[0] for x in inputs])
    emulated = _fake_quant(prepared, inputs)
    for module in prepared.model.modules():
        if isinstance(module, FakeQuantize):
            module.rounding = True
    rounding = _fake_quant(prepared, inputs)
    # measured: 0.11 vs 0.34 mean steps (OpenVINO also reorders float requantization math)
    assert _mean_err_steps(engine, emulated) < 0.5 * _mean_err_steps(engine, rounding)


@pytest.mark.parametrize("target", ["onnxruntime", "openvino"])
def test_qat_gradients_flow_through_both_emulations(target, inputs):
    example = torch.randn(1, CHANNELS, 16, 16)
    prepared = prepare(residual_stack(), target, example, learnable=True)
    calibrate(prepared, [torch.randn(16, CHANNELS, 16, 16) for _ in range(2)], progress=False)
    prepared.model.eval()
    prepared(inputs[:8]).square().mean().backward()
    biases = [m.conv.bias for m in _weighted(prepared) if getattr(m, "bn", None) is not None]
    betas = [m.bn.bias.grad for m in _weighted(prepared) if getattr(m, "bn", None) is not None]
    assert biases == [None] * len(biases)  # bias-free convs: BN's beta is the folded bias
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in betas)
    for q in prepared.model.modules():
        if isinstance(q, FakeQuantize) and not q.rounding:
            assert q.scale.grad is not None and torch.isfinite(q.scale.grad).all()


class ParentResidual(nn.Module):
    """relu(y + conv(y)): the Add's other operand is the Conv's own input."""

    def __init__(self, c=8):
        super().__init__()
        self.stem, self.relu = nn.Conv2d(CHANNELS, c, 3, padding=1), nn.ReLU()
        self.conv, self.bn = conv_bn(c, c)

    def forward(self, x):
        y = self.relu(self.stem(x))
        return self.relu(y + self.bn(self.conv(y)))


def test_openvino_rounds_an_add_whose_operand_is_the_convs_own_input(tmp_path, inputs):
    """OpenVINO does not fuse x + conv(x) into the Conv: that Add's operands both round."""
    torch.manual_seed(0)
    example = torch.randn(1, CHANNELS, 16, 16)
    prepared = prepare(randomize_bn(ParentResidual()).eval(), "openvino", example)
    calibrate(prepared, [torch.randn(16, CHANNELS, 16, 16) for _ in range(4)], progress=False)
    assert all(q.rounding for q in prepared.model.modules() if isinstance(q, FakeQuantize))
    path = export(prepared, tmp_path / "m.onnx", example)
    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    engine = np.concatenate([compiled(x[None].numpy())[0] for x in inputs])
    # measured by a helper on a similar block: 3e-5 mean steps rounding, 0.30 unrounded
    assert _mean_err_steps(engine, _fake_quant(prepared, inputs)) < 0.05
