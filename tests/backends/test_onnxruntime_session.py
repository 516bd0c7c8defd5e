"""onnxruntime's QDQ propagation, on, off or chosen per model by timing (backends/onnxruntime/
session.py), and the runner loading the model with the optimizers the build chose."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from qat_deploy.backends.onnxruntime import adapter as ort_adapter
from qat_deploy.backends.onnxruntime.adapter import ADAPTER
from qat_deploy.backends.onnxruntime.kernels import graph_precisions
from qat_deploy.backends.onnxruntime.session import (
    PROPAGATION,
    PROPAGATION_MARGIN,
    prefer_without_propagation,
)
from qat_deploy.deploy.common.errors import BadInputError

SHAPE = [64, 64]
BLOCKS = [64, 16, 2, 2]


def _qdq_model(path, middle: str) -> str:
    """x -> Q -> DQ -> Reshape -> Transpose -> Reshape -> y, where propagation makes the
    Transpose 8-bit as in MobileViT's patch unfold (the Reshapes keep onnxruntime's transpose
    optimizer from moving it above the DQ); or x -> Q -> DQ -> Sigmoid -> y, which it leaves."""
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["dq"]),
    ]
    if middle == "Transpose":
        nodes += [
            helper.make_node("Reshape", ["dq", "blocks"], ["r"]),
            helper.make_node("Transpose", ["r"], ["t"], perm=[0, 2, 1, 3]),
            helper.make_node("Reshape", ["t", "flat"], ["y"]),
        ]
    else:
        nodes.append(helper.make_node(middle, ["dq"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, SHAPE)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [
            helper.make_tensor("s", TensorProto.FLOAT, [], [0.01]),
            helper.make_tensor("z", TensorProto.UINT8, [], [128]),
            helper.make_tensor("blocks", TensorProto.INT64, [4], BLOCKS),
            helper.make_tensor("flat", TensorProto.INT64, [2], [SHAPE[0], -1]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return path


def _transpose_precision(engine) -> str:
    graph = onnx.load(str(engine.artifact)).graph
    return next(
        layer.precision for layer in graph_precisions(graph) if layer.layer_type == "Transpose"
    )


@pytest.mark.parametrize(("choice", "precision"), [("on", "int8"), ("off", "float")])
def test_propagation_decides_whether_the_transpose_runs_on_8_bit_data(choice, precision, tmp_path):
    model = _qdq_model(tmp_path / "m.onnx", "Transpose")
    engine = ADAPTER.with_options(qdq_propagation=choice).build(
        model, tmp_path / choice, precision="int8", threads=1
    )
    assert _transpose_precision(engine) == precision
    assert (PROPAGATION in engine.info["disabled_optimizers"]) == (choice == "off")


def test_measuring_ships_the_graph_of_the_setting_it_names(tmp_path):
    model = _qdq_model(tmp_path / "m.onnx", "Transpose")
    engine = ADAPTER.build(model, tmp_path / "measured", precision="int8", threads=1)
    chosen_off = PROPAGATION in engine.info["disabled_optimizers"]
    assert engine.info["qdq_propagation"].startswith(
        f"{PROPAGATION} {'off' if chosen_off else 'on'}: median"
    )
    assert _transpose_precision(engine) == ("float" if chosen_off else "int8")


def test_measuring_skips_the_timing_when_propagation_changes_nothing(tmp_path):
    model = _qdq_model(tmp_path / "m.onnx", "Sigmoid")
    engine = ADAPTER.build(model, tmp_path / "e", precision="int8", threads=1)
    assert engine.info["qdq_propagation"] == f"{PROPAGATION} on: it changes nothing"
    assert PROPAGATION not in engine.info["disabled_optimizers"]


def test_the_runner_disables_what_the_build_did(tmp_path, monkeypatch):
    seen = []
    real = ort_adapter.create_session

    def spy(*args, **kwargs):
        seen.append(args[3] if len(args) > 3 else kwargs.get("disabled"))
        return real(*args, **kwargs)

    model = _qdq_model(tmp_path / "m.onnx", "Transpose")
    engine = ADAPTER.with_options(qdq_propagation="off").build(
        model, tmp_path / "e", precision="int8", threads=1
    )
    monkeypatch.setattr(ort_adapter, "create_session", spy)
    x = np.random.default_rng(0).uniform(-1, 1, SHAPE).astype(np.float32)
    with ADAPTER.runner(engine) as runner:
        y = runner.infer({"x": x})["y"]
    assert seen and PROPAGATION in seen[0]
    codes = np.clip(np.round(x / 0.01) + 128, 0, 255)
    expected = ((codes - 128) * 0.01).reshape(BLOCKS).transpose(0, 2, 1, 3).reshape(SHAPE)
    np.testing.assert_allclose(y, expected, atol=1e-6)


def test_without_propagation_only_when_faster_by_more_than_the_margin():
    faster = 1.0 - PROPAGATION_MARGIN
    assert prefer_without_propagation(10.0, 10.0 * faster * 0.99)
    assert not prefer_without_propagation(10.0, 10.0 * faster * 1.01)
    assert not prefer_without_propagation(10.0, 12.0)


def test_an_unknown_propagation_setting_is_bad_input():
    with pytest.raises(BadInputError, match="qdq_propagation 'sometimes'"):
        ADAPTER.with_options(qdq_propagation="sometimes")
