"""An index over one ONNX graph: who produces and consumes each tensor, which tensors are
constant, and each node's op kind in the rules' vocabulary (deploy.capture names the same kinds
for torch.fx nodes), so that backend rules written once apply to any exporter's graph."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

import numpy as np
import onnx
from onnx import NodeProto, helper, numpy_helper

#: ONNX op type -> op kind of deploy.rules. MatMul with a constant right side is "linear".
ONNX_KINDS: Mapping[str, str] = {
    "Conv": "conv",
    "ConvTranspose": "conv_transpose",
    "Gemm": "linear",
    "MatMul": "matmul",
    "BatchNormalization": "bn",
    "Relu": "relu",
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
    "Softmax": "softmax",
    "LeakyRelu": "leaky_relu",
    "LayerNormalization": "layer_norm",
    "Gelu": "gelu",
    "Reshape": "reshape",
    "Flatten": "reshape",
    "Squeeze": "reshape",
    "Unsqueeze": "reshape",
    "Transpose": "transpose",
    "Pad": "pad",
    "Identity": "identity",
    "Dropout": "identity",
    "Slice": "getitem",
    "Gather": "getitem",
    "Split": "getitem",
}
#: Ops whose every input carries data; the others carry data on input 0 only (the rest are
#: shapes, axes, pads or resize scales).
_ALL_DATA_INPUTS = frozenset({"Add", "Mul", "MatMul", "Concat"})
QUANTIZE = "QuantizeLinear"
DEQUANTIZE = "DequantizeLinear"


class Graph:
    """Read-only lookups over a ModelProto's main graph (subgraphs are not visited)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.nodes: list[NodeProto] = list(model.graph.node)
        self.initializers = {t.name: t for t in model.graph.initializer}
        self.producer: dict[str, NodeProto] = {o: n for n in self.nodes for o in n.output if o}
        self.consumers: dict[str, list[tuple[NodeProto, int]]] = defaultdict(list)
        for node in self.nodes:
            for index, name in enumerate(node.input):
                if name:
                    self.consumers[name].append((node, index))
        self._constants = self._find_constants()
        self._types = {
            v.name: v.type.tensor_type.elem_type
            for v in (*model.graph.value_info, *model.graph.input, *model.graph.output)
        }

    def _find_constants(self) -> set[str]:
        """Tensors known before run time: initializers, Constant outputs and anything computed
        from those alone. One pass suffices because ONNX nodes are topologically sorted."""
        constants = set(self.initializers)
        for node in self.nodes:
            inputs = [i for i in node.input if i]
            if node.op_type == "Constant" or (inputs and all(i in constants for i in inputs)):
                constants.update(o for o in node.output if o)
        return constants

    def is_constant(self, name: str) -> bool:
        return name in self._constants

    def opset(self) -> int:
        return next((o.version for o in self.model.opset_import if o.domain in ("", "ai.onnx")), 0)

    def kind(self, node: NodeProto) -> str | None:
        kind = ONNX_KINDS.get(node.op_type)
        if kind == "matmul" and len(node.input) > 1 and self.is_constant(node.input[1]):
            return "linear"
        return kind

    def data_inputs(self, node: NodeProto) -> list[str]:
        names = list(node.input) if node.op_type in _ALL_DATA_INPUTS else list(node.input[:1])
        return [n for n in names if n]

    def runtime_inputs(self, node: NodeProto) -> list[str]:
        return [n for n in self.data_inputs(node) if not self.is_constant(n)]

    def _constant_tensor(self, name: str) -> onnx.TensorProto | None:
        if name in self.initializers:
            return self.initializers[name]
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            value = next((a for a in node.attribute if a.name == "value"), None)
            return value.t if value is not None else None
        return None

    def value(self, name: str) -> np.ndarray | None:
        """The array of a constant tensor (initializer or Constant node), None if computed."""
        if not name:
            return None
        tensor = self._constant_tensor(name)
        if tensor is not None:
            return numpy_helper.to_array(tensor)
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant" and node.attribute:
            return np.asarray(helper.get_attribute_value(node.attribute[0]))
        return None

    def elem_type(self, name: str) -> int | None:
        """ONNX element type (TensorProto.INT8, ...) of a tensor, if the file states it."""
        tensor = self._constant_tensor(name)
        return tensor.data_type if tensor is not None else self._types.get(name) or None

    def rank(self, name: str) -> int | None:
        tensor = self._constant_tensor(name)
        return len(tensor.dims) if tensor is not None else None

    @staticmethod
    def label(node: NodeProto) -> str:
        """A node's name, or (names are optional in ONNX) its op type and first output."""
        return node.name or f"{node.op_type}({node.output[0] if node.output else ''})"


def attribute(node: NodeProto, name: str, default=None):
    """An attribute's value, or `default` when the node does not set it."""
    found = next((a for a in node.attribute if a.name == name), None)
    return default if found is None else helper.get_attribute_value(found)
