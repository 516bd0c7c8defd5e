"""Issue 9: every reference block, prepared by the TensorRT rules and exported, parses with the
real TensorRT ONNX parser and builds with >= 95% of its compute layers taking Int8 inputs."""

from __future__ import annotations

import pytest
import torch

from qat_deploy.deploy.engines.adapter import get_adapter
from qat_deploy.deploy.export.qdq import export
from qat_deploy.deploy.frontend.prepare import prepare
from qat_deploy.deploy.training.calibrate import calibrate
from tests.frontend.blocks import (
    BasicBlock,
    Bottleneck,
    ConcatBlock,
    EncoderBlock,
    FusedQKVAttention,
    InvertedResidual,
    SamePaddingStem,
    UpBlock,
    randomize_bn,
)

pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT-RTX not installed (.[tensorrt-rtx])")

BLOCKS = {
    "basic": (BasicBlock, (8, 8, 8)),
    "bottleneck": (Bottleneck, (8, 8, 8)),
    "inverted_residual": (InvertedResidual, (8, 8, 8)),
    "concat": (ConcatBlock, (8, 8, 8)),
    "encoder": (EncoderBlock, (5, 16)),
    "fused_qkv_attention": (FusedQKVAttention, (16, 64)),
    "conv_transpose_upsampling": (UpBlock, (16, 8, 8)),
    # timm's Pad -> strided Conv, the Pad folded into the Conv's asymmetric pads by the export
    "same_padding": (SamePaddingStem, (3, 16, 16)),
}


@pytest.mark.parametrize("name", list(BLOCKS))
def test_reference_block_builds_int8_with_the_tensorrt_parser(name, tmp_path):
    cls, shape = BLOCKS[name]
    torch.manual_seed(0)
    prepared = prepare(randomize_bn(cls()).eval(), "tensorrt", torch.randn(1, *shape))
    calibrate(prepared, [torch.randn(8, *shape) for _ in range(2)], progress=False)
    path = export(prepared, tmp_path / "block.qdq.onnx", torch.randn(1, *shape))
    adapter = get_adapter("tensorrt")
    engine = adapter.build(path, tmp_path, precision="int8", threads=1)
    report = adapter.kernel_report(engine)
    assert engine.artifact.stat().st_size > 0
    assert report.compute_layers, "no compute layer found in the engine layer information"
    assert report.int8_fraction >= 0.95, report.fallback_layers
