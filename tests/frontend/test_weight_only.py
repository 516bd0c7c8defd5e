"""Weight-only int8 tables (BackendRules.weight_only): an Embedding's table gets per-row 8-bit
codes where the backend gathers from a compressed table (OpenVINO), and stays float where the
runtime would dequantize the whole table on every call (onnxruntime). The reference for the
codes is onnxruntime's own QuantizeLinear; for the engine, the fake-quant model."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import openvino as ov
import pytest
import torch
from onnx import helper, numpy_helper
from torch import nn

from qat_deploy.backends.openvino.runner import INFERENCE_PRECISION
from qat_deploy.deploy.export.qdq import export
from qat_deploy.deploy.frontend.prepare import prepare
from qat_deploy.deploy.lint import lint
from qat_deploy.deploy.training.calibrate import calibrate

VOCAB, DIM = 32768, 8  # rows enough that the exporter leaves per-row Q/DQ params unfolded


class TokenClassifier(nn.Module):
    """Token ids -> embedding (with a padding row) -> mean over tokens -> Linear."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM, padding_idx=0)
        self.fc = nn.Linear(DIM, 8)

    def forward(self, ids):
        return self.fc(self.embed(ids).mean(1))


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = TokenClassifier().eval()
    with torch.no_grad():  # rows of very different magnitude: one scale per row matters
        model.embed.weight.mul_(torch.logspace(-2, 1, VOCAB)[:, None])
    return model


IDS = torch.randint(0, VOCAB, (4, 12), generator=torch.Generator().manual_seed(1))


def _exported(target: str, tmp_path, **kwargs) -> tuple[onnx.ModelProto, nn.Module, nn.Module]:
    model = _model()
    prepared = prepare(model, target, IDS, **kwargs)
    calibrate(prepared, [IDS], progress=False)
    path = export(prepared, tmp_path / f"{target}.onnx", IDS)
    return onnx.load(path), prepared, model


def _table_dequantizer(model: onnx.ModelProto) -> onnx.NodeProto | None:
    producers = {o: n for n in model.graph.node for o in n.output}
    (gather,) = [n for n in model.graph.node if n.op_type == "Gather"]
    found = producers.get(gather.input[0])
    return found if found is not None and found.op_type == "DequantizeLinear" else None


def test_openvino_stores_the_table_as_per_row_int8_codes_onnxruntime_would_write(tmp_path):
    exported, _, model = _exported("openvino", tmp_path)
    dq = _table_dequantizer(exported)
    assert dq is not None
    inits = {t.name: numpy_helper.to_array(t) for t in exported.graph.initializer}
    codes, scale = inits[dq.input[0]], inits[dq.input[1]]
    assert codes.dtype == np.int8 and codes.shape == (VOCAB, DIM) and scale.shape == (VOCAB,)
    table = model.embed.weight.detach().numpy()
    reference = _ort_quantize(table, scale)
    np.testing.assert_array_equal(codes, reference)
    # per row and symmetric: every row but the all-zero padding one reaches +-127
    used = np.abs(codes).max(axis=1)
    assert used[0] == 0 and (used[1:] == 127).all()
    assert lint(exported, "openvino") == []


def _ort_quantize(table: np.ndarray, scale: np.ndarray) -> np.ndarray:
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"], axis=0)],
        "q",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, list(table.shape))],
        [helper.make_tensor_value_info("y", onnx.TensorProto.INT8, list(table.shape))],
        [
            numpy_helper.from_array(scale.astype(np.float32), "s"),
            numpy_helper.from_array(np.zeros(len(scale), np.int8), "z"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": table})[0]


def test_the_openvino_engine_computes_what_the_fake_quant_model_does(tmp_path):
    exported, prepared, model = _exported("openvino", tmp_path)
    # f32 as the adapter compiles it: with AVX-512 BF16 (Zen 4) the CPU plugin defaults to bf16,
    # 0.0055 off where the table's int8 error is 0.0195
    compiled = ov.Core().compile_model(
        ov.Core().read_model(exported.SerializeToString(), b""),
        "CPU",
        {"INFERENCE_PRECISION_HINT": INFERENCE_PRECISION},
    )
    engine = compiled({0: IDS.numpy()})[0]
    with torch.no_grad():
        fake_quant, fp32 = prepared(IDS).numpy(), model(IDS).numpy()
    # the quantization error is visible against fp32 and absent against the fake-quant
    # model (an engine reading a float table would sit at fp32's distance instead)
    quantization_error = np.abs(fake_quant - fp32).max()
    assert quantization_error > 1e-3
    assert np.abs(engine - fake_quant).max() < quantization_error / 100


def test_onnxruntime_keeps_the_table_float(tmp_path):
    exported, prepared, _ = _exported("onnxruntime", tmp_path)
    assert _table_dequantizer(exported) is None
    assert "embed" not in prepared.plan.weight_layers


@pytest.mark.parametrize("target", ["openvino"])
def test_keep_float_names_the_table_to_keep_it_float(target, tmp_path):
    exported, prepared, _ = _exported(target, tmp_path, keep_float=["embed"])
    assert prepared.plan.kept_float == ["embed"]
    assert _table_dequantizer(exported) is None
    assert lint(exported, target) == []
