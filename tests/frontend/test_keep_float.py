"""Mixed precision: layers the user keeps float (prepare's keep_float, `--keep-float`).

Expected placements are written by hand from the rules (see test_placement.py for the
all-int8 ones): a kept layer loses its weight quantizer and the input/output quantizers its
own rule asked for; quantizers other int8 ops need stay, and the kept layer reads those. An op
whose every data neighbour is float, one of them kept (the residual Add after a kept conv2,
between the block's input and output), stays float with it (deploy.rules.backend.float_islands).
"""

from __future__ import annotations

import onnx
import pytest
import torch
from torch import nn

from qat_deploy.deploy.common.errors import BadInputError
from qat_deploy.deploy.export.qdq import export
from qat_deploy.deploy.frontend.prepare import prepare
from qat_deploy.deploy.lint import float_by_rule, lint, quantized_by_rule
from qat_deploy.deploy.rules.ops import FLOAT_KEY
from tests.frontend.blocks import BasicBlock, FusedQKVAttention, randomize_bn
from tests.frontend.test_placement import IMG, SEQ, TARGETS

#: BasicBlock with conv2 kept float (its BN folds into it, so the Add reads "conv2"): the Add
#: reads the float input and conv2 and feeds the output, so it stays float
KEPT_CONV2 = {
    "tensorrt": {("x", "conv1")},
    "openvino": {("x", "conv1")},
    # QLinearConv conv1 writes int8 (OpRule.output), so the float conv2 reads it dequantized
    "onnxruntime": {("x", "conv1"), ("relu1", "conv2")},
}


@pytest.mark.parametrize("target", TARGETS)
def test_a_kept_layer_has_no_quantizer_of_its_own(target):
    prepared = prepare(
        randomize_bn(BasicBlock()), target, IMG, reduce_range=False, keep_float=["conv2"]
    )
    assert prepared.plan.kept_float == ["conv2"]
    assert prepared.plan.weight_layers == {"conv1"}
    assert prepared.plan.activation_edges == KEPT_CONV2[target]
    assert {"conv2", "add"} <= set(prepared.plan.float_ops)


#: BasicBlock with conv1 kept float: the Add reads the int8 conv2, so its rule still applies
KEPT_CONV1 = {
    "tensorrt": {("relu1", "conv2"), ("x", "add")},
    "openvino": {("relu1", "conv2"), ("x", "add"), ("conv2", "add")},
    "onnxruntime": {("relu1", "conv2"), ("x", "add"), ("conv2", "add")},
}


@pytest.mark.parametrize("target", TARGETS)
def test_an_op_beside_an_int8_layer_keeps_its_rule(target):
    prepared = prepare(
        randomize_bn(BasicBlock()), target, IMG, reduce_range=False, keep_float=["conv1"]
    )
    assert prepared.plan.weight_layers == {"conv2"}
    assert prepared.plan.activation_edges == KEPT_CONV1[target]
    assert "add" not in prepared.plan.float_ops


@pytest.mark.parametrize("target", TARGETS)
def test_keeping_every_layer_float_is_bad_input_naming_them(target):
    with pytest.raises(BadInputError, match=r"keep_float keeps every layer .*conv1, conv2"):
        prepare(randomize_bn(BasicBlock()), target, IMG, keep_float=["conv*"])


@pytest.mark.parametrize("target", TARGETS)
def test_the_export_tags_kept_layers_and_lint_accepts_them(target, tmp_path):
    prepared = prepare(randomize_bn(BasicBlock()), target, IMG, keep_float=["conv2"])
    with torch.no_grad():
        prepared(IMG)
    path = export(prepared, tmp_path / "m.onnx", IMG)
    model = onnx.load(path)
    convs = {n.name: n for n in model.graph.node if n.op_type == "Conv"}
    tagged = [n for n in convs.values() if any(p.key == FLOAT_KEY for p in n.metadata_props)]
    assert len(convs) == 2 and len(tagged) == 1
    (kept,) = tagged
    weights = {i.name for i in model.graph.initializer}
    assert kept.input[1] in weights  # a float initializer, no DequantizeLinear in between
    assert lint(model, target) == []
    assert float_by_rule(model, target) == [kept.name]
    assert quantized_by_rule(model, target) == [n for n in convs if n != kept.name]
    # without its tag the same graph is a float Conv where the rules want int8: lint says so
    del kept.metadata_props[:]
    assert any(v.node == kept.name for v in lint(model, target))


def test_a_pattern_matching_no_layer_is_bad_input_naming_it():
    with pytest.raises(BadInputError, match=r"'classifier' matches no Conv/Linear layer.*conv1"):
        prepare(BasicBlock(), "onnxruntime", IMG, keep_float=["classifier"])


def test_a_glob_of_the_users_path_keeps_the_pieces_lowering_made_of_that_layer():
    """TensorRT splits a fused qkv Linear into three (fresh paths qkv_0..2): --keep-float
    'qkv' names the user's layer and keeps all three float."""
    prepared = prepare(FusedQKVAttention(d=16), "tensorrt", SEQ, keep_float=["qkv"])
    assert prepared.plan.kept_float == ["qkv_0", "qkv_1", "qkv_2"]
    assert prepared.plan.weight_layers == {"proj"}


class _EfficientChannelAttention(nn.Module):
    """timm's ECA gate: a Conv1d over the pooled channels, a sigmoid, expand_as onto x."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(8, 8, 3, padding=1)
        self.gate = nn.Conv1d(1, 1, 3, padding=1, bias=False)

    def forward(self, x):
        x = self.conv0(x)
        y = self.gate(x.mean((2, 3)).view(x.shape[0], 1, -1))
        return x * torch.sigmoid(y).view(x.shape[0], -1, 1, 1).expand_as(x)


@pytest.mark.parametrize("target", TARGETS)
def test_a_kept_gate_conv_before_an_expand_as_exports_lint_clean(target, tmp_path):
    """The sigmoid between the kept Conv1d and the int8 Mul keeps its rule: expand_as is a
    reshape to prepare as it is to lint (it had no kind, so prepare left the sigmoid float
    while lint wanted its input quantized: 8 violations on timm ECA-ResNet26t)."""
    prepared = prepare(_EfficientChannelAttention().eval(), target, IMG, keep_float=["gate"])
    with torch.no_grad():
        prepared(IMG)
    model = onnx.load(export(prepared, tmp_path / "m.onnx", IMG))
    assert lint(model, target) == []
    assert len(float_by_rule(model, target)) == 1
