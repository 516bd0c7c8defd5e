"""TensorRT adapter: real TensorRT-RTX parser and ahead-of-time builds on hand-built QDQ graphs.

The QDQ graphs are written with onnx.helper so each test controls exactly what TensorRT sees:
a Conv->Relu->Conv->Add(residual)->Relu->GlobalAveragePool->Gemm net with symmetric int8
activations and int8 per-channel weights, and variants broken in one way each.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import qat_deploy.backends.tensorrt.adapter as trt_adapter
from qat_deploy.backends.tensorrt.gpu import GpuProbe, probe_gpu
from qat_deploy.backends.tensorrt.layer_info import (
    EngineLayer,
    layer_precisions,
    layers_from_json,
    layers_from_text,
)
from qat_deploy.deploy.common.errors import (
    BACKEND_UNAVAILABLE,
    BackendUnavailableError,
    BadInputError,
    CheckFailedError,
)
from qat_deploy.deploy.engines.adapter import get_adapter
from qat_deploy.models.registry import load_model

ADAPTER = trt_adapter.ADAPTER
HAS_RTX = trt_adapter.installed("tensorrt_rtx_bindings")


@pytest.fixture
def rtx_path(monkeypatch):
    """Take the TensorRT-RTX path even where datacenter TensorRT and a GPU could build."""
    monkeypatch.setattr(trt_adapter, "installed", lambda module: module != "tensorrt")


def needs_rtx(test):
    """A test of the TensorRT-RTX path: skipped without its wheels."""
    skip = pytest.mark.skipif(
        not HAS_RTX, reason="tensorrt_rtx_bindings not importable (pip install '.[tensorrt-rtx]')"
    )
    return skip(pytest.mark.usefixtures("rtx_path")(test))


def _datacenter_missing() -> str | None:
    missing = []
    if not trt_adapter.installed("tensorrt"):
        missing.append("the tensorrt module (not importable)")
    if probe_gpu().missing is not None:
        missing.append(f"an NVIDIA GPU ({probe_gpu().missing})")
    return " and ".join(missing) or None


_DATACENTER_MISSING = _datacenter_missing()
needs_datacenter = pytest.mark.skipif(
    _DATACENTER_MISSING is not None,
    reason=f"datacenter TensorRT path needs {_DATACENTER_MISSING}",
)


# ---------------------------------------------------------------- hand-built QDQ graphs


class _Graph:
    """Accumulates nodes and initializers; Q/DQ helpers in TensorRT's explicit-quant style."""

    def __init__(self, act_type: int, zero_point: int) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.act_dtype = np.int8 if act_type == TensorProto.INT8 else np.uint8
        self.zero_point = zero_point
        self.rng = np.random.default_rng(0)

    def const(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(array, name))
        return name

    def node(self, op: str, inputs: list[str], name: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, [f"{name}_out"], name=name, **attrs))
        return f"{name}_out"

    def qdq(self, x: str, tag: str, scale: float = 0.05) -> str:
        s = self.const(f"{tag}_scale", np.array(scale, np.float32))
        z = self.const(f"{tag}_zp", np.array(self.zero_point, self.act_dtype))
        return self.node(
            "DequantizeLinear",
            [self.node("QuantizeLinear", [x, s, z], f"{tag}_Q"), s, z],
            f"{tag}_DQ",
        )

    def weight(self, tag: str, shape: tuple[int, ...], axis: int = 0) -> str:
        """int8 per-channel weight initializer (narrow range) through a DQ on `axis`."""
        w = self.rng.normal(size=shape).astype(np.float32) * 0.1
        others = tuple(d for d in range(len(shape)) if d != axis)
        scale = (np.abs(w).max(axis=others, keepdims=True) / 127).astype(np.float32)
        inputs = [
            self.const(f"{tag}_w_int8", np.round(w / scale).clip(-127, 127).astype(np.int8)),
            self.const(f"{tag}_w_scale", scale.ravel()),
            self.const(f"{tag}_w_zp", np.zeros(shape[axis], np.int8)),
        ]
        return self.node("DequantizeLinear", inputs, f"{tag}_w_DQ", axis=axis)

    def model(self, out_shape: list[int], opset: int) -> onnx.ModelProto:
        self.nodes[-1].output[0] = "logits"  # the last node computes the graph output
        graph = helper.make_graph(
            self.nodes,
            "qdq_residual",
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 16, 16])],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, out_shape)],
            self.inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        onnx.checker.check_model(model, full_check=True)
        return model


def qdq_residual_net(
    *,
    opset: int = 17,
    act_type: int = TensorProto.INT8,
    zero_point: int = 0,
    int32_bias: bool = False,
    conv2_weight_axis: int = 0,
) -> onnx.ModelProto:
    """TensorRT placement: Q/DQ on weighted-op inputs, on the residual skip branch only, and
    around the (non-commuting) GlobalAveragePool. The keywords break it in one way each."""
    g = _Graph(act_type, zero_point)
    x = g.qdq("input", "input")
    if int32_bias:  # onnxruntime's tool style: bias = DQ(int32, act_scale * w_scale)
        b = [
            g.const("conv1_b_int32", np.zeros(16, np.int32)),
            g.const("conv1_b_scale", np.full(16, 1e-4, np.float32)),
        ]
        bias = g.node("DequantizeLinear", b, "conv1_bias_DQ", axis=0)
    else:
        bias = g.const("conv1_b", np.zeros(16, np.float32))
    c1 = g.node("Conv", [x, g.weight("conv1", (16, 3, 3, 3)), bias], "conv1", pads=[1] * 4)
    r1 = g.qdq(g.node("Relu", [c1], "relu1"), "relu1")
    c2 = g.node(
        "Conv",
        [
            r1,
            g.weight("conv2", (16, 16, 3, 3), conv2_weight_axis),
            g.const("conv2_b", np.zeros(16, np.float32)),
        ],
        "conv2",
        pads=[1] * 4,
    )
    r2 = g.qdq(g.node("Relu", [g.node("Add", [c2, r1], "add")], "relu2"), "relu2")
    pooled = g.qdq(g.node("GlobalAveragePool", [r2], "gap"), "gap")
    flat = g.node("Flatten", [pooled], "flatten")
    g.node(
        "Gemm",
        [flat, g.weight("fc", (10, 16)), g.const("fc_b", np.zeros(10, np.float32))],
        "fc",
        transB=1,
    )
    return g.model([1, 10], opset)


def qlinearconv_net() -> onnx.ModelProto:
    """A QOperator-format graph: TensorRT only takes QDQ."""
    g = _Graph(TensorProto.INT8, 0)
    s, z = g.const("x_scale", np.array(0.05, np.float32)), g.const("x_zp", np.array(0, np.int8))
    xq = g.node("QuantizeLinear", ["input", s, z], "input_Q")
    w = [
        g.const("w", np.ones((4, 3, 3, 3), np.int8)),
        g.const("w_scale", np.full(4, 0.01, np.float32)),
        g.const("w_zp", np.zeros(4, np.int8)),
    ]
    ys, yz = g.const("y_scale", np.array(0.1, np.float32)), g.const("y_zp", np.array(0, np.int8))
    yq = g.node("QLinearConv", [xq, s, z, *w, ys, yz], "qconv", pads=[1] * 4)
    g.node("DequantizeLinear", [yq, ys, yz], "output_DQ")
    return g.model([1, 4, 16, 16], 17)


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def mnist_fp32(tmp_path_factory):
    """mnist_cnn exported in fp32 by the dynamo exporter (opset 18)."""
    model, spec = load_model("mnist_cnn")
    path = tmp_path_factory.mktemp("mnist") / "mnist_cnn.onnx"
    with torch.no_grad():
        torch.onnx.export(
            model, (torch.randn(spec.input_shape),), str(path), dynamo=True, opset_version=18
        )
    return path


# ---------------------------------------------------------------- availability (no library needed)


def test_registered_as_the_tensorrt_adapter():
    assert get_adapter("tensorrt") is ADAPTER


def test_neither_library_is_unavailable_with_exit_code_3(monkeypatch):
    monkeypatch.setattr(trt_adapter, "installed", lambda module: False)
    monkeypatch.setattr(trt_adapter, "probe_gpu", lambda: GpuProbe(missing="no NVIDIA driver"))
    reason = ADAPTER.unavailable_reason()
    assert "tensorrt" in reason and "tensorrt_rtx_bindings" in reason
    assert ".[tensorrt-rtx]" in reason
    with pytest.raises(BackendUnavailableError) as err:
        ADAPTER.require_available()
    assert err.value.exit_code == BACKEND_UNAVAILABLE == 3


def test_neither_library_on_a_gpu_machine_names_the_gpu_and_the_datacenter_extra(monkeypatch):
    monkeypatch.setattr(trt_adapter, "installed", lambda module: False)
    gpu = GpuProbe(name="NVIDIA H100 80GB HBM3", compute_capability=(9, 0))
    monkeypatch.setattr(trt_adapter, "probe_gpu", lambda: gpu)
    reason = ADAPTER.unavailable_reason()
    assert "NVIDIA H100 80GB HBM3 (SM90)" in reason and ".[tensorrt]'" in reason


def test_datacenter_tensorrt_without_gpu_and_without_rtx_names_the_gpu(monkeypatch):
    monkeypatch.setattr(trt_adapter, "installed", lambda module: module == "tensorrt")
    monkeypatch.setattr(trt_adapter, "probe_gpu", lambda: GpuProbe(missing="no NVIDIA driver"))
    reason = ADAPTER.unavailable_reason()
    assert "no NVIDIA driver" in reason and "tensorrt-rtx" in reason


def test_gpu_probe_answers_without_torch():
    gpu = probe_gpu()
    assert (gpu.missing is None) == (gpu.compute_capability is not None)


# ---------------------------------------------------------------- layer information parsing

_RTX_LOG = (
    "Layers:\n"
    "Name: q_myl0_0, LayerType: kgen, Inputs: [ { Name: input, Dimensions: [1,3,16,16], "
    "Datatype: Float, Format: (Linear) Row major linear format }], Constants: [], Outputs: "
    "[ { Name: t0, Datatype: Int8, Format: (NHWC) Channel major format }], TacticName: k, "
    "StreamId: 0, Metadata: [ONNX Layer: input_Q][ONNX Layer: conv1]\n"
    "Name: conv1_myl0_1, LayerType: correlation, Inputs: [ { Name: t0, Dimensions: [1,4,16,16], "
    "Datatype: Int8, Format: (NHWC) Channel major format }], Constants: [ { Name: w, "
    "Datatype: Int8, Format: x }], Outputs: [ { Name: t1, Datatype: Float, Format: x }], "
    "TacticName: __myelin_CASK_STUB, StreamId: 0, Metadata: [ONNX Layer: conv1]\n"
    "Name: __myl_ReshMulSumAdd_myl0_2, LayerType: kgen, Inputs: [ { Name: t1, Datatype: Float, "
    "Format: x }], Constants: [ { Name: fc.weight, Datatype: Float, Format: x }], Outputs: "
    "[ { Name: logits, Datatype: Float, Format: x }], TacticName: k2, StreamId: 0, "
    "Metadata: [ONNX Layer: node_linear]\n"
    "\nI/O Tensors:\n Name: input, IOMode: Input, DataType: Float, Dimensions: [1,3,16,16]\n"
)


def test_rtx_log_layers_and_a_gemm_hidden_in_a_generated_kernel():
    layers = layers_from_text(_RTX_LOG)
    assert [(la.layer_type, la.input_types) for la in layers] == [
        ("kgen", ("Float",)),
        ("correlation", ("Int8",)),
        ("kgen", ("Float",)),
    ]
    report = layer_precisions(layers, {"conv1": "conv", "node_linear": "linear"})
    kinds = [(lp.name, lp.compute_kind, lp.precision) for lp in report]
    # conv1 is claimed by the correlation layer, so the quantizing kgen is not a compute layer;
    # the fc lowered into a kgen kernel is reported as a float gemm, not forgotten
    assert kinds == [
        ("q_myl0_0", None, "float"),
        ("conv1_myl0_1", "conv", "int8"),
        ("__myl_ReshMulSumAdd_myl0_2", "linear", "float"),
    ]


def test_inspector_json_layers():
    doc = {
        "Layers": [
            {
                "Name": "conv1 + relu1",
                "LayerType": "CaskConvolution",
                "Inputs": [
                    {"Format/Datatype": "Thirty-two wide channel vectorized row major Int8 format"}
                ],
                "Metadata": "[ONNX Layer: conv1][ONNX Layer: relu1]",
            },
            {
                "Name": "fc",
                "LayerType": "CaskGemmMatrixMultiply",
                "Inputs": [{"Format/Datatype": "Row major linear FP32 format"}],
                "Metadata": "[ONNX Layer: fc]",
            },
        ],
        "Bindings": ["input", "logits"],
    }
    report = layer_precisions(layers_from_json(json.dumps(doc)), {"conv1": "conv", "fc": "matmul"})
    assert [(lp.compute_kind, lp.precision) for lp in report] == [
        ("conv", "int8"),
        ("matmul", "float"),
    ]


@pytest.mark.parametrize(
    ("types", "precision"),
    [
        (("Int8",), "int8"),
        (("Int8", "Int8"), "int8"),
        (("Int8", "Float"), "float"),
        (("UInt8",), "float"),
        ((), "float"),
        (("Bool", "Int8", "Int8", "Int8"), "int8"),  # masked fused attention (TensorRT-RTX)
        (("Bool", "Float", "Int8", "Int8"), "float"),
        (("Int32", "Int8"), "int8"),
        (("Bool",), "float"),
    ],
)
def test_int8_needs_every_activation_input_int8(types, precision):
    assert EngineLayer("l", "gemm", types, ()).precision == precision


@pytest.mark.parametrize(
    ("types", "precision"),
    [
        (("Int8", "Int8", "Float", "Int8"), "int8"),  # T5: relative-position score bias
        (("Int8", "Int8", "Bool", "Int8"), "int8"),  # a mask
        (("Float", "Float", "Int8", "Int8", "Int8"), "int8"),  # Swin: two shifted-window masks
        (("Int8", "Float", "Float", "Int8"), "float"),  # K float
        (("Int8", "Int8", "Float", "Float"), "float"),  # V float
        (("Int8", "Int8", "Float"), "float"),  # no bias input: Q, K or V float
    ],
)
def test_fused_attention_is_int8_when_q_k_and_v_are(types, precision):
    """A fused-attention kernel's masks and score biases are float whatever it computes in;
    a plain GEMM reading the same types is float."""
    assert EngineLayer("_gemm_mha_v2_myl0_6", "kgen", types, ()).precision == precision
    assert EngineLayer("gemm_myl0_6", "gemm", types, ()).precision == (
        "float" if "Float" in types else "int8"
    )


# ---------------------------------------------------------------- TensorRT-RTX builds


@needs_rtx
@pytest.mark.parametrize("opset", [17, 18])
def test_symmetric_qdq_net_builds_with_int8_conv_and_gemm(tmp_path, opset):
    import tensorrt_rtx_bindings

    onnx_path = _save(qdq_residual_net(opset=opset), tmp_path / "qdq.onnx")
    engine = ADAPTER.build(onnx_path, tmp_path / "out", precision="int8", threads=2)

    assert engine.artifact == tmp_path / "out" / "engine.tensorrt.plan"
    assert engine.artifact.stat().st_size > 0
    assert sorted(p.name for p in engine.artifact.parent.iterdir()) == [
        "engine.tensorrt.layers.txt",
        "engine.tensorrt.plan",
    ]  # no temporary files left behind
    assert engine.info["builder"] == f"TensorRT-RTX {tensorrt_rtx_bindings.__version__}"
    assert engine.info["compute_capability"] == "SM89"

    report = ADAPTER.kernel_report(engine)
    compute = {lp.layer_type for lp in report.compute_layers}
    assert compute == {"correlation", "gemm"}
    assert len(report.compute_layers) == 3  # conv1, conv2, fc
    assert report.int8_fraction >= 0.95 and report.fallback_layers == []


@needs_rtx
def test_fp32_mnist_builds_with_no_int8_layers(tmp_path, mnist_fp32):
    engine = ADAPTER.build(mnist_fp32, tmp_path, precision="fp32", threads=2)
    report = ADAPTER.kernel_report(engine)
    assert len(report.compute_layers) == 3  # two convs and the fc
    assert report.int8_compute == [] and len(report.fallback_layers) == 3


@needs_rtx
def test_runner_raises_and_latency_says_not_measured(tmp_path):
    engine = ADAPTER.build(
        _save(qdq_residual_net(), tmp_path / "m.onnx"), tmp_path, precision="int8", threads=1
    )
    with pytest.raises(BackendUnavailableError, match="GPU") as err:
        ADAPTER.runner(engine)
    assert err.value.exit_code == BACKEND_UNAVAILABLE
    assert engine.info["latency"].startswith("not measured: ")
    assert "GPU" in engine.info["latency"]


@needs_rtx
def test_compute_capability_is_chosen_and_validated(tmp_path):
    onnx_path = _save(qdq_residual_net(), tmp_path / "m.onnx")
    engine = dataclasses.replace(ADAPTER, sm="sm86").build(
        onnx_path, tmp_path / "a", precision="int8", threads=1
    )
    assert engine.info["compute_capability"] == "SM86"
    with pytest.raises(BadInputError, match="SM89"):
        dataclasses.replace(ADAPTER, sm="SM99").build(
            onnx_path, tmp_path / "b", precision="int8", threads=1
        )


@needs_rtx
@pytest.mark.parametrize(
    ("model", "expected"),
    [
        (
            lambda: qdq_residual_net(act_type=TensorProto.UINT8, zero_point=128),
            [r"node input_Q \(QuantizeLinear\)", "zero point"],
        ),
        (
            lambda: qdq_residual_net(int32_bias=True),
            [r"node conv1_bias_DQ \(DequantizeLinear\)", "Int32"],
        ),
        (qlinearconv_net, [r"node qconv \(QLinearConv\)", "UNSUPPORTED_NODE"]),
    ],
    ids=["uint8-nonzero-zero-point", "int32-bias-dq", "qlinearconv"],
)
def test_broken_graphs_are_rejected_naming_node_and_problem(tmp_path, model, expected):
    onnx_path = _save(model(), tmp_path / "broken.onnx")
    with pytest.raises(CheckFailedError) as err:
        ADAPTER.build(onnx_path, tmp_path / "out", precision="int8", threads=1)
    first_line = str(err.value).splitlines()[0]
    for pattern in expected:
        assert re.search(pattern, first_line), first_line
    assert "cudaError" not in str(err.value)
    assert not (tmp_path / "out" / "engine.tensorrt.plan").exists()


@needs_rtx
def test_precision_claim_must_match_the_graph(tmp_path, mnist_fp32):
    qdq = _save(qdq_residual_net(), tmp_path / "qdq.onnx")
    with pytest.raises(BadInputError, match="QuantizeLinear"):
        ADAPTER.build(qdq, tmp_path, precision="fp32", threads=1)
    with pytest.raises(BadInputError, match="no QuantizeLinear"):
        ADAPTER.build(mnist_fp32, tmp_path, precision="int8", threads=1)
    with pytest.raises(BadInputError, match="not found"):
        ADAPTER.build(tmp_path / "missing.onnx", tmp_path, precision="int8", threads=1)


# ---------------------------------------------------------------- datacenter TensorRT + GPU


@needs_datacenter
def test_datacenter_build_runs_and_reports_int8(tmp_path):
    onnx_path = _save(qdq_residual_net(), tmp_path / "qdq.onnx")
    engine = ADAPTER.build(onnx_path, tmp_path / "out", precision="int8", threads=1)
    assert engine.info["builder"].endswith("(datacenter)") and "latency" not in engine.info
    assert ADAPTER.kernel_report(engine).int8_fraction >= 0.95
    with ADAPTER.runner(engine) as runner:
        outputs = runner.infer({"input": np.zeros((1, 3, 16, 16), np.float32)})
    assert outputs["logits"].shape == (1, 10)
