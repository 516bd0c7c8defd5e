"""A hybrid CNN + transformer (MobileViT): its MobileNet blocks take the backend's CNN rules,
its token stream the transformer rules (deploy.rules.backend.conv_stage); prepare and lint
agree on which is which."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qat_deploy.deploy.export.qdq import export
from qat_deploy.deploy.frontend.prepare import prepare
from qat_deploy.deploy.lint import lint
from qat_deploy.deploy.rules.backend import available_targets
from tests.frontend.blocks import EncoderBlock, randomize_bn

X = torch.randn(2, 8, 8, 8)


class Hybrid(nn.Module):
    """A stem Conv and a SiLU MobileNet block with a residual Add, its feature map unfolded into
    tokens for an encoder block, folded back and fused with the block's input by a Concat
    and a Conv (MobileViT's layout)."""

    def __init__(self, c=8, d=16):
        super().__init__()
        self.stem = nn.Conv2d(c, c, 3, padding=1)
        self.expand, self.bn1 = nn.Conv2d(c, 2 * c, 1, bias=False), nn.BatchNorm2d(2 * c)
        self.act = nn.SiLU()
        self.project, self.bn2 = nn.Conv2d(2 * c, c, 1, bias=False), nn.BatchNorm2d(c)
        self.to_tokens = nn.Conv2d(c, d, 1)
        self.encoder = EncoderBlock(d)
        self.from_tokens = nn.Conv2d(d, c, 1)
        self.fuse = nn.Conv2d(2 * c, c, 3, padding=1)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.bn2(self.project(self.act(self.bn1(self.expand(x)))))
        t = self.to_tokens(x)
        b, d, h, w = t.shape
        t = self.encoder(t.flatten(2).transpose(1, 2))
        t = self.from_tokens(t.transpose(1, 2).reshape(b, d, h, w))
        return self.fuse(torch.cat([x, t], dim=1))


def _into(prepared, op: str) -> set[str]:
    return {p for p, c in prepared.plan.activation_edges if c == op}


@pytest.mark.parametrize("target", available_targets())
def test_conv_blocks_take_cnn_rules_and_the_token_stream_transformer_rules(target, tmp_path):
    prepared = prepare(randomize_bn(Hybrid()).eval(), target, X[:1], reduce_range=False)
    assert prepared.plan.mode == "transformer"
    ops = prepared.rules.ops
    # the block's residual Add and the Concat: CNN rules where the backend has them
    assert bool(_into(prepared, "add")) == ("add" in ops)
    assert bool(_into(prepared, "cat")) == ("concat" in ops)
    # the encoder's residual Adds read its Linear outputs: token stream, float everywhere
    assert not _into(prepared, "add_1") and not _into(prepared, "add_2")
    with torch.no_grad():
        prepared(X)
    assert lint(export(prepared, tmp_path / "m.onnx", X[:1]), target) == []


def test_onnxruntime_runs_the_blocks_silu_in_int8():
    """onnxruntime's CNN rules write SiLU out as QLinearSigmoid + QLinearMul; in the
    transformer rules it would stay float between quantized Convs."""
    prepared = prepare(randomize_bn(Hybrid()).eval(), "onnxruntime", X[:1], reduce_range=False)
    assert _into(prepared, "sigmoid_default") == {"expand"}
    assert _into(prepared, "mul_tensor") == {"expand", "sigmoid_default"}
