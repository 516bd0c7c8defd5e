"""GELU's gate between quantizers rewritten as one Erf before a Q (backends/onnxruntime/
gelu_gate.py), checked against onnxruntime's own float Div, Erf, Add, Mul and QuantizeLinear,
and a ConvNeXt-style MLP running its GELU product in int8 on the onnxruntime engine."""

from __future__ import annotations

import collections
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper
from torch import nn

from qat_deploy.backends.onnxruntime.adapter import ADAPTER
from qat_deploy.backends.onnxruntime.gelu_gate import gelu_gate_as_erf
from qat_deploy.deploy.export.qdq import export
from qat_deploy.deploy.frontend.prepare import prepare
from qat_deploy.deploy.lint import lint
from qat_deploy.deploy.quant.fake_quant import FakeQuantize
from qat_deploy.deploy.training.calibrate import calibrate
from tests.ort_outputs import engine_cosine, ort_outputs, x_to_y_model

LITERAL = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the float ops as written, no fusion
X_SCALE, X_ZERO_POINT = 0.04, 100  # x codes cover [-4, 6.2]: erf saturates at both ends


def _gate(scale: float, zero_point: int, add: float = 1.0) -> onnx.ModelProto:
    """x -> Q -> DQ -> Div(sqrt 2) -> Erf -> Add(add) -> Mul(0.5) -> Q(scale, zp) -> DQ -> y,
    the ops torch's exporter writes for the front end's decomposed GELU."""
    inits = {
        "xs": np.float32(X_SCALE),
        "xz": np.uint8(X_ZERO_POINT),
        "root2": np.float32(math.sqrt(2.0)),
        "one": np.float32(add),
        "half": np.float32(0.5),
        "ys": np.float32(scale),
        "yz": np.uint8(zero_point),
    }
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
        helper.make_node("Div", ["xd", "root2"], ["d"]),
        helper.make_node("Erf", ["d"], ["e"]),
        helper.make_node("Add", ["e", "one"], ["a"]),
        helper.make_node("Mul", ["a", "half"], ["g"]),
        helper.make_node("QuantizeLinear", ["g", "ys", "yz"], ["gq"]),
        helper.make_node("DequantizeLinear", ["gq", "ys", "yz"], ["y"]),
    ]
    return x_to_y_model(nodes, inits, 4096)


@pytest.mark.parametrize(("scale", "zero_point"), [(1 / 254, 0), (1 / 200, 20)])
def test_the_erf_form_gives_onnxruntimes_own_codes(scale, zero_point):
    x = np.linspace(-4, 6.2, 4096, dtype=np.float32)[None]
    expected = ort_outputs(_gate(scale, zero_point), x, LITERAL)  # float gate, then QuantizeLinear
    rewritten = _gate(scale, zero_point)
    assert gelu_gate_as_erf(rewritten) == 1
    assert [n.op_type for n in rewritten.graph.node].count("Erf") == 1
    assert not {"Div", "Add", "Mul"} & {n.op_type for n in rewritten.graph.node}
    steps = np.abs(ort_outputs(rewritten, x, LITERAL) - expected) / scale
    # the Div folded into the DQ's scale rounds differently in the last float bit: a value
    # within about 1e-5 of a rounding boundary may land one code away, never more
    assert steps.max() <= 1.0 + 1e-3
    assert (steps < 1e-3).mean() > 0.99
    codes = np.round(expected / scale) + zero_point
    assert codes.min() == zero_point and codes.max() == zero_point + round(1 / scale)  # 0 and 1


@pytest.mark.parametrize(
    ("scale", "zero_point", "add"),
    [(1 / 255, 0, 1.0), (1 / 254, 2, 1.0), (1 / 254, 0, 2.0)],
    ids=["k not whole", "codes past 255", "not the gate"],
)
def test_other_quantizers_and_constants_keep_the_float_gate(scale, zero_point, add):
    model = _gate(scale, zero_point, add)
    assert gelu_gate_as_erf(model) == 0
    assert {"Div", "Add", "Mul"} <= {n.op_type for n in model.graph.node}


class _ConvNeXtMlp(nn.Module):
    """ConvNeXt's block core: depthwise Conv, then a pointwise MLP with GELU, residual."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.fc1, self.act, self.fc2 = nn.Conv2d(c, 4 * c, 1), nn.GELU(), nn.Conv2d(4 * c, c, 1)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(self.dw(x)))) + x


def test_the_engine_runs_the_gelu_product_in_int8(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(1, 8, 12, 12)
    prepared = prepare(_ConvNeXtMlp().eval(), "onnxruntime", x, reduce_range=False)
    gates = [q for q in prepared.modules() if isinstance(q, FakeQuantize) and q.scale.numel() == 1]
    calibrate(prepared, [torch.randn(8, 8, 12, 12) * 3], progress=False)
    # calibration leaves the gate's grid where the rewrite needs it (scale 1/254, codes 0..254)
    # and moves every other activation quantizer's
    on_gate_grid = [float(q.scale) == pytest.approx(1 / 254, rel=1e-6) for q in gates]
    assert sum(on_gate_grid) == 1
    path = export(prepared, tmp_path / "m.onnx", x)
    assert lint(path, "onnxruntime") == []
    engine = ADAPTER.build(path, tmp_path / "e", precision="int8", threads=1)
    assert engine.info["gelu_gate_as_erf"] == "1"
    ops = collections.Counter(n.op_type for n in onnx.load(str(engine.artifact)).graph.node)
    assert not {"Div", "Mul"} & set(ops) and ops["Add"] <= 1  # the residual, of a float input
    assert ops["Erf"] == 1 and ops["QLinearMul"] == 1 and ops["QLinearConv"] == 3
    with torch.no_grad():
        expected = prepared(x).numpy()
    # the engine computes what the fake-quant model does
    assert engine_cosine(ADAPTER, engine, x.numpy(), expected) > 0.999
