"""onnxruntime adapter on real exported models: artifact, runner, and the int8 kernel proof."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from qat_deploy.backends.onnxruntime.adapter import ADAPTER, graph_precisions
from qat_deploy.deploy.common.errors import BadInputError, CheckFailedError
from qat_deploy.deploy.engines.adapter import get_adapter
from qat_deploy.deploy.export.qdq import export
from qat_deploy.deploy.frontend.prepare import prepare
from qat_deploy.deploy.training.calibrate import calibrate
from qat_deploy.deploy.verify import closeness
from tests.ort_outputs import ort_outputs


def kinds(report) -> list[str]:
    return sorted(layer.compute_kind for layer in report.compute_layers)


def test_registered_under_its_target_and_always_available():
    assert get_adapter("onnxruntime") is ADAPTER
    assert ADAPTER.name == "onnxruntime"
    assert ADAPTER.unavailable_reason() is None


def test_qdq_mnist_runs_both_convs_and_the_fc_as_int8_kernels(mnist_qdq, tmp_path):
    report = ADAPTER.kernel_report(ADAPTER.build(mnist_qdq, tmp_path, precision="int8", threads=1))
    assert kinds(report) == ["conv", "conv", "linear"]
    assert report.fallback_layers == []
    assert len(report.int8_compute) == 3 and report.int8_fraction == 1.0
    assert {layer.layer_type for layer in report.compute_layers} == {"QLinearConv", "QGemm"}


def test_fp32_mnist_reports_every_layer_float(mnist_fp32, tmp_path):
    report = ADAPTER.kernel_report(ADAPTER.build(mnist_fp32, tmp_path, precision="fp32", threads=1))
    assert kinds(report) == ["conv", "conv", "linear"]
    assert report.int8_compute == [] and report.int8_fraction == 0.0
    assert report.layers and {layer.precision for layer in report.layers} == {"float"}


def test_resnet18_qdq_runs_all_21_conv_and_gemm_layers_int8(resnet18_qdq, tmp_path):
    report = ADAPTER.kernel_report(
        ADAPTER.build(resnet18_qdq, tmp_path, precision="int8", threads=2)
    )
    assert len(report.compute_layers) == 21  # 20 convolutions (3 of them downsample) + fc
    assert report.fallback_layers == []


def test_artifact_is_the_saved_optimized_graph_and_nothing_else(mnist_qdq, tmp_path):
    engine = ADAPTER.build(mnist_qdq, tmp_path / "out", precision="int8", threads=2)
    assert engine.artifact == tmp_path / "out" / "engine.onnxruntime.onnx"
    assert engine.artifact.stat().st_size > 0
    assert list(engine.artifact.parent.iterdir()) == [engine.artifact]  # no temp files left
    ops = {node.op_type for node in onnx.load(str(engine.artifact)).graph.node}
    assert "QLinearConv" in ops and "Conv" not in ops  # fused, unlike the QDQ input
    assert (engine.precision, engine.threads, engine.onnx_path) == ("int8", 2, mnist_qdq)


def test_failed_rebuild_keeps_the_previous_artifact(mnist_qdq, tmp_path):
    engine = ADAPTER.build(mnist_qdq, tmp_path, precision="int8", threads=1)
    before = engine.artifact.read_bytes()
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"not a protobuf")
    with pytest.raises(BadInputError, match="corrupt.onnx"):
        ADAPTER.build(corrupt, tmp_path, precision="int8", threads=1)
    assert engine.artifact.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt.onnx", "engine.onnxruntime.onnx"]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"precision": "fp16"}, "precision"),
        ({"threads": 0}, "thread"),
        ({"onnx_path": "missing.onnx"}, "not found"),
    ],
)
def test_bad_build_arguments_are_bad_input(mnist_qdq, tmp_path, change, message):
    args = {"onnx_path": mnist_qdq, "precision": "int8", "threads": 1, **change}
    with pytest.raises(BadInputError, match=message):
        ADAPTER.build(args.pop("onnx_path"), tmp_path, **args)


def test_runner_uses_the_build_options_on_the_original_model(mnist_qdq, tmp_path):
    engine = ADAPTER.build(mnist_qdq, tmp_path, precision="int8", threads=1)
    engine.artifact.unlink()  # the machine-specific artifact is not what the runner loads
    with ADAPTER.runner(engine) as runner:
        options = runner.sess.get_session_options()
        assert options.intra_op_num_threads == 1 and options.inter_op_num_threads == 1
        assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        assert options.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
        # an idle engine's workers must not spin while another engine is timed
        assert options.get_session_config_entry("session.force_spinning_stop") == "1"
        assert runner.infer({"x": np.zeros((1, 1, 16, 16), np.float32)})["linear"].shape == (1, 10)


def test_int8_engine_outputs_track_the_fp32_model_on_digits(
    mnist_fp32, mnist_qdq, digits_x, tmp_path, infer_all
):
    fp32_engine = ADAPTER.build(mnist_fp32, tmp_path / "f", precision="fp32", threads=1)
    int8_engine = ADAPTER.build(mnist_qdq, tmp_path / "q", precision="int8", threads=1)
    fp32, int8 = (infer_all(ADAPTER.runner(e), digits_x) for e in (fp32_engine, int8_engine))
    assert closeness.compare(int8, fp32, step=None)["cosine"] > 0.9
    assert not np.array_equal(int8, fp32)  # really the quantized path


def test_wrong_activation_scales_fail_the_agreement_check(
    mnist_qdq, mnist_qdq_wrong_scales, digits_x, tmp_path, infer_all, step_of
):
    good = ADAPTER.build(mnist_qdq, tmp_path / "good", precision="int8", threads=1)
    bad = ADAPTER.build(mnist_qdq_wrong_scales, tmp_path / "bad", precision="int8", threads=1)
    assert ADAPTER.kernel_report(bad).int8_fraction == 1.0  # still int8: only accuracy shows it
    good_out = infer_all(ADAPTER.runner(good), digits_x)
    # the QDQ graph run op by op (no fusion): float Conv between Q/DQ, i.e. fake quantization
    fake_quant = ort_outputs(mnist_qdq, digits_x, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    step = step_of(mnist_qdq)
    thresholds = closeness.DEFAULT_THRESHOLDS["int8_vs_fakequant"]
    closeness.check(closeness.compare(good_out, fake_quant, step), thresholds, "int8_vs_fakequant")
    bad_out = infer_all(ADAPTER.runner(bad), digits_x)
    with pytest.raises(CheckFailedError, match="top1_agreement"):
        closeness.check(closeness.compare(bad_out, good_out, step), thresholds, "int8_vs_fakequant")


def _node(op: str, inputs: list[str], output: str) -> onnx.NodeProto:
    return helper.make_node(op, inputs, [output], name=output)


def test_precision_follows_8bit_tensors_through_the_graph():
    u8 = helper.make_tensor("zp", TensorProto.UINT8, [], [128])
    nodes = [
        _node("QuantizeLinear", ["x", "s", "zp"], "q"),
        _node("Transpose", ["q"], "t"),  # moves uint8 data: int8
        _node("QGemm", ["t", "s", "zp", "w", "s", "zp"], "g"),  # no y_scale: float output
        _node("Reshape", ["g", "shape"], "r"),  # moves float data
        _node("DynamicQuantizeMatMul", ["r", "w", "s"], "m"),  # quantizes its float input
        _node("MatMul", ["m", "w2"], "y"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        initializer=[u8],
    )
    got = {(layer.name, layer.precision, layer.compute_kind) for layer in graph_precisions(graph)}
    assert got == {
        ("q", "float", None),
        ("t", "int8", None),
        ("g", "int8", "linear"),
        ("r", "float", None),
        ("m", "int8", "matmul"),
        ("y", "float", "matmul"),
    }


def test_the_adapter_base_checks_arguments_and_times_every_build(mnist_fp32, tmp_path):
    """deploy.engines.adapter.Adapter.build does the common work once for every backend."""
    with pytest.raises(BadInputError, match="ONNX model not found"):
        ADAPTER.build(tmp_path / "missing.onnx", tmp_path / "out", precision="fp32", threads=1)
    with pytest.raises(BadInputError, match="bad precision"):
        ADAPTER.build(mnist_fp32, tmp_path / "out", precision="int4", threads=1)
    engine = ADAPTER.build(mnist_fp32, tmp_path / "new" / "folder", precision="fp32", threads=1)
    assert engine.artifact.is_file() and float(engine.info["build_seconds"]) >= 0
    with pytest.raises(BadInputError, match="onnxruntime has no build option sm"):
        ADAPTER.with_options(sm="sm86")


class _FloatBetweenInt8(torch.nn.Module):
    """conv2 kept float between int8 conv1 and conv3: it reads conv1's int8 output
    dequantized and writes into conv3's input quantizer. Half of its output channels have
    weights 1000x smaller than the rest, which a per-tensor int8 weight scale rounds to zero."""

    def __init__(self):
        super().__init__()
        # 4 input channels: a thin RGB stem this narrow is float by rule on onnxruntime
        self.conv1 = torch.nn.Conv2d(4, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = torch.nn.Conv2d(8, 8, 1)
        with torch.no_grad():
            self.conv2.weight[:4] *= 1e-3
            self.conv2.bias[:4] *= 1e-3

    def forward(self, x):
        y = self.conv2(torch.relu(self.conv1(x)))
        return self.conv3(torch.relu(y)), y


def test_a_layer_kept_float_between_int8_ones_computes_float_in_the_engine(tmp_path):
    """onnxruntime's WeightBiasQuantization would give conv2 per-tensor int8 weights and make
    it a QLinearConv (its small channels then become zero); the adapter turns it off, so the
    engine computes what the fake-quant model does."""
    torch.manual_seed(0)
    model = _FloatBetweenInt8().eval()
    x = torch.randn(4, 4, 12, 12)
    prepared = prepare(model, "onnxruntime", x[:1], keep_float=["conv2"])
    calibrate(prepared, [x], progress=False)
    path = export(prepared, tmp_path / "m.onnx", x[:1])
    engine = ADAPTER.build(path, tmp_path / "engine", precision="int8", threads=1)
    report = ADAPTER.kernel_report(engine)
    # conv3 writes a graph output: onnxruntime has no QLinearConv for that, so any precision
    assert [layer.precision for layer in report.compute_layers][:2] == ["int8", "float"]
    graph = onnx.load(str(path)).graph
    feed, fetch = graph.input[0].name, graph.output[1].name  # conv2's output
    with ADAPTER.runner(engine) as runner:
        got = np.concatenate([runner.infer({feed: x[i : i + 1].numpy()})[fetch] for i in range(4)])
    with torch.no_grad():
        want = prepared(x)[1].numpy()
    small = (got[:, :4].ravel(), want[:, :4].ravel())
    cosine = small[0] @ small[1] / np.linalg.norm(small[0]) / np.linalg.norm(small[1])
    assert cosine > 0.999


class _DenseBlock(torch.nn.Module):
    """DenseNet's pattern: each layer (BN -> ReLU -> Conv) reads the Concat of every earlier
    feature map, so a Concat's only reader is a float BatchNorm."""

    def __init__(self, c=8, growth=4, layers=3):
        super().__init__()
        self.layers = torch.nn.ModuleList(
            torch.nn.Sequential(
                torch.nn.BatchNorm2d(c + i * growth),
                torch.nn.ReLU(),
                torch.nn.Conv2d(c + i * growth, growth, 3, padding=1),
            )
            for i in range(layers)
        )

    def forward(self, x):
        features = [x]
        for layer in self.layers:
            features.append(layer(torch.cat(features, 1)))
        return torch.cat(features, 1).mean((2, 3))


def _engine_ops_tracking_fake_quant(model: torch.nn.Module, x: torch.Tensor, tmp_path) -> list:
    """Prepare, calibrate and build `model` for onnxruntime; check that the engine tracks the
    fake-quant model (cosine > 0.999 over x's rows) and return its optimized graph's ops."""
    prepared = prepare(model, "onnxruntime", x[:1])
    calibrate(prepared, [x], progress=False)
    path = export(prepared, tmp_path / "m.onnx", x[:1])
    engine = ADAPTER.build(path, tmp_path / "engine", precision="int8", threads=1)
    feed = onnx.load(str(path)).graph.input[0].name
    with ADAPTER.runner(engine) as runner:
        got = np.concatenate(
            [runner.infer({feed: x[i : i + 1].numpy()})["output"] for i in range(len(x))]
        )
    with torch.no_grad():
        want = prepared(x).numpy()
    assert closeness.compare(got, want, step=None)["cosine"] > 0.999
    return [node.op_type for node in onnx.load(str(engine.artifact)).graph.node]


def test_a_concat_read_by_a_float_op_runs_as_qlinearconcat(tmp_path):
    """The Concats' outputs are quantized on their inputs' grid, so onnxruntime copies 8-bit
    data (QLinearConcat) and dequantizes once after, instead of dequantizing every input for
    every Concat and copying float; the engine still tracks the fake-quant model."""
    from tests.frontend.blocks import randomize_bn

    torch.manual_seed(0)
    model = randomize_bn(_DenseBlock()).eval()
    ops = _engine_ops_tracking_fake_quant(model, torch.randn(8, 8, 10, 10), tmp_path)
    assert ops.count("QLinearConcat") == 3 and "Concat" not in ops


def test_a_relu_stem_beside_signed_concat_inputs_keeps_its_own_grid_and_runs_int8(tmp_path):
    """DenseNet's stem: Conv -> BN -> ReLU -> MaxPool feeds every Concat of the dense block
    beside the layers' signed Conv outputs. On their shared grid its zero point would not be
    0 and onnxruntime would keep the ReLU, and the stem Conv with it, in float; on its own
    grid the ReLU folds away, the stem is a QLinearConv, and QLinearConcat requantizes it."""
    from tests.frontend.blocks import randomize_bn

    torch.manual_seed(0)
    stem = torch.nn.Sequential(
        torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU()
    )
    model = randomize_bn(torch.nn.Sequential(stem, torch.nn.MaxPool2d(2), _DenseBlock())).eval()
    ops = _engine_ops_tracking_fake_quant(model, torch.randn(8, 4, 20, 20), tmp_path)
    assert ops.count("QLinearConv") == 4 and ops.count("QLinearConcat") == 3
    assert not {"Conv", "FusedConv", "Relu", "Concat"} & set(ops)
