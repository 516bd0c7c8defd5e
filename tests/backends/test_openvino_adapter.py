"""OpenVINO adapter on real exported models: blob, runner, and per-layer runtime precision."""

from __future__ import annotations

import numpy as np
import openvino as ov
import pytest

from qat_deploy.backends.onnxruntime.adapter import ADAPTER as ORT_ADAPTER
from qat_deploy.backends.openvino import adapter as openvino_adapter
from qat_deploy.backends.openvino.adapter import ADAPTER
from qat_deploy.deploy.common.errors import BadInputError
from qat_deploy.deploy.engines.adapter import get_adapter
from qat_deploy.deploy.verify import closeness


def test_registered_under_its_target_and_available_on_this_cpu():
    assert get_adapter("openvino") is ADAPTER
    assert ADAPTER.unavailable_reason() is None


def test_qdq_mnist_convolutions_and_fc_run_int8(mnist_qdq, tmp_path):
    report = ADAPTER.kernel_report(ADAPTER.build(mnist_qdq, tmp_path, precision="int8", threads=1))
    by_type = sorted((layer.layer_type, layer.compute_kind) for layer in report.compute_layers)
    assert by_type == [
        ("Convolution", "conv"),
        ("Convolution", "conv"),
        ("FullyConnected", "linear"),
    ]
    assert report.fallback_layers == [] and report.int8_fraction == 1.0


def test_fp32_mnist_has_no_int8_layer_and_pins_f32(mnist_fp32, tmp_path):
    engine = ADAPTER.build(mnist_fp32, tmp_path, precision="fp32", threads=1)
    report = ADAPTER.kernel_report(engine)
    assert len(report.compute_layers) == 3 and report.int8_compute == []
    assert report.layers and {layer.precision for layer in report.layers} == {"float"}
    assert engine.info["inference_precision"] == "f32"


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_every_build_pins_f32(mnist_fp32, mnist_qdq, tmp_path, monkeypatch, precision):
    """OpenVINO's CPU default is bf16 where the CPU has it: the fp32 baseline must be f32, and
    the float parts of an int8 engine must compute what the fake-quant model computes."""
    configs = []

    class RecordingCore(ov.Core):
        def compile_model(self, model, device, config):
            configs.append(dict(config))
            return super().compile_model(model, device, config)

    monkeypatch.setattr(openvino_adapter.ov, "Core", RecordingCore)
    source = mnist_fp32 if precision == "fp32" else mnist_qdq
    engine = ADAPTER.build(source, tmp_path, precision=precision, threads=1)
    assert [c.get("INFERENCE_PRECISION_HINT") for c in configs] == ["f32"]
    assert configs[0]["INFERENCE_NUM_THREADS"] == 1 and configs[0]["PERFORMANCE_HINT"] == "LATENCY"
    assert engine.info["inference_precision"] == "f32"


def test_the_engine_that_runs_is_the_f32_one(mnist_qdq, tmp_path):
    """An import applies its own precision hint: on a bf16 CPU a blob compiled for f32 and
    imported without the hint runs its float layers in bf16 (its runtime model's rt_info does
    not show it; the compiled model's property does)."""
    engine = ADAPTER.build(mnist_qdq, tmp_path, precision="int8", threads=1)
    with ADAPTER.runner(engine) as runner:
        hint = runner.compiled.get_property("INFERENCE_PRECISION_HINT")
    assert hint.get_type_name() == "f32"


def test_blob_is_written_atomically_and_reimports_and_runs(mnist_qdq, digits_x, tmp_path):
    engine = ADAPTER.build(mnist_qdq, tmp_path / "out", precision="int8", threads=1)
    assert engine.artifact == tmp_path / "out" / "engine.openvino.blob"
    assert engine.artifact.stat().st_size > 0
    assert list(engine.artifact.parent.iterdir()) == [engine.artifact]
    compiled = ov.Core().import_model(engine.artifact.read_bytes(), "CPU")
    direct = compiled.create_infer_request().infer({"x": digits_x[:1]})[compiled.outputs[0]]
    with ADAPTER.runner(engine) as runner:
        via_runner = runner.infer({"x": digits_x[:1]})["linear"]
    assert direct.shape == (1, 10) and np.array_equal(direct, via_runner)


def test_runner_reports_input_metadata(mnist_qdq, tmp_path):
    engine = ADAPTER.build(mnist_qdq, tmp_path, precision="int8", threads=1)
    with ADAPTER.runner(engine) as runner:
        meta = runner.get_input_metadata(use_numpy_dtypes=False)
        assert list(meta) == ["x"]
        assert tuple(meta["x"].shape) == (1, 1, 16, 16) and meta["x"].dtype.numpy() == np.float32
        runner.infer({"x": np.zeros((1, 1, 16, 16), np.float32)})
        assert runner.last_inference_time() > 0


def test_int8_engine_tracks_fp32_and_matches_onnxruntime_int8(
    mnist_fp32, mnist_qdq, digits_x, tmp_path, infer_all, step_of
):
    engines = {
        "fp32": ADAPTER.build(mnist_fp32, tmp_path / "f", precision="fp32", threads=1),
        "int8": ADAPTER.build(mnist_qdq, tmp_path / "q", precision="int8", threads=1),
    }
    fp32, int8 = (infer_all(ADAPTER.runner(engines[k]), digits_x) for k in ("fp32", "int8"))
    ort_engine = ORT_ADAPTER.build(mnist_qdq, tmp_path / "o", precision="int8", threads=1)
    ort_int8 = infer_all(ORT_ADAPTER.runner(ort_engine), digits_x)
    assert closeness.compare(int8, fp32, step=None)["cosine"] > 0.9
    same_model = closeness.compare(int8, ort_int8, step=step_of(mnist_qdq))
    closeness.check(same_model, closeness.Thresholds(), "openvino_vs_onnxruntime")


def test_corrupt_blob_and_bad_onnx_are_bad_input(mnist_qdq, tmp_path):
    engine = ADAPTER.build(mnist_qdq, tmp_path, precision="int8", threads=1)
    engine.artifact.write_bytes(b"garbage")
    with pytest.raises(BadInputError, match="rebuild"):
        ADAPTER.kernel_report(engine)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"garbage")
    with pytest.raises(BadInputError, match="bad.onnx"):
        ADAPTER.build(bad, tmp_path / "none", precision="int8", threads=1)
    assert not (tmp_path / "none").exists() or not any((tmp_path / "none").iterdir())


def test_pooled_features_stay_u8_into_the_classifier(tmp_path):
    """Global pooling -> flatten -> Linear: the classifier's input quantizer is copied above
    the flatten (export pass quantize_before_pass_through), so OpenVINO fuses it into the
    pooling and no float layer is left between the convolution and the classifier."""
    import torch

    from qat_deploy.deploy.export.qdq import export
    from qat_deploy.deploy.frontend.prepare import prepare
    from qat_deploy.deploy.training.calibrate import calibrate

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(16, 10),
    ).eval()
    prepared = prepare(model, "openvino", torch.randn(1, 3, 16, 16))
    calibrate(prepared, [torch.randn(8, 3, 16, 16) for _ in range(4)], progress=False)
    path = export(prepared, tmp_path / "m.onnx", torch.randn(1, 3, 16, 16))
    report = ADAPTER.kernel_report(ADAPTER.build(path, tmp_path, precision="int8", threads=1))
    float_layers = [
        (layer.layer_type, layer.name)
        for layer in report.layers
        if layer.precision == "float" and layer.layer_type != "Reshape"  # views, no compute
    ]
    # only the input quantizer itself (a float snippet reading the fp32 input) stays float
    assert len(float_layers) == 1 and float_layers[0][0] == "Subgraph", float_layers


def _engine_cosine_to(prepared, engine, x) -> float:
    """Cosine of the engine's outputs, one sample at a time, to the fake-quant model's."""
    import torch

    with ADAPTER.runner(engine) as runner:
        feeds = ({"input": x[i : i + 1].numpy()} for i in range(len(x)))
        got = np.concatenate([next(iter(runner.infer(feed).values())) for feed in feeds])
    with torch.no_grad():
        want = prepared(x).numpy()
    return closeness.compare(got, want, step=None)["cosine"]


def _prepared_and_engine(module, x, tmp_path, *, dynamic_batch: bool = True):
    """`module` prepared for OpenVINO, calibrated on random batches shaped like x, exported
    and built: the fake-quant model and its engine."""
    import torch

    from qat_deploy.deploy.export.qdq import export
    from qat_deploy.deploy.frontend.prepare import prepare
    from qat_deploy.deploy.training.calibrate import calibrate

    prepared = prepare(module.eval(), "openvino", x[:1])
    calibrate(prepared, [torch.randn(*x.shape) for _ in range(4)], progress=False)
    path = export(prepared, tmp_path / "m.onnx", x[:1], dynamic_batch=dynamic_batch)
    return prepared, ADAPTER.build(path, tmp_path, precision="int8", threads=1)


def test_an_eca_gate_runs_without_requantizers_and_matches_its_fake_quant_model(tmp_path):
    """timm's ECA gate on OpenVINO's rules: the Conv output only the pooling and the Mul read
    is int8 (zero point 0), and the pooled values reach the gate's Conv1d through the
    squeeze and the view with no requantizing Subgraph (export pass
    drop_requantize_after_pass_through; before it, the CPU plugin ran two per gate). The
    engine computes what the fake-quant model does."""
    import torch

    from tests.frontend.blocks import ChannelGate

    torch.manual_seed(0)
    x = torch.randn(8, 16, 12, 12)
    prepared, engine = _prepared_and_engine(ChannelGate(c=16, gate="conv"), x, tmp_path)
    assert any(s.spec.signed for s in prepared.plan.sites if s.role == "activation")
    layers = ADAPTER.kernel_report(engine).layers
    types = [layer.layer_type for layer in layers]
    pooled, gate = types.index("Reduce"), types.index("Convolution", types.index("Reduce"))
    assert set(types[pooled + 1 : gate]) <= {"Reshape", "Reorder"}, types
    assert all(layer.precision == "int8" for layer in layers[pooled : gate + 1])
    assert _engine_cosine_to(prepared, engine, x) > 0.999


def test_same_padding_runs_inside_int8_convs_and_matches_its_fake_quant_model(tmp_path):
    """timm's "same" padding (Pad -> strided Conv): with the Pad folded into the Conv (export
    pass fold_pad_into_conv) the CPU plugin runs no Pad layer, which it otherwise ran alone in a
    bf16 reference kernel before the Conv's quantizer, and every Conv is int8."""
    import torch

    from tests.frontend.blocks import SamePaddingStem, randomize_bn

    torch.manual_seed(0)
    x = torch.randn(8, 3, 16, 16)
    prepared, engine = _prepared_and_engine(randomize_bn(SamePaddingStem()), x, tmp_path)
    layers = ADAPTER.kernel_report(engine).layers
    assert "Pad" not in {layer.layer_type for layer in layers}
    convs = [layer for layer in layers if "Convolution" in layer.layer_type]
    assert len(convs) == 3 and all(layer.precision == "int8" for layer in convs), convs
    assert _engine_cosine_to(prepared, engine, x) > 0.999


def test_a_resnet_d_shortcut_pool_runs_int8_and_matches_its_fake_quant_model(tmp_path):
    """timm's ResNet-D shortcut pools with ceil_mode=True. On even sizes that changes no
    window, and with the flag dropped (export pass average_pool_floor_mode) the CPU plugin
    pools the u8 values; with it, it pooled in f32 (and requantized in an f32 Subgraph)."""
    import torch

    from tests.frontend.blocks import ResNetDShortcut, randomize_bn

    torch.manual_seed(0)
    x = torch.randn(8, 3, 16, 16)
    prepared, engine = _prepared_and_engine(randomize_bn(ResNetDShortcut()), x, tmp_path)
    layers = ADAPTER.kernel_report(engine).layers
    pools = [layer for layer in layers if "Pool" in layer.layer_type]
    assert len(pools) == 1 and pools[0].precision == "int8", layers
    assert _engine_cosine_to(prepared, engine, x) > 0.999


def test_a_dense_blocks_bn_relu_runs_once_per_concatenation(tmp_path):
    """DenseNet's Concat -> BN -> ReLU -> Q with positive BN scales, exported with a fixed
    batch as deploy build does: OpenVINO folds the BN and ReLU into the quantizer and then
    splits that per-channel quantizer over the Concat's inputs, one Subgraph per input
    (DenseNet-121: 594 Subgraphs). With the ReLU written as Max(x, 0) (export pass
    relu_as_max_after_concat) it runs once per Concat, after it."""
    import torch

    from tests.frontend.blocks import DenseBlock, randomize_bn

    torch.manual_seed(0)
    x = torch.randn(8, 3, 16, 16)
    block = randomize_bn(DenseBlock(), positive_scales=True)
    prepared, engine = _prepared_and_engine(block, x, tmp_path, dynamic_batch=False)
    types = [layer.layer_type for layer in ADAPTER.kernel_report(engine).layers]
    elementwise = [t for t in types if t in ("Subgraph", "Eltwise", "FakeQuantize")]
    # one per Concat, plus the input's quantizer and the first layer's BN (no Concat before)
    assert len(elementwise) <= types.count("Concatenation") + 2, types
    assert _engine_cosine_to(prepared, engine, x) > 0.999


def test_a_quantized_input_independent_branch_is_folded_and_computed_right(tmp_path):
    """timm EdgeNeXt's Fourier positional encoding as deploy exported it (fixture: Sin/Cos of
    a fixed grid -> Q -> DQ -> int8 1x1 Conv, plus an input). OpenVINO 2026.4 folds that branch
    itself and gets it 77% wrong (EdgeNeXt-XXS's engine: cosine 0.9952 to its own file); after
    the export pass fold_quantized_constants the engine computes what the file does."""
    import onnx

    from qat_deploy.deploy.export.passes import fold_quantized_constants
    from tests.export.qdq_probe import run_reference_semantics
    from tests.fixtures import FIXTURES

    source = FIXTURES / "edgenext_position_branch.onnx"
    feed = {"x": np.random.default_rng(0).normal(0, 0.1, (1, 48, 20, 20)).astype(np.float32)}
    (want,) = run_reference_semantics(source, feed, [])
    model = onnx.load(source)
    assert fold_quantized_constants(model) >= 1
    folded = tmp_path / "folded.onnx"
    onnx.save(model, folded)
    engine = ADAPTER.build(folded, tmp_path, precision="int8", threads=1)
    with ADAPTER.runner(engine) as runner:
        got = next(iter(runner.infer(feed).values()))
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-4
    np.testing.assert_allclose(
        run_reference_semantics(folded, feed, [])[0], want, rtol=1e-5, atol=1e-6
    )
