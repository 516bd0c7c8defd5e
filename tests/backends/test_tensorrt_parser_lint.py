"""Our TensorRT lint rules against TensorRT itself: the real TensorRT-RTX parser and builder.

Each graph breaks one rule. TensorRT answers in one of three ways, and the linter must object
every time, on the node TensorRT names:
- the parser rejects the node (non-zero zero point, uint8 with a zero point, int32 bias DQ,
  QOperator ops);
- the parser accepts with a warning that it changed the meaning (uint8 read as int8);
- the build succeeds but the layer falls back to float (weights quantized on the wrong axis).
A conforming graph lints clean and builds with every compute layer in int8.
"""

from __future__ import annotations

import re
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto

from qat_deploy.backends.tensorrt.adapter import ADAPTER
from qat_deploy.deploy.common.errors import CheckFailedError
from qat_deploy.deploy.lint import lint
from tests.backends.test_tensorrt_adapter import qdq_residual_net, qlinearconv_net, rtx_path

pytest.importorskip(
    "tensorrt_rtx_bindings",
    reason="tensorrt_rtx_bindings not importable (pip install '.[tensorrt-rtx]')",
)
pytestmark = pytest.mark.usefixtures(rtx_path.__name__)  # the RTX path, even beside a GPU


def _build(model: onnx.ModelProto, tmp_path: Path):
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    return ADAPTER.build(path, tmp_path / "out", precision="int8", threads=1)


def _lint(model: onnx.ModelProto) -> set[tuple[str, str]]:
    return {(v.rule, v.node) for v in lint(model, "tensorrt")}


@pytest.mark.parametrize("opset", [13, 17, 18])
def test_conforming_graph_lints_clean_and_builds_all_int8(tmp_path, opset):
    model = qdq_residual_net(opset=opset)
    assert _lint(model) == set()
    report = ADAPTER.kernel_report(_build(model, tmp_path))
    assert report.compute_layers and report.fallback_layers == []


@pytest.mark.parametrize(
    ("model", "rule", "node", "parser_says"),
    [
        (lambda: qdq_residual_net(zero_point=3), "zero-point", "input_Q", "zero point"),
        (
            lambda: qdq_residual_net(act_type=TensorProto.UINT8, zero_point=128),
            "dtype",
            "input_Q",
            "zero point",
        ),
        (lambda: qdq_residual_net(int32_bias=True), "dtype", "conv1_bias_DQ", "Int32"),
        (qlinearconv_net, "qoperator", "qconv", "UNSUPPORTED_NODE"),
    ],
    ids=["int8-nonzero-zero-point", "uint8-zero-point-128", "int32-bias-dq", "qlinearconv"],
)
def test_parser_rejects_the_node_the_linter_flags(tmp_path, model, rule, node, parser_says):
    graph = model()
    assert (rule, node) in _lint(graph)
    with pytest.raises(CheckFailedError) as err:
        _build(graph, tmp_path)
    first_line = str(err.value).splitlines()[0]
    assert re.search(rf"node {node} \(", first_line) and parser_says in first_line, first_line


def test_uint8_is_flagged_where_tensorrt_only_warns(tmp_path):
    graph = qdq_residual_net(act_type=TensorProto.UINT8, zero_point=0)
    assert ("dtype", "input_Q") in _lint(graph)
    assert "Defaulting to INT8" in _build(graph, tmp_path).info["warnings"]


def test_wrong_weight_axis_is_flagged_where_tensorrt_falls_back_to_float(tmp_path):
    graph = qdq_residual_net(conv2_weight_axis=1)
    assert ("weight-axis", "conv2_w_DQ") in _lint(graph)
    report = ADAPTER.kernel_report(_build(graph, tmp_path))
    assert [name for name in report.fallback_layers if "conv2" in name] == report.fallback_layers
    assert len(report.fallback_layers) == 1
