"""MatMul + bias fusion for onnxruntime (backends/onnxruntime/matmul_bias.py), on a real
exported encoder block run by onnxruntime: the reference is onnxruntime's literal execution of
the untouched QDQ graph (optimizations off)."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from qat_deploy.backends.onnxruntime.adapter import ADAPTER
from qat_deploy.backends.onnxruntime.matmul_bias import fuse_matmul_bias
from qat_deploy.deploy.export.qdq import export
from qat_deploy.deploy.frontend.prepare import prepare
from qat_deploy.deploy.training.calibrate import calibrate
from tests.frontend.blocks import EncoderBlock
from tests.ort_outputs import ort_outputs

LINEARS = 6  # q, k, v, out, fc1, fc2
SEQ = (1, 5, 16)


@pytest.fixture(scope="module")
def encoder_qdq(tmp_path_factory) -> str:
    torch.manual_seed(0)
    prepared = prepare(EncoderBlock().eval(), "onnxruntime", torch.randn(*SEQ))
    calibrate(prepared, [torch.randn(*SEQ) for _ in range(8)], progress=False)
    return str(export(prepared, tmp_path_factory.mktemp("enc") / "enc.onnx", torch.randn(*SEQ)))


def _optimized_ops(model: onnx.ModelProto, tmp_path) -> collections.Counter:
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node)


def test_every_linear_becomes_one_int8_kernel_with_its_bias(encoder_qdq, tmp_path):
    original = onnx.load(encoder_qdq)
    fused = onnx.load(encoder_qdq)
    assert fuse_matmul_bias(fused) == LINEARS
    onnx.checker.check_model(fused, full_check=True)
    before, after = _optimized_ops(original, tmp_path), _optimized_ops(fused, tmp_path)
    assert after["MatMulIntegerToFloat"] == before["MatMulIntegerToFloat"] == LINEARS
    assert before["Add"] - after["Add"] == LINEARS  # the bias Adds, and nothing else


def test_fused_graph_computes_what_the_qdq_graph_states(encoder_qdq):
    fused = onnx.load(encoder_qdq)
    fuse_matmul_bias(fused)
    x = np.random.default_rng(0).standard_normal(SEQ).astype(np.float32)
    literal = ort_outputs(encoder_qdq, x, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    got = ort_outputs(fused, x)
    np.testing.assert_allclose(got, literal, rtol=1e-5, atol=1e-5)


def test_adapter_builds_and_runs_the_fused_graph(encoder_qdq, tmp_path):
    engine = ADAPTER.build(encoder_qdq, tmp_path, precision="int8", threads=1)
    assert engine.info["matmul_bias_fused"] == str(LINEARS)
    assert engine.onnx_path == tmp_path / "engine.onnxruntime.input.onnx"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "engine.onnxruntime.input.onnx",
        "engine.onnxruntime.onnx",
    ]
    report = ADAPTER.kernel_report(engine)
    assert len(report.int8_compute) >= LINEARS
    x = np.random.default_rng(1).standard_normal(SEQ).astype(np.float32)
    with ADAPTER.runner(engine) as runner:
        name = next(iter(runner.get_input_metadata()))
        got = next(iter(runner.infer({name: x}).values()))
    literal = ort_outputs(encoder_qdq, x, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    np.testing.assert_allclose(got, literal, rtol=1e-5, atol=1e-5)


def test_graphs_without_the_pattern_are_built_as_given(mnist_qdq, tmp_path):
    engine = ADAPTER.build(mnist_qdq, tmp_path, precision="int8", threads=1)
    assert engine.onnx_path == mnist_qdq and engine.info["matmul_bias_fused"] == "0"


def test_signed_activations_are_left_to_onnxruntime(tmp_path):
    """OpenVINO-style int8 activations: onnxruntime keeps s8 x s8 off its x86 int8 path (it
    measured 4x slower when forced), so the pass must not force it either."""
    torch.manual_seed(0)
    prepared = prepare(EncoderBlock().eval(), "openvino", torch.randn(*SEQ))
    calibrate(prepared, [torch.randn(*SEQ) for _ in range(4)], progress=False)
    path = export(prepared, tmp_path / "enc_s8.onnx", torch.randn(*SEQ))
    assert fuse_matmul_bias(onnx.load(str(path))) == 0
