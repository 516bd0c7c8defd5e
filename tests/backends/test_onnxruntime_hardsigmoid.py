"""HardSigmoid between quantizers rewritten as an Add before a Q (backends/onnxruntime/
hardsigmoid.py), checked against onnxruntime's own float HardSigmoid + QuantizeLinear, and
HardSwish running in int8 on the onnxruntime engine."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper
from torch import nn

from qat_deploy.backends.onnxruntime.adapter import ADAPTER
from qat_deploy.backends.onnxruntime.hardsigmoid import hardsigmoid_as_add
from qat_deploy.deploy.export.qdq import export
from qat_deploy.deploy.frontend.prepare import prepare
from qat_deploy.deploy.lint import lint
from qat_deploy.deploy.training.calibrate import calibrate
from tests.ort_outputs import engine_cosine, x_to_y_model

X_SCALE, X_ZERO_POINT = 0.05, 128  # x codes cover about [-6.4, 6.35]: both clip points


def _gate(alpha: float, beta: float, scale: float, zero_point: int) -> onnx.ModelProto:
    """x -> Q -> DQ -> HardSigmoid -> Q(scale, zero_point) -> DQ -> y."""
    inits = {
        "xs": np.float32(X_SCALE),
        "xz": np.uint8(X_ZERO_POINT),
        "ys": np.float32(scale),
        "yz": np.uint8(zero_point),
    }
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
        helper.make_node("HardSigmoid", ["xd"], ["h"], alpha=alpha, beta=beta),
        helper.make_node("QuantizeLinear", ["h", "ys", "yz"], ["hq"]),
        helper.make_node("DequantizeLinear", ["hq", "ys", "yz"], ["y"]),
    ]
    return x_to_y_model(nodes, inits, 4096)


def _run(model: onnx.ModelProto, x: np.ndarray, optimize: bool) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    session = ort.InferenceSession(model.SerializeToString(), options, ["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize(("alpha", "beta"), [(1 / 6, 0.5), (0.2, 0.5)])
@pytest.mark.parametrize("scale", [1 / 255, 0.9 / 255])
def test_the_add_form_gives_onnxruntimes_own_codes(alpha, beta, scale):
    x = np.linspace(-8, 8, 4096, dtype=np.float32)[None]
    original = _gate(alpha, beta, scale, 0)
    expected = _run(original, x, optimize=False)  # float HardSigmoid, then QuantizeLinear
    rewritten = _gate(alpha, beta, scale, 0)
    assert hardsigmoid_as_add(rewritten) == 1
    assert "HardSigmoid" not in {n.op_type for n in rewritten.graph.node}
    got = _run(rewritten, x, optimize=True)  # onnxruntime's QLinearAdd
    steps = np.abs(got - expected) / scale
    # QLinearAdd rescales in its own float arithmetic: a value near a rounding boundary may
    # land one code away (1-2% of these x codes), never more
    assert steps.max() <= 1.0 + 1e-3
    assert (steps < 1e-3).mean() > 0.95
    assert expected.min() == 0 and expected.max() == pytest.approx(255 * scale)  # both clips


@pytest.mark.parametrize(
    ("scale", "zero_point"), [(1 / 255, 128), (2 / 255, 0)], ids=["signed", "wider"]
)
def test_a_quantizer_reaching_outside_zero_to_one_keeps_the_hardsigmoid(scale, zero_point):
    model = _gate(1 / 6, 0.5, scale, zero_point)
    assert hardsigmoid_as_add(model) == 0
    assert "HardSigmoid" in {n.op_type for n in model.graph.node}


class _HardSwishBlock(nn.Module):
    """MobileNetV3's inverted residual core: Conv, HardSwish, squeeze-excite gated by a
    HardSigmoid, Conv."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.expand, self.act = nn.Conv2d(c, 2 * c, 1), nn.Hardswish()
        self.reduce, self.fc = nn.Conv2d(2 * c, c, 1), nn.Conv2d(c, 2 * c, 1)
        self.gate, self.project = nn.Hardsigmoid(), nn.Conv2d(2 * c, c, 1)

    def forward(self, x):
        y = self.act(self.expand(x))
        g = self.gate(self.fc(torch.relu(self.reduce(y.mean((2, 3), keepdim=True)))))
        return self.project(y * g) + x


def test_the_engine_runs_hardswish_and_the_gate_in_int8(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(1, 8, 8, 8)
    prepared = prepare(_HardSwishBlock().eval(), "onnxruntime", x, reduce_range=False)
    calibrate(prepared, [torch.randn(8, 8, 8, 8)], progress=False)
    path = export(prepared, tmp_path / "m.onnx", x)
    assert lint(path, "onnxruntime") == []
    engine = ADAPTER.build(path, tmp_path / "e", precision="int8", threads=1)
    assert engine.info["hardsigmoid_as_add"] == "2"  # the HardSwish's and the gate's
    ops = collections.Counter(n.op_type for n in onnx.load(str(engine.artifact)).graph.node)
    assert not {"HardSigmoid", "HardSwish", "Mul"} & set(ops)  # no float elementwise left
    assert ops["QLinearAdd"] >= 2 and ops["QLinearMul"] == 2
    with torch.no_grad():
        expected = prepared(x).numpy()
    # the engine computes what the fake-quant model does
    assert engine_cosine(ADAPTER, engine, x.numpy(), expected) > 0.999
