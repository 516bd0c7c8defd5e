"""An index over one ONNX graph: who produces and consumes each tensor, which tensors are
constant, and each node's op kind in the rules' vocabulary (deploy.rules.ops), so that backend rules
written once apply to any exporter's graph. Our own exports name each node's kind and the torch
op it came from in its metadata (deploy.export.qdq.tag_op_kinds); other graphs are read by op
type."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

import numpy as np
import onnx
from onnx import NodeProto, helper, numpy_helper

from qat_deploy.deploy.rules.ops import FLOAT_KEY, KIND_KEY, MODE_KEY, ONNX_KINDS, OP_KEY

#: Ops whose every input carries data; the others carry data on input 0 only (the rest are
#: shapes, axes, pads or resize scales).
_ALL_DATA_INPUTS = frozenset({"Add", "Mul", "MatMul", "Concat"})
#: The ONNX ops that compute a weighted / compute kind; the other nodes a torch op of that
#: kind exports to only move or add to its data.
_ANCHORS: Mapping[str, frozenset[str]] = {
    "conv": frozenset({"Conv"}),
    "conv_transpose": frozenset({"ConvTranspose"}),
    "linear": frozenset({"Gemm", "MatMul"}),
    "matmul": frozenset({"MatMul"}),
}
#: Ops whose type says more than the torch op they came from: which pooling, and whether a
#: convolution is transposed (a ConvTranspose2d module exports through aten.convolution).
_OP_TYPE_DECIDES = frozenset({"GlobalAveragePool", "AveragePool", "Conv", "ConvTranspose"})
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
        values = (*model.graph.value_info, *model.graph.input, *model.graph.output)
        self._types = {v.name: v.type.tensor_type.elem_type for v in values}
        self._ranks = {
            v.name: len(v.type.tensor_type.shape.dim)
            for v in values
            if v.type.tensor_type.HasField("shape")
        }
        self._tags = {id(n): _tags(n) for n in self.nodes}
        self._kept_float = {id(n) for n in self.nodes if _kept_float(n)}
        self.mode = next((p.value for p in model.metadata_props if p.key == MODE_KEY), None)

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

    def kept_float(self, node: NodeProto) -> bool:
        """A node of a layer the user keeps float (FLOAT_KEY): no op rule applies to it."""
        return id(node) in self._kept_float

    def kind(self, node: NodeProto) -> str | None:
        kind, _ = self._tags[id(node)]
        if kind is None or node.op_type in _OP_TYPE_DECIDES:
            kind = ONNX_KINDS.get(node.op_type)
        elif kind in _ANCHORS and node.op_type not in _ANCHORS[kind]:
            # the weight Transpose or bias Add a weighted op exports beside its Conv / MatMul
            moves = ONNX_KINDS.get(node.op_type) in ("reshape", "transpose", "identity")
            kind = ONNX_KINDS[node.op_type] if moves else None
        if kind == "matmul" and len(node.input) > 1 and self.is_constant(node.input[1]):
            return "linear"
        if kind == "reduce_mean" and self._spatial_mean(node):
            return "global_avgpool"
        return kind or None

    def _spatial_mean(self, node: NodeProto) -> bool:
        """ReduceMean over H and W of an NCHW tensor: global average pooling."""
        axes = attribute(node, "axes", None)
        if axes is None and len(node.input) > 1:
            found = self.value(node.input[1])
            axes = None if found is None else found.tolist()
        if self._ranks.get(node.input[0]) != 4:
            return False
        return sorted(a % 4 for a in axes or []) == [2, 3]

    def part_of_weighted(self, node: NodeProto) -> bool:
        """A node exported beside a weighted op's anchor (a Linear's bias Add): the data
        crosses it into or out of that op."""
        tagged, _ = self._tags[id(node)]
        return tagged in _ANCHORS and self.kind(node) is None

    def same_op(self, a: NodeProto, b: NodeProto) -> bool:
        """Whether two ONNX nodes were exported from one torch op (a SiLU's Sigmoid and Mul)."""
        op = self._tags[id(a)][1]
        return op is not None and op == self._tags[id(b)][1]

    def data_inputs(self, node: NodeProto) -> list[str]:
        """Inputs carrying data into the torch op `node` belongs to: not shapes or axes, and
        not the values the op computes inside itself."""
        names = list(node.input) if node.op_type in _ALL_DATA_INPUTS else list(node.input[:1])
        return [
            n
            for n in names
            if n and not ((p := self.producer.get(n)) is not None and self.same_op(p, node))
        ]

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

    def is_stored(self, name: str) -> bool:
        """A constant the file holds as a tensor (initializer or Constant node), not one the
        graph computes from constants (is_constant counts both): value() has its array."""
        return self._constant_tensor(name) is not None

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


def _kept_float(node: NodeProto) -> bool:
    return any(p.key == FLOAT_KEY and p.value == "1" for p in node.metadata_props)


def _tags(node: NodeProto) -> tuple[str | None, str | None]:
    """(kind, op id) from our export's node metadata; (None, None) for untagged nodes. A tagged
    node of a torch op without a kind has kind "" (it is known to compute nothing quantizable)."""
    props = {p.key: p.value for p in node.metadata_props}
    return props.get(KIND_KEY), props.get(OP_KEY)


def attribute(node: NodeProto, name: str, default=None):
    """An attribute's value, or `default` when the node does not set it."""
    found = next((a for a in node.attribute if a.name == name), None)
    return default if found is None else helper.get_attribute_value(found)
