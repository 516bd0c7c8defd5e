"""Which nodes of an onnxruntime-optimized graph compute in int8: the kernel report's source,
and how the build tells whether a graph optimizer changed anything."""

from __future__ import annotations

import onnx

from qat_deploy.deploy.engines.adapter import LayerPrecision

#: op_type -> compute kind, for the compute ops of the CPU EP (int8 and float, all domains:
#: the same op_type appears in ai.onnx, com.microsoft and layout domains such as NCHWc).
COMPUTE_KIND = {
    **dict.fromkeys(("Conv", "FusedConv", "NhwcConv", "NhwcFusedConv"), "conv"),
    **dict.fromkeys(("QLinearConv", "ConvInteger"), "conv"),
    **dict.fromkeys(("ConvTranspose", "QLinearConvTranspose"), "conv_transpose"),
    **dict.fromkeys(("Gemm", "FusedGemm", "QGemm"), "linear"),
    **dict.fromkeys(("MatMul", "FusedMatMul", "TransposeMatMul", "Attention"), "matmul"),
    **dict.fromkeys(
        (
            "QLinearMatMul",
            "MatMulInteger",
            "MatMulIntegerToFloat",
            "DynamicQuantizeMatMul",
            "QAttention",
        ),
        "matmul",
    ),
}

#: Kernels computing in 8-bit integers whatever their input tensor type (the dynamic ones
#: quantize a float input themselves).
INT8_KERNELS = frozenset(
    {
        "QLinearConv",
        "ConvInteger",
        "QLinearConvTranspose",
        "QGemm",
        "QLinearMatMul",
        "MatMulInteger",
        "MatMulIntegerToFloat",
        "DynamicQuantizeMatMul",
        "QAttention",
    }
)

#: Ops whose output keeps the (8-bit) element type of their first input.
_TYPE_PRESERVING = frozenset(
    {
        "Transpose",
        "Reshape",
        "Flatten",
        "Squeeze",
        "Unsqueeze",
        "MaxPool",
        "NhwcMaxPool",
        "Slice",
        "Gather",
        "Split",
        "Concat",
        "Resize",
        "Identity",
        "Pad",
        "Expand",
        "Tile",
        "DepthToSpace",
        "SpaceToDepth",
    }
)
_INT8_TYPES = frozenset({onnx.TensorProto.INT8, onnx.TensorProto.UINT8})


def graph_precisions(graph: onnx.GraphProto) -> list[LayerPrecision]:
    """Each node's precision: int8 for int8 kernels and for nodes fed 8-bit tensors.

    8-bit tensors are followed from the graph inputs and initializers through the nodes
    (topologically sorted, as onnxruntime saves them): quantizing ops and QLinear* kernels
    produce them, type-preserving ops pass them on.
    """
    int8 = {t.name for t in graph.initializer if t.data_type in _INT8_TYPES}
    int8 |= {v.name for v in graph.input if v.type.tensor_type.elem_type in _INT8_TYPES}
    layers = []
    for node in graph.node:
        fed_int8 = bool(node.input) and node.input[0] in int8
        if _produces_int8(node, fed_int8):
            int8.update(node.output)
        layers.append(
            LayerPrecision(
                name=node.name or node.output[0],
                layer_type=node.op_type,
                precision="int8" if node.op_type in INT8_KERNELS or fed_int8 else "float",
                compute_kind=COMPUTE_KIND.get(node.op_type),
            )
        )
    return layers


def _produces_int8(node: onnx.NodeProto, fed_int8: bool) -> bool:
    op = node.op_type
    if op in ("QuantizeLinear", "DynamicQuantizeLinear") or op.startswith("QLinear"):
        return True
    if op == "QGemm":  # quantized output only when y_scale (input 7) is given
        return len(node.input) > 7 and bool(node.input[7])
    return fed_int8 and op in _TYPE_PRESERVING
