"""Channel shuffles rewritten as one Gather (backends/onnxruntime/channel_shuffle.py), checked
against torch's own nn.ChannelShuffle and against onnxruntime running the original graph."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from qat_deploy.backends.onnxruntime.adapter import ADAPTER
from qat_deploy.backends.onnxruntime.channel_shuffle import channel_shuffle_as_gather
from qat_deploy.deploy.export.qdq import export, export_fp32
from qat_deploy.deploy.frontend.prepare import prepare
from qat_deploy.deploy.lint import lint
from qat_deploy.deploy.training.calibrate import calibrate
from tests.ort_outputs import engine_cosine


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _shuffle_graph(
    shape: list[int],
    groups: int,
    perm: list[int] | None = None,
    split: list[int] | None = None,
    qdq_scale: np.ndarray | None = None,
) -> onnx.ModelProto:
    """x -> Reshape(split) -> [Q -> DQ] -> Transpose(perm) -> Reshape(x's shape) -> y."""
    n, c, *spatial = shape
    split = split or [n, groups, c // groups, *spatial]
    perm = perm or [0, 2, 1, *range(3, len(split))]
    inits = [
        numpy_helper.from_array(np.array(split, np.int64), "split"),
        numpy_helper.from_array(np.array(shape, np.int64), "merged"),
    ]
    nodes = [helper.make_node("Reshape", ["x", "split"], ["v"])]
    moved = "v"
    if qdq_scale is not None:
        inits += [
            numpy_helper.from_array(qdq_scale.astype(np.float32), "s"),
            numpy_helper.from_array(np.zeros(qdq_scale.shape, np.uint8), "z"),
        ]
        axis = {"axis": 1} if qdq_scale.size > 1 else {}
        nodes += [
            helper.make_node("QuantizeLinear", ["v", "s", "z"], ["vq"], **axis),
            helper.make_node("DequantizeLinear", ["vq", "s", "z"], ["vd"], **axis),
        ]
        moved = "vd"
    nodes += [
        helper.make_node("Transpose", [moved], ["t"], perm=perm),
        helper.make_node("Reshape", ["t", "merged"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "shuffle",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        inits,
    )
    return onnx.shape_inference.infer_shapes(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    )


@pytest.mark.parametrize(
    ("shape", "groups"), [([1, 12, 5, 7], 2), ([2, 12, 3, 3], 3), ([1, 8, 6], 4)]
)
def test_the_gather_computes_torchs_channel_shuffle(shape, groups):
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    model = _shuffle_graph(shape, groups)
    assert channel_shuffle_as_gather(model) == 1
    onnx.checker.check_model(model, full_check=True)
    assert [n.op_type for n in model.graph.node] == ["Gather"]
    expected = nn.ChannelShuffle(groups)(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(_run(model, x), expected)


def test_per_tensor_quantizers_between_stay_and_keep_the_codes():
    x = np.random.default_rng(1).uniform(0, 2, (1, 8, 4, 4)).astype(np.float32)
    original = _shuffle_graph([1, 8, 4, 4], 2, qdq_scale=np.array(0.01))
    rewritten = _shuffle_graph([1, 8, 4, 4], 2, qdq_scale=np.array(0.01))
    assert channel_shuffle_as_gather(rewritten) == 1
    onnx.checker.check_model(rewritten, full_check=True)
    ops = [n.op_type for n in rewritten.graph.node]
    assert ops == ["QuantizeLinear", "DequantizeLinear", "Gather"]
    np.testing.assert_array_equal(_run(rewritten, x), _run(original, x))


@pytest.mark.parametrize(
    "variant",
    [
        {"perm": [0, 1, 2, 4, 3]},  # a different permutation: not a channel shuffle
        {"split": [1, 2, 4, 16]},  # a reshape that merges the spatial axes
        {"qdq_scale": np.full(2, 0.01)},  # a per-channel quantizer depends on the shape
    ],
    ids=["other-perm", "other-split", "per-channel-qdq"],
)
def test_other_reshape_transpose_chains_are_left_alone(variant):
    model = _shuffle_graph([1, 8, 4, 4], 2, **variant)
    assert channel_shuffle_as_gather(model) == 0
    assert "Gather" not in {n.op_type for n in model.graph.node}


class _ShuffleUnit(nn.Module):
    """ShuffleNetV2's stride-1 unit: half the channels through a branch, concat, shuffle."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        half = c // 2
        self.branch = nn.Sequential(
            nn.Conv2d(half, half, 1),
            nn.ReLU(),
            nn.Conv2d(half, half, 3, padding=1, groups=half),
            nn.Conv2d(half, half, 1),
            nn.ReLU(),
        )
        self.head = nn.Conv2d(c, c, 1)

    def forward(self, x):
        keep, through = x.chunk(2, dim=1)
        y = torch.cat((keep, self.branch(through)), dim=1)
        n, c, h, w = y.shape
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.head(y)


@pytest.mark.parametrize("precision", ["int8", "fp32"])
def test_the_engine_runs_the_shuffle_as_one_gather(tmp_path, precision):
    torch.manual_seed(0)
    x = torch.randn(1, 16, 8, 8)
    model = _ShuffleUnit().eval()
    if precision == "int8":
        prepared = prepare(model, "onnxruntime", x, reduce_range=False)
        calibrate(prepared, [torch.randn(8, 16, 8, 8)], progress=False)
        path = export(prepared, tmp_path / "m.onnx", x)
        assert lint(path, "onnxruntime") == []
    else:
        prepared, path = model, export_fp32(model, tmp_path / "m.onnx", x)
    engine = ADAPTER.build(path, tmp_path / "e", precision=precision, threads=1)
    assert engine.info["channel_shuffle_as_gather"] == "1"
    nodes = onnx.load(str(engine.artifact)).graph.node
    assert collections.Counter(n.op_type for n in nodes)["Gather"] == 1
    perms = [list(a.ints) for n in nodes if n.op_type == "Transpose" for a in n.attribute]
    assert all(len(perm) == 4 for perm in perms)  # layout transposes only: no 5-D shuffle left
    with torch.no_grad():
        expected = prepared(x).numpy()
    # the engine computes what the (fake-quant) model does
    assert engine_cosine(ADAPTER, engine, x.numpy(), expected) > 0.999
