"""Real fp32 and QDQ ONNX models of the zoo, built once per session, and digits inputs.

QDQ models come from onnxruntime's own quantizer (QDQ format, per-channel int8 weights, uint8
activations), so the adapters are tested against models made independently of this project.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_static,
)

from qat_deploy.deploy.common.environment import has_int8_dot_product
from qat_deploy.deploy.data import digits_split
from qat_deploy.models.registry import load_model

EVAL_SAMPLES = 120


class RandomReader(CalibrationDataReader):
    """A few seeded random-normal batches: calibration data without a data set."""

    def __init__(self, input_name: str, shape: tuple[int, ...], batches: int = 4) -> None:
        rng = np.random.default_rng(0)
        self._feeds = iter(
            [{input_name: rng.standard_normal(shape, dtype=np.float32)} for _ in range(batches)]
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def export_fp32(name: str, out_dir: Path) -> Path:
    model, spec = load_model(name)
    path = out_dir / f"{name}.onnx"
    with torch.no_grad():
        torch.onnx.export(model, (torch.randn(spec.input_shape),), str(path), dynamo=True)
    return path


def quantize_qdq(fp32_path: Path, out_path: Path) -> Path:
    graph_input = onnx.load(str(fp32_path), load_external_data=False).graph.input[0]
    shape = tuple(d.dim_value for d in graph_input.type.tensor_type.shape.dim)
    quantize_static(
        str(fp32_path),
        str(out_path),
        RandomReader(graph_input.name, shape),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        # 7-bit weights where onnxruntime's u8s8 kernels would saturate int16 pair sums (x86
        # without VNNI): the tool's own option for exactly that
        reduce_range=not has_int8_dot_product(),
    )
    return out_path


def output_step(qdq_path: Path) -> float:
    """Scale of the DequantizeLinear that produces the graph output: one output int8 step."""
    graph = onnx.load(str(qdq_path)).graph
    outputs = {o.name for o in graph.output}
    inits = {t.name: t for t in graph.initializer}
    (dq,) = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.output[0] in outputs]
    return float(numpy_helper.to_array(inits[dq.input[1]]))


def run_all(runner, inputs: np.ndarray) -> np.ndarray:
    """One batch-1 inference per sample (the exported models have a static batch of 1)."""
    with runner:
        (name,) = runner.get_input_metadata(use_numpy_dtypes=False).keys()
        outs = [next(iter(runner.infer({name: x[None]}).values())).copy() for x in inputs]
    return np.concatenate(outs)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def mnist_fp32(model_dir) -> Path:
    return export_fp32("mnist_cnn", model_dir)


@pytest.fixture(scope="session")
def mnist_qdq(mnist_fp32, model_dir) -> Path:
    return quantize_qdq(mnist_fp32, model_dir / "mnist_cnn.qdq.onnx")


@pytest.fixture(scope="session")
def mnist_qdq_wrong_scales(mnist_qdq, model_dir) -> Path:
    """The QDQ model with every activation scale (the QuantizeLinear ones, shared with their
    DequantizeLinear) multiplied by 10: a plausible export bug that still runs int8."""
    model = onnx.load(str(mnist_qdq))
    act_scales = {n.input[1] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    for init in model.graph.initializer:
        if init.name in act_scales:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 10, init.name))
    path = model_dir / "mnist_cnn.wrong_scales.onnx"
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="session")
def resnet18_qdq(model_dir) -> Path:
    return quantize_qdq(export_fp32("resnet18", model_dir), model_dir / "resnet18.qdq.onnx")


@pytest.fixture(scope="session")
def digits_x() -> np.ndarray:
    """Held-out real digits at the model's 16x16 input size."""
    return digits_split(upsample_to=16).x_test[:EVAL_SAMPLES]


@pytest.fixture
def infer_all() -> Callable[[object, np.ndarray], np.ndarray]:
    return run_all


@pytest.fixture
def step_of() -> Callable[[Path], float]:
    return output_step
