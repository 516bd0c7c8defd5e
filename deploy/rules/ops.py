"""The one op vocabulary: what each node of a captured graph, an ONNX graph or a built engine
computes, in the kind names backends/<name>/rules.py are written in.

The front end names torch.export's ATen ops (ATEN_KINDS), the linter names ONNX ops
(ONNX_KINDS; our own exports carry each node's ATen kind in its metadata, so both see the same
kinds), and the adapters name engine layers with COMPUTE_KINDS. Whether a graph is a
transformer is decided here once (is_transformer), for prepare() and lint() alike.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from onnx import NodeProto

#: ONNX metadata keys our exports carry: each node's kind and the torch op it came from (nodes
#: of one op share an id), the model's rule mode ("cnn" / "transformer"), and "1" on the nodes
#: of a layer the user keeps float (prepare's keep_float), which no rule applies to; LAYER_KEY
#: names the user's layer a node belongs to (its module path, else the torch op's name), so
#: reports speak of "layer1.conv2", not of the exporter's tensor names.
KIND_KEY, OP_KEY, MODE_KEY = "qat_deploy.kind", "qat_deploy.op", "qat_deploy.mode"
FLOAT_KEY, LAYER_KEY = "qat_deploy.float", "qat_deploy.layer"


def layer_of(node: NodeProto) -> str | None:
    """The user's layer an exported node belongs to (its LAYER_KEY tag), if tagged."""
    return next((p.value for p in node.metadata_props if p.key == LAYER_KEY), None)


#: Weighted ops: a data input plus a constant weight that gets a per-channel quantizer.
WEIGHTED_KINDS = ("conv", "conv_transpose", "linear")
#: Layer kinds the int8 claim is about: a model "runs int8" when these do.
COMPUTE_KINDS = ("conv", "conv_transpose", "linear", "matmul")


def conv_groups(in_channels: int, out_channels: int, groups: int) -> str:
    """A convolution's group shape, which decides the int8 kernel a runtime picks: "dense"
    (one group), "depthwise" (one input and one output channel per group),
    "channel_multiplier" (one input channel, several outputs per group: FastViT's and
    Xception-style downsampling) or "grouped" (ResNeXt, RegNet)."""
    if groups == 1:
        return "dense"
    if in_channels == groups:
        return "depthwise" if out_channels == groups else "channel_multiplier"
    return "grouped"


#: ATen op (overload packet name) -> kind. Ops absent here have no kind: they are neither
#: quantized nor counted as float compute (shape arithmetic, constants, ...).
ATEN_KINDS: Mapping[str, str] = {
    **dict.fromkeys(("conv1d", "conv2d", "conv3d", "convolution"), "conv"),
    **dict.fromkeys(("conv_transpose1d", "conv_transpose2d", "conv_transpose3d"), "conv_transpose"),
    "linear": "linear",
    **dict.fromkeys(("matmul", "mm", "bmm"), "matmul"),
    **dict.fromkeys(("batch_norm", "_native_batch_norm_legit_no_training"), "bn"),
    **dict.fromkeys(("relu", "relu_"), "relu"),
    **dict.fromkeys(("relu6", "hardtanh", "hardtanh_"), "relu6"),
    **dict.fromkeys(("add", "add_"), "add"),
    **dict.fromkeys(("mul", "mul_"), "mul"),
    **dict.fromkeys(("cat", "concat", "concatenate"), "concat"),
    **dict.fromkeys(("max_pool1d", "max_pool2d", "max_pool3d"), "maxpool"),
    **dict.fromkeys(("avg_pool1d", "avg_pool2d", "avg_pool3d"), "avgpool"),
    **dict.fromkeys(("adaptive_avg_pool1d", "adaptive_avg_pool2d"), "global_avgpool"),
    "mean": "reduce_mean",
    **dict.fromkeys(
        (
            "view",
            "_unsafe_view",
            "reshape",
            "flatten",
            "unflatten",
            "squeeze",
            "unsqueeze",
            "expand",
            "expand_as",
            "pixel_shuffle",
            "pixel_unshuffle",
        ),
        "reshape",
    ),
    **dict.fromkeys(("transpose", "permute", "t", "swapaxes"), "transpose"),
    **dict.fromkeys(("contiguous", "clone", "dropout", "alias", "detach", "to"), "identity"),
    **dict.fromkeys(
        ("slice", "select", "split", "split_with_sizes", "chunk", "unbind", "narrow", "getitem"),
        "getitem",
    ),
    **dict.fromkeys(("silu", "silu_"), "silu"),
    **dict.fromkeys(("hardswish", "hardswish_"), "hardswish"),
    **dict.fromkeys(("hardsigmoid", "hardsigmoid_"), "hardsigmoid"),
    **dict.fromkeys(("sigmoid", "sigmoid_"), "sigmoid"),
    "tanh": "tanh",
    "gelu": "gelu",
    **dict.fromkeys(("leaky_relu", "leaky_relu_"), "leaky_relu"),
    "layer_norm": "layer_norm",
    "group_norm": "group_norm",
    **dict.fromkeys(("softmax", "_softmax"), "softmax"),
    "embedding": "embedding",
    "scaled_dot_product_attention": "attention",
    **dict.fromkeys(
        ("upsample_nearest2d", "upsample_bilinear2d", "interpolate", "upsample_nearest1d"),
        "interpolate",
    ),
    **dict.fromkeys(("constant_pad_nd", "pad"), "pad"),
}

#: ONNX op type -> kind, for graphs that do not carry our per-node kinds (other exporters).
#: MatMul with a constant right side is "linear" (deploy.lint.graph decides that).
ONNX_KINDS: Mapping[str, str] = {
    "Conv": "conv",
    "ConvTranspose": "conv_transpose",
    "Gemm": "linear",
    "MatMul": "matmul",
    "BatchNormalization": "bn",
    "Relu": "relu",
    "Clip": "relu6",
    "Add": "add",
    "Mul": "mul",
    "Concat": "concat",
    "MaxPool": "maxpool",
    "AveragePool": "avgpool",
    "GlobalAveragePool": "global_avgpool",
    "ReduceMean": "reduce_mean",
    "Resize": "interpolate",
    "Upsample": "interpolate",
    "Sigmoid": "sigmoid",
    "HardSigmoid": "hardsigmoid",
    "HardSwish": "hardswish",
    "Tanh": "tanh",
    "Softmax": "softmax",
    "LeakyRelu": "leaky_relu",
    "LayerNormalization": "layer_norm",
    "GroupNormalization": "group_norm",
    "Gelu": "gelu",
    "Reshape": "reshape",
    "Flatten": "reshape",
    "Squeeze": "reshape",
    "Unsqueeze": "reshape",
    "Expand": "reshape",
    "DepthToSpace": "reshape",
    "SpaceToDepth": "reshape",
    "Transpose": "transpose",
    "Pad": "pad",
    "Identity": "identity",
    "Dropout": "identity",
    "Slice": "getitem",
    "Gather": "getitem",
    "Split": "getitem",
}


#: Attention is what makes a transformer: scaled_dot_product_attention, or a MatMul of two
#: activations beside a Softmax (attention written out). LayerNorm alone does not (ConvNeXt and
#: MLP-Mixer are CNNs with LayerNorm), nor does a Softmax alone (a classifier head).
def is_transformer(kinds: Iterable[str | None]) -> bool:
    """Whether a graph with these op kinds gets its backend's transformer rules."""
    present = set(kinds)
    return "attention" in present or {"matmul", "softmax"} <= present


def aten_kind(target) -> str | None:
    """The kind of an fx call_function target from torch.export (an ATen OpOverload, or
    operator.getitem for multi-output ops)."""
    packet = getattr(target, "overloadpacket", None)
    name = getattr(packet, "__name__", None) or getattr(target, "__name__", None)
    return ATEN_KINDS.get(name) if name else None
