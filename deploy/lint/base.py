"""What a check reports (Violation) and what it reads (Context: the graph plus the target's
rules, with the graph walks that depend on those rules)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property

from onnx import NodeProto

from qat_deploy.deploy.lint.graph import DEQUANTIZE, QUANTIZE, Graph
from qat_deploy.deploy.rules.backend import (
    FUSED_ACTIVATIONS,
    BackendRules,
    OpRule,
    conv_stage,
    float_islands,
    hardly_negative,
    rectified,
)
from qat_deploy.deploy.rules.ops import WEIGHTED_KINDS, is_transformer


@dataclass(frozen=True)
class Violation:
    """One place where a graph departs from a target's rules."""

    rule: str  # short id, e.g. "zero-point"
    node: str  # name of the offending node ("" when the whole model is at fault)
    message: str


@dataclass(frozen=True)
class Use:
    """A consumer of a quantized tensor, past any Q->DQ and pass-through ops on the way."""

    node: NodeProto
    index: int  # which input of `node`
    path: tuple[NodeProto, ...]  # the DequantizeLinear / pass-through nodes crossed


@dataclass(frozen=True)
class Context:
    graph: Graph
    rules: BackendRules

    @cached_property
    def transformer(self) -> bool:
        """The mode prepare() chose, where the file says; else the same guess prepare makes."""
        if self.graph.mode is not None:
            return self.graph.mode == "transformer"
        return is_transformer(self.graph.kind(n) for n in self.graph.nodes)

    def op_rules(self, node: NodeProto) -> Mapping[str, OpRule]:
        """The rules of the node's place: the model's mode, CNN in a transformer's conv stages
        (deploy.rules.backend.conv_stage, as prepare() decides them)."""
        return self.rules.op_rules(self.transformer and id(node) not in self._conv_stage)

    def rule(self, node: NodeProto) -> OpRule | None:
        """The op rule the node is held to: its kind's, none for a layer kept float or an op
        between such layers (deploy.rules.backend.float_islands, the interpreter prepare() uses)."""
        if self.graph.kept_float(node) or id(node) in self._float_islands:
            return None
        return self.op_rules(node).get(self.graph.kind(node))

    @cached_property
    def _conv_stage(self) -> set[int]:
        if not self.transformer:
            return set()
        graph = self.graph
        by_id = {id(n): n for n in graph.nodes}

        def producers(handle: int) -> list[int | None]:
            found = [
                None if graph.is_constant(name) else graph.producer.get(name)
                for name in graph.data_inputs(by_id[handle])
            ]
            return [None if p is None else id(p) for p in found]

        return conv_stage(
            by_id,
            kind=lambda h: graph.kind(by_id[h]),
            transparent=lambda h: (
                by_id[h].op_type in (QUANTIZE, DEQUANTIZE) or graph.part_of_weighted(by_id[h])
            ),
            producers=producers,
        )

    @cached_property
    def _float_islands(self) -> set[int]:
        graph = self.graph
        if not any(graph.kept_float(n) for n in graph.nodes):
            return set()
        by_id = {id(n): n for n in graph.nodes}
        outputs = {o.name for o in graph.model.graph.output}

        def producers(handle: int) -> list[int | None]:
            node = by_id[handle]
            found = [graph.producer.get(name) for name in self._data_path(node)]
            return [None if p is None else id(p) for p in found]

        def users(handle: int) -> list[int | None]:
            node = by_id[handle]
            found: list[int | None] = [id(r) for o in node.output for r, _ in graph.consumers[o]]
            return found + [None] * sum(o in outputs for o in node.output)

        return float_islands(
            by_id,
            ruled=lambda h: self.op_rules(by_id[h]).get(graph.kind(by_id[h])) is not None,
            kept=lambda h: graph.kept_float(by_id[h]),
            weighted=lambda h: graph.kind(by_id[h]) in WEIGHTED_KINDS,
            transparent=lambda h: (
                by_id[h].op_type in (QUANTIZE, DEQUANTIZE)
                or graph.kind(by_id[h]) in self.rules.int8_carriers
                or graph.part_of_weighted(by_id[h])
            ),
            producers=producers,
            users=users,
        )

    def _data_path(self, node: NodeProto) -> list[str]:
        """The run-time inputs data flows in by: a Q/DQ's first, all of a weighted op's helper
        node (a bias Add), another op's data inputs."""
        if node.op_type in (QUANTIZE, DEQUANTIZE):
            names = node.input[:1]
        elif self.graph.part_of_weighted(node):
            names = node.input
        else:
            return self.graph.runtime_inputs(node)
        return [n for n in names if n and not self.graph.is_constant(n)]

    @property
    def symmetric_only(self) -> bool:
        """A backend with symmetric activations (TensorRT) runs Q/DQ as plain int8 scaling: it
        has no zero points, no int32 or uint8 Q/DQ and no QOperator kernels."""
        return self.rules.activation.symmetric

    def passes_through(self, node: NodeProto) -> bool:
        return self.graph.kind(node) in self.rules.pass_through

    def source(self, name: str) -> NodeProto | None:
        """The op computing `name`, seen through Q/DQ; None for a graph input or constant."""
        node = self.graph.producer.get(name)
        while node is not None and node.op_type in (QUANTIZE, DEQUANTIZE):
            node = self.graph.producer.get(node.input[0])
        return node

    def rectified(
        self,
        name: str,
        carries: Callable[[NodeProto], bool],
        sources: Iterable[str] = FUSED_ACTIVATIONS,
    ) -> bool:
        """deploy.rules.backend.rectified on the ONNX graph, seen through Q/DQ: the walk the
        front end makes on the torch graph."""
        found = self.source(name)
        return found is not None and rectified(
            found, self.graph.kind, self._producers, carries, sources
        )

    def hardly_negative(self, name: str) -> bool:
        """deploy.rules.backend.hardly_negative on the ONNX graph, seen through Q/DQ."""
        found = self.source(name)
        return found is not None and hardly_negative(
            found, self.graph.kind, self._producers, self.passes_through
        )

    def _producers(self, op: NodeProto) -> list[NodeProto | None]:
        return [self.source(value) for value in self.graph.runtime_inputs(op)]

    def _writes_on_grid(self, node: NodeProto) -> bool:
        """BackendRules.shared_scale_outputs_quantized: a shared-scale op (Concat) writes its
        quantized inputs' grid, so its output counts as quantized when all of them are."""
        if not self.rules.shared_scale_outputs_quantized:
            return False
        rule = self.rule(node)
        return rule is not None and rule.shared_scale

    def dequantizers(self, name: str) -> list[NodeProto] | None:
        """The DequantizeLinear nodes that `name` comes from through pass-through ops (and
        _writes_on_grid ops), or None when any data path to it is not quantized."""
        node = self.graph.producer.get(name)
        if node is None:
            return None
        if node.op_type == DEQUANTIZE:
            return [node]
        if not (self.passes_through(node) or self._writes_on_grid(node)):
            return None
        found: list[NodeProto] = []
        for source in self.graph.data_inputs(node):
            upstream = self.dequantizers(source)
            if upstream is None:
                return None
            found += upstream
        return found or None

    def is_quantized(self, name: str) -> bool:
        return self.dequantizers(name) is not None

    def uses(self, name: str, path: tuple[NodeProto, ...] = ()) -> Iterator[Use]:
        """The compute ops reading `name`, seen through DequantizeLinear after a Q and through
        pass-through ops, which carry the quantized value on unchanged: also from one ONNX node
        of such an op to the next (torch's unbind exports as Slice then Squeeze)."""
        producer = self.graph.producer.get(name)
        for node, index in self.graph.consumers.get(name, ()):
            dequantizes = node.op_type == DEQUANTIZE and self._after_quantize(name)
            inside = producer is not None and self.graph.same_op(producer, node)
            carried = inside or name in self.graph.data_inputs(node)
            carries = self.passes_through(node) and carried
            if dequantizes or carries:
                yield from self.uses(node.output[0], (*path, node))
            else:
                yield Use(node, index, path)

    def _after_quantize(self, name: str) -> bool:
        node = self.graph.producer.get(name)
        return node is not None and node.op_type == QUANTIZE
