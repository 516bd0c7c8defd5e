"""QDQ export: the ONNX file computes what the fake-quant model computes, holds int8 weights,
passes the full ONNX checker, and is written deterministically and atomically."""

from __future__ import annotations

import logging
import os

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from qat_deploy.deploy.common.errors import BadInputError
from qat_deploy.deploy.export.qdq import export, export_fp32
from qat_deploy.deploy.frontend.prepare import prepare
from qat_deploy.deploy.quant.fake_quant import FakeQuantize
from qat_deploy.deploy.rules.backend import available_targets
from qat_deploy.deploy.training.calibrate import calibrate
from qat_deploy.models import load_model
from tests.export.qdq_probe import compare_per_quantizer, run_reference_semantics
from tests.frontend.blocks import (
    BasicBlock,
    Bottleneck,
    ConcatBlock,
    EncoderBlock,
    GhostBlock,
    InceptionStem,
    InvertedResidual,
    SamePaddingStem,
    randomize_bn,
)

TARGETS = available_targets()
IMG8 = (8, 8, 8)
REFERENCE = {
    "basic": (lambda: randomize_bn(BasicBlock()), IMG8, 1000),
    "bottleneck": (lambda: randomize_bn(Bottleneck()), IMG8, 1000),
    "inverted_residual": (lambda: randomize_bn(InvertedResidual()), IMG8, 1000),
    "concat": (lambda: randomize_bn(ConcatBlock()), IMG8, 1000),
    "ghost": (lambda: randomize_bn(GhostBlock()), IMG8, 1000),
    "inception_stem": (InceptionStem, (3, 16, 16), 1000),
    "encoder": (EncoderBlock, (5, 16), 1000),
    "mnist_cnn": (lambda: load_model("mnist_cnn")[0], (1, 16, 16), 1000),
    # 64x64: every layer and stride of ResNet-18 at a twelfth of 224x224's time
    "resnet18": (lambda: load_model("resnet18")[0], (3, 64, 64), 16),
}


def _calibrated(factory, shape, target, **kw):
    torch.manual_seed(0)
    model = factory().eval()
    prepared = prepare(model, target, torch.randn(1, *shape), **kw)
    calibrate(prepared, [torch.randn(16, *shape) for _ in range(4)], progress=False)
    return model, prepared


#: ResNet-18's capture and export take ~20 s; the blocks above cover each target's rules
CASES = [(n, t) for n in REFERENCE for t in TARGETS if n != "resnet18" or t == "openvino"]


@pytest.mark.parametrize("name, target", CASES)
def test_qdq_onnx_matches_fake_quant_model(name, target, tmp_path):
    factory, shape, samples = REFERENCE[name]
    _, prepared = _calibrated(factory, shape, target)
    path = export(prepared, tmp_path / "m.qdq.onnx", torch.randn(1, *shape), dynamic_batch=True)
    # The file states plain Q/DQ semantics. Where an engine skips a rounding (OpenVINO's fused
    # Add operands) the model emulates the engine instead (tests/frontend/test_arithmetic.py);
    # compare the file against the model with every quantizer rounding.
    for module in prepared.modules():
        if isinstance(module, FakeQuantize):
            module.rounding = True
    x = torch.randn(samples, *shape)
    got, expected, within = compare_per_quantizer(prepared, path, x)
    assert len(within) >= 2, "too few activation quantizers paired with the ONNX graph"
    top1 = (got.reshape(samples, -1).argmax(1) == expected.reshape(samples, -1).argmax(1)).mean()
    if name != "resnet18":  # shallow nets: every quantized tensor, and the arg-max
        assert min(within) >= 0.999, within
        assert top1 >= 0.999
    else:
        # torch and onnxruntime sum convolutions in different orders; that flips a few
        # roundings, which each later layer amplifies. Measured (16 samples): the first 8
        # quantized tensors 100% within one step, then a gradual drift to 68-85% at the last
        # ones, cosine 0.99987-0.99993 (an AVX2-only EPYC: 99.90% of one early tensor). A wrong
        # scale or zero point would break the early layers outright, so those are held to a
        # strict bound.
        assert min(within[:8]) >= 0.998, within
        assert min(within) >= 0.5, within
    cos = (got * expected).sum() / (np.linalg.norm(got) * np.linalg.norm(expected))
    assert cos > (0.999 if name == "resnet18" else 0.9999)


@pytest.mark.parametrize("target", TARGETS)
def test_same_padding_folds_into_the_conv_and_the_file_matches_the_fake_quant_model(
    target, tmp_path
):
    """timm's Pad -> Conv "same" padding leaves no Pad in the file (export pass
    fold_pad_into_conv): each strided Conv pads bottom and right itself, and the file still
    computes what the fake-quant model does, which pads before its input quantizer."""
    shape = (3, 16, 16)
    _, prepared = _calibrated(lambda: randomize_bn(SamePaddingStem()), shape, target)
    path = export(prepared, tmp_path / "m.qdq.onnx", torch.randn(1, *shape), dynamic_batch=True)
    model = onnx.load(path)
    assert "Pad" not in {n.op_type for n in model.graph.node}
    strided = [n for n in model.graph.node if n.op_type == "Conv" and _ints(n, "strides") == [2, 2]]
    assert [_ints(n, "pads") for n in strided] == [[0, 0, 1, 1]] * 2
    for module in prepared.modules():
        if isinstance(module, FakeQuantize):
            module.rounding = True
    x = torch.randn(64, *shape)
    (got,) = run_reference_semantics(path, {model.graph.input[0].name: x.numpy()}, [])
    with torch.no_grad():
        expected = prepared(x).numpy()
    cos = (got * expected).sum() / (np.linalg.norm(got) * np.linalg.norm(expected))
    assert cos > 0.9999


def _ints(node: onnx.NodeProto, name: str) -> list[int] | None:
    return next((list(a.ints) for a in node.attribute if a.name == name), None)


@pytest.mark.parametrize("target", TARGETS)
def test_weights_are_int8_initializers_with_the_right_axis(target, tmp_path):
    model = torch.nn.Sequential(
        # 4 input channels: onnxruntime keeps an RGB stem read only by float ops (the
        # ConvTranspose here) float by rule (float_thin_convs)
        torch.nn.Conv2d(4, 8, 3),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.ConvTranspose2d(8, 4, 3, stride=2),  # not an exact stride-2 upsampling
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 13 * 13, 5),
    )
    factory = lambda: randomize_bn(model)  # noqa: E731
    _, prepared = _calibrated(factory, (4, 8, 8), target)
    proto = onnx.load(export(prepared, tmp_path / "m.onnx", torch.randn(1, 4, 8, 8)))
    inits = {t.name: t for t in proto.graph.initializer}
    producers = {o: n for n in proto.graph.node for o in n.output}
    expected_axis = {"Conv": 0, "ConvTranspose": 1, "Gemm": 0}
    seen = set()
    weight_bits = {s.spec.bits for s in prepared.plan.sites if s.role == "weight"}
    for node in proto.graph.node:
        if node.op_type not in expected_axis:
            continue
        if node.op_type == "ConvTranspose" and target != "tensorrt":
            # the CPU runtimes have no faster int8 ConvTranspose: their rules keep it float
            assert inits[node.input[1]].data_type == onnx.TensorProto.FLOAT
            seen.add(node.op_type)
            continue
        dq = producers[node.input[1]]
        assert dq.op_type == "DequantizeLinear"
        assert inits[dq.input[0]].data_type == onnx.TensorProto.INT8
        axis = next(a.i for a in dq.attribute if a.name == "axis")
        assert axis == expected_axis[node.op_type]
        codes = numpy_helper.to_array(inits[dq.input[0]])
        assert codes.min() >= -127  # narrow range: -128 never used
        (bits,) = weight_bits  # 7 where onnxruntime runs without VNNI (reduced range)
        assert np.abs(codes).max() <= 2 ** (bits - 1) - 1
        if len(node.input) > 2:  # float bias, or int32 behind a DQ where the rules want it
            bias_dq = producers.get(node.input[2])
            if node.op_type in ("Conv", "Gemm") and target == "onnxruntime":
                assert bias_dq.op_type == "DequantizeLinear"
                assert inits[bias_dq.input[0]].data_type == onnx.TensorProto.INT32
            else:
                assert inits[node.input[2]].data_type == onnx.TensorProto.FLOAT
        seen.add(node.op_type)
    assert seen == set(expected_axis)
    assert not any(
        n.op_type == "QuantizeLinear" and n.input[0] in inits for n in proto.graph.node
    ), "a weight is still quantized at run time"
    float_weights = {n.input[1] for n in proto.graph.node if n.op_type == "ConvTranspose"}
    assert all(
        t.data_type != onnx.TensorProto.FLOAT
        or t.dims in ([], [1])
        or "bias" in t.name
        or numpy_helper.to_array(t).ndim <= 1
        or (target != "tensorrt" and t.name in float_weights)
        for t in proto.graph.initializer
    )


def test_resnet18_qdq_file_is_under_a_third_of_fp32(tmp_path):
    # the file holds weights only: a small input makes the same file sizes, faster
    model, prepared = _calibrated(lambda: load_model("resnet18")[0], (3, 32, 32), "openvino")
    x = torch.randn(1, 3, 32, 32)
    qdq = export(prepared, tmp_path / "q.onnx", x)
    fp32 = export_fp32(model, tmp_path / "f.onnx", x)
    assert os.path.getsize(qdq) <= 0.3 * os.path.getsize(fp32)


def test_export_is_deterministic(tmp_path):
    _, prepared = _calibrated(lambda: randomize_bn(Bottleneck()), IMG8, "tensorrt")
    a = export(prepared, tmp_path / "a.onnx", torch.randn(1, *IMG8))
    _, again = _calibrated(lambda: randomize_bn(Bottleneck()), IMG8, "tensorrt")
    b = export(again, tmp_path / "b.onnx", torch.randn(1, *IMG8))
    assert a.read_bytes() == b.read_bytes()


def test_default_opset_and_old_opset_refused(tmp_path):
    _, prepared = _calibrated(BasicBlock, IMG8, "onnxruntime")
    proto = onnx.load(export(prepared, tmp_path / "m.onnx", torch.randn(1, *IMG8)))
    assert next(o.version for o in proto.opset_import if o.domain == "") == 18
    with pytest.raises(BadInputError, match="opset 12"):
        export(prepared, tmp_path / "old.onnx", torch.randn(1, *IMG8), opset=12)


def test_low_bit_export_refused_and_existing_file_untouched(tmp_path):
    _, prepared = _calibrated(BasicBlock, IMG8, "openvino", bits=4)
    target = tmp_path / "model.qdq.onnx"
    target.write_bytes(b"previous good artifact")
    with pytest.raises(BadInputError, match="8-bit"):
        export(prepared, target, torch.randn(1, *IMG8))
    assert target.read_bytes() == b"previous good artifact"
    assert [p.name for p in tmp_path.iterdir()] == ["model.qdq.onnx"]


def test_dynamic_batch_runs_any_batch_size(tmp_path):
    import onnxruntime as ort

    _, prepared = _calibrated(lambda: load_model("mnist_cnn")[0], (1, 16, 16), "onnxruntime")
    path = export(prepared, tmp_path / "m.onnx", torch.randn(1, 1, 16, 16), dynamic_batch=True)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (1, 3, 7):
        (out,) = sess.run(None, {"input": np.random.rand(n, 1, 16, 16).astype(np.float32)})
        assert out.shape == (n, 10)


def test_export_leaves_the_prepared_model_in_training_form(tmp_path):
    _, prepared = _calibrated(BasicBlock, IMG8, "tensorrt")
    prepared.train()
    export(prepared, tmp_path / "m.onnx", torch.randn(1, *IMG8))
    assert prepared.training
    assert not any(getattr(m, "export_mode", False) for m in prepared.modules())


def test_layers_sharing_one_bias_constant_get_their_own_int32_bias(tmp_path):
    """The exporter stores equal bias constants once for all layers that use them; each
    onnxruntime int32 bias needs its own scale, hence its own tensor."""
    layers = [torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)]
    for layer in layers[::2] + layers[3:]:
        torch.nn.init.constant_(layer.bias, 0.1)
    _, prepared = _calibrated(lambda: torch.nn.Sequential(*layers), (8,), "onnxruntime")
    path = export(prepared, tmp_path / "m.onnx", torch.randn(1, 8), dynamic_batch=True)
    proto = onnx.load(path)
    producers = {o: n for n in proto.graph.node for o in n.output}
    bias_dqs = [producers[n.input[2]] for n in proto.graph.node if n.op_type == "Gemm"]
    assert len({dq.input[0] for dq in bias_dqs}) == len(bias_dqs) == 3
    got, expected, _ = compare_per_quantizer(prepared, path, torch.randn(64, 8))
    assert np.abs(got - expected).max() <= 1e-5 + np.abs(expected).max() * 1e-4


def test_the_exporters_chatter_is_silenced_for_the_export_only(monkeypatch, caplog, tmp_path):
    """onnxscript's constant folding logs "Evaluation failed" for every node it leaves to the
    runtime (dozens on a BERT): not the user's problem during the export, and the user's own
    logging setup is back afterwards."""
    folding = logging.getLogger("onnxscript.optimizer._constant_folding")
    real_export = torch.onnx.export

    def chatty_export(*args, **kwargs):
        folding.warning("Evaluation failed: cannot reshape")
        return real_export(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", chatty_export)
    _, prepared = _calibrated(lambda: randomize_bn(BasicBlock()), IMG8, "onnxruntime")
    parent = logging.getLogger("onnxscript.optimizer")
    before = parent.level
    parent.setLevel(logging.INFO)
    try:
        with caplog.at_level(logging.WARNING):
            export(prepared, tmp_path / "m.onnx", torch.randn(1, *IMG8))
            assert "Evaluation failed" not in caplog.text
            assert parent.level == logging.INFO
            folding.warning("after the export")
        assert "after the export" in caplog.text
    finally:
        parent.setLevel(before)
