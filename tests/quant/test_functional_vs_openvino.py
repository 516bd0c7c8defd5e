"""scale_shift_fake_quantize must pick OpenVINO's CPU FakeQuantize (a Q->DQ pair in ONNX)
integer code for every value, where plain ONNX arithmetic does not: near-ties round
differently when the engine multiplies by levels / range and adds a shift instead of dividing
by the scale. (The dequantized float may differ in its last bits: OpenVINO writes it as a
multiply-add of the code, which int8 consumers never see.)"""

from __future__ import annotations

import numpy as np
import openvino as ov
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from qat_deploy.deploy.quant import QuantSpec, fake_quantize
from qat_deploy.deploy.quant.functional import scale_shift_fake_quantize


def _openvino_qdq(x: np.ndarray, scale: float, zero_point: int, spec: QuantSpec) -> np.ndarray:
    dtype = np.int8 if spec.signed else np.uint8
    inits = [
        numpy_helper.from_array(np.array(scale, np.float32), "s"),
        numpy_helper.from_array(np.array(zero_point, dtype), "z"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    core = ov.Core()
    compiled = core.compile_model(
        core.read_model(model.SerializeToString(), b""), "CPU", {"INFERENCE_PRECISION_HINT": "f32"}
    )
    return compiled(x)[0]


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_scale_shift_matches_openvino_where_division_does_not(signed, seed):
    rng = np.random.default_rng(seed)
    spec = QuantSpec(bits=8, signed=signed, symmetric=signed)
    scale = float(rng.uniform(0.003, 0.2))
    zero_point = 0 if signed else int(rng.integers(0, 256))
    codes = rng.integers(spec.qmin - 20, spec.qmax + 20, size=(4, 4096)).astype(np.float32)
    near_ties = (codes - zero_point + 0.5) * np.float32(scale)  # values next to a tie
    x = np.nextafter(near_ties, near_ties + rng.choice([-1, 1], near_ties.shape)).astype(np.float32)
    s, z = torch.tensor(scale), torch.tensor(zero_point)

    def codes(values: np.ndarray) -> np.ndarray:
        return np.round(values.astype(np.float64) / np.float32(scale)) + zero_point

    engine = codes(_openvino_qdq(x, scale, zero_point, spec))
    emulated = codes(scale_shift_fake_quantize(torch.from_numpy(x), s, z, spec).numpy())
    plain = codes(fake_quantize(torch.from_numpy(x), s, z, spec).numpy())
    assert np.array_equal(emulated, engine)
    assert not np.array_equal(plain, engine)  # the case the emulation exists for
