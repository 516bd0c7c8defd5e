"""prepare(): the one generic pass that turns a float model into a fake-quantized one by a
backend's rules (deploy.rules.backend / backends/<name>/rules.py).

Steps: capture with torch.export (deploy.frontend.capture) -> lower the ATen graph
(deploy.frontend.lowering: weighted ops, BN and dropout as modules, attention written out)
-> fold Conv+BN and give Conv/Linear quantized weights
-> put an activation quantizer on every input edge the rules
select (deploy.rules.backend.selected_inputs, the interpreter lint() uses too) -> record the plan.
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import replace

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata
from torch.nn.utils.fusion import fuse_conv_bn_eval

from qat_deploy.deploy.common.environment import has_int8_dot_product
from qat_deploy.deploy.common.errors import BadInputError, one_line
from qat_deploy.deploy.frontend import arithmetic
from qat_deploy.deploy.frontend.capture import capture, flat_inputs
from qat_deploy.deploy.frontend.lowering import SOURCE_MODULE, VALUE_RANGE, lower, node_kind
from qat_deploy.deploy.frontend.plan import QuantizerSite, QuantPlan
from qat_deploy.deploy.frontend.quant_modules import (
    QuantConv,
    QuantConvBn,
    QuantEmbedding,
    QuantLinear,
)
from qat_deploy.deploy.quant.fake_quant import FakeQuantize
from qat_deploy.deploy.quant.histogram_observers import (
    EntropyObserver,
    MSEObserver,
    PercentileObserver,
)
from qat_deploy.deploy.quant.observers import (
    CurrentMinMaxObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    fixed_range,
)
from qat_deploy.deploy.quant.spec import QuantSpec
from qat_deploy.deploy.rules.backend import (
    FUSED_ACTIVATIONS,
    BackendRules,
    InputFacts,
    Inputs,
    OpRule,
    activation_spec,
    branch_sum_root,
    conv_stage,
    float_islands,
    fused_output,
    get_rules,
    hardly_negative,
    reader_kinds,
    rectified,
    selected_inputs,
    shared_scale_members,
)
from qat_deploy.deploy.rules.ops import WEIGHTED_KINDS, conv_groups, is_transformer

OBSERVERS = {
    "minmax": MinMaxObserver,
    "ema": MovingAverageMinMaxObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
    "entropy": EntropyObserver,
}


def _float64(value):
    return torch.float64 if value is torch.float32 else value


def _makes_default_float32(node: fx.Node) -> bool:
    """An op that takes a dtype and made float32 without being given one: a tensor factory
    (torch.zeros(shape), EdgeNeXt's position encoding) makes torch's default dtype, not the
    model's. For any other such op (sum, mean) float64 is what its float64 input gives."""
    schema = getattr(node.target, "_schema", None)
    val = node.meta.get("val")
    return (
        schema is not None
        and "dtype" not in node.kwargs
        and any(a.name == "dtype" and a.kwarg_only for a in schema.arguments)
        and isinstance(val, torch.Tensor)
        and val.dtype == torch.float32
    )


class PreparedModel(nn.Module):
    """A fake-quantized model plus the plan that says what was quantized and why."""

    def __init__(self, model: nn.Module, plan: QuantPlan, rules: BackendRules) -> None:
        super().__init__()
        self.model = model
        self.plan = plan
        self.rules = rules

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def quantizers(self) -> list[FakeQuantize]:
        return [m for m in self.modules() if isinstance(m, FakeQuantize)]

    def activation_quantizers(self) -> list[FakeQuantize]:
        """The quantizers of activations (the ones the `observer` of prepare() calibrates)."""
        modules = dict(self.named_modules())
        return [modules[s.module] for s in self.plan.sites if s.role == "activation"]

    def summary(self):
        return self.plan.table(self)

    def in_float64(self) -> PreparedModel:
        """A float64 copy (the accuracy check's noise floor). torch.export records the dtype
        a model casts to (GPT-2's `.to(dtype)` becomes to(float32) plus a float32 metadata
        assert), which a plain .double() would leave in the graph: those become float64 too."""
        twin = copy.deepcopy(self).double()
        if isinstance(twin.model, fx.GraphModule):
            for node in twin.model.graph.nodes:
                node.args = fx.node.map_aggregate(node.args, _float64)
                node.kwargs = fx.node.map_aggregate(node.kwargs, _float64)
                if _makes_default_float32(node):
                    node.kwargs = {**node.kwargs, "dtype": torch.float64}
            twin.model.recompile()
        return twin


def prepare(
    model: nn.Module,
    target: str,
    example_inputs: ExampleInputs,
    *,
    mode: str = "auto",
    bits: int = 8,
    observer: str = "minmax",
    learnable: bool = False,
    reduce_range: bool | None = None,
    keep_float: Sequence[str] = (),
) -> PreparedModel:
    """Return a fake-quantized copy of `model` laid out by `target`'s rules.

    example_inputs: a tensor, a tuple of positional tensors, or a dict of keyword tensors
    (e.g. {"input_ids": ..., "attention_mask": ...}). mode: "auto" (transformer rules when the
    graph has attention, deploy.rules.ops.is_transformer), "cnn" or "transformer".
    bits: 2..8 for both weights and activations (export needs 8). observer: activation
    observer, one of OBSERVERS. learnable: LSQ scales (QAT). reduce_range: 7-bit weights
    for engines that saturate int16 pair sums (BackendRules.int16_pair_sums_without_vnni);
    None decides from this machine's CPU, where the engine is built and checked.
    keep_float: module-path globs ("classifier", "*.attention.*") of Conv/Linear layers that
    stay float (mixed precision): no quantizer of their own, for every backend; the export tags
    them so lint and the kernel reports count them as float on purpose. Ops whose every data
    neighbour is then float stay float with them (deploy.rules.backend.float_islands).
    """
    rules = get_rules(target)
    if mode not in ("auto", "cnn", "transformer"):
        raise BadInputError(f"unknown mode '{mode}'; use auto, cnn or transformer")
    if observer not in OBSERVERS:
        raise BadInputError(f"unknown observer '{observer}'; known: {', '.join(OBSERVERS)}")
    args, kwargs = split_inputs(example_inputs)
    model = copy.deepcopy(model).eval()
    if reduce_range is None:
        reduce_range = not has_int8_dot_product()
    weight_bits = min(bits, 7) if reduce_range and rules.int16_pair_sums_without_vnni else bits
    factory = _QuantizerFactory(rules, bits, OBSERVERS[observer], learnable, weight_bits)
    traced = capture(model, args, kwargs)
    lower(traced, rules.decompose)
    flat = flat_inputs(traced, args, kwargs)
    _propagate_shapes(traced, flat)
    kinds = _kinds(traced)
    kept = _kept_float(traced, kinds, keep_float, (*WEIGHTED_KINDS, *rules.weight_only))
    transformer = mode == "transformer" or (mode == "auto" and is_transformer(kinds.values()))
    stage = _conv_stage(traced, kinds) if transformer else set()
    by_rule = _slow_int8_convs(traced, kinds, _RulesOf(rules, transformer, stage, set())) - kept
    plan = QuantPlan(
        target=rules.name,
        mode="transformer" if transformer else "cnn",
        input_shapes=[tuple(x.shape) for x in flat],
        input_names=[n.name for n in traced.graph.nodes if n.op == "placeholder"],
    )
    plan.kept_float = sorted(str(node.target) for node in kept)
    plan.float_by_rule = sorted(str(node.target) for node in by_rule)
    kept |= by_rule
    op_rules = _RulesOf(rules, transformer, stage, kept)
    _fold_kept_bn(traced, kinds, kept)
    folded_bn = _quantize_weights(traced, kinds, op_rules, factory, plan)
    _quantize_tables(traced, kinds, kept, factory, plan)
    kinds = _kinds(traced)
    floats = kept | _float_islands(traced, kinds, rules, op_rules, kept)
    op_rules = _RulesOf(rules, transformer, stage, floats)
    _place_activation_quantizers(traced, kinds, op_rules, factory, plan)
    arithmetic.link(traced, kinds, rules)
    plan.fused = _find_fusions(traced, kinds, folded_bn, rules.fusions)
    plan.float_ops = _float_ops(traced, kinds, rules, op_rules, plan)
    traced.graph.lint()
    traced.recompile()
    if not plan.weight_layers and not plan.activation_edges and plan.kept_float:
        raise BadInputError(
            f"keep_float keeps every layer of {type(model).__name__} float "
            f"({', '.join(plan.kept_float)}): nothing is left to run in int8"
        )
    if not plan.weight_layers and not plan.activation_edges:
        raise BadInputError(
            f"{type(model).__name__} has no op that {rules.name} runs in int8 (no Conv, "
            "Linear or MatMul with a weight tensor was found in its torch.export graph)"
        )
    return PreparedModel(traced, _prefixed(plan), rules)


ExampleInputs = torch.Tensor | Sequence[torch.Tensor] | Mapping[str, torch.Tensor]


def split_inputs(example_inputs: ExampleInputs) -> tuple[tuple, dict]:
    """(positional, keyword) model inputs from any of the three accepted forms."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    return tuple(example_inputs), {}


class _RulesOf:
    """The op rule of a node: its kind's in the model's mode (CNN rules in a transformer's
    conv stages, deploy.rules.backend.conv_stage), none for the layers kept float."""

    def __init__(
        self, rules: BackendRules, transformer: bool, stage: set[fx.Node], kept: set[fx.Node]
    ) -> None:
        self.rules, self.transformer, self.stage, self.kept = rules, transformer, stage, kept

    def of_kind(self, node: fx.Node, kind: str | None) -> OpRule | None:
        """The rule the node's kind has where the node is, kept float or not."""
        return self.rules.op_rules(self.transformer and node not in self.stage).get(kind)

    def __call__(self, node: fx.Node, kind: str | None) -> OpRule | None:
        return None if node in self.kept else self.of_kind(node, kind)


def _conv_stage(gm: fx.GraphModule, kinds) -> set[fx.Node]:
    """deploy.rules.backend.conv_stage on the torch graph."""

    def producers(node: fx.Node) -> list[fx.Node | None]:
        data = [a for a in node.all_input_nodes if a.op == "get_attr" or _is_data(a)]
        return [None if a.op in ("get_attr", "placeholder") else a for a in data]

    return conv_stage(
        gm.graph.nodes, kind=kinds.get, transparent=lambda node: False, producers=producers
    )


def _is_data(node: fx.Node) -> bool:
    """A tensor (or a multi-output op's tensors), not a size computed from one."""
    return isinstance(node.meta.get("val"), (torch.Tensor, list, tuple))


def _kept_float(
    gm: fx.GraphModule, kinds, patterns: Sequence[str], weighted: Sequence[str]
) -> set[fx.Node]:
    """The layers with int8 weights (`weighted` kinds: Conv/Linear, and the tables of
    BackendRules.weight_only) whose module path matches a keep_float glob; a glob matching
    none is the user's typo, not a no-op."""
    layers = {
        n: (str(n.target), n.meta.get(SOURCE_MODULE))
        for n in gm.graph.nodes
        if n.op == "call_module" and kinds.get(n) in weighted
    }
    kept = set()
    for pattern in patterns:
        matched = {
            n
            for n, paths in layers.items()
            if any(p is not None and fnmatch.fnmatchcase(p, pattern) for p in paths)
        }
        if not matched:
            paths = [path for path, _ in layers.values()]
            shown = ", ".join(paths[:8]) + (", ..." if len(paths) > 8 else "")
            raise BadInputError(
                f"--keep-float {pattern!r} matches no Conv/Linear layer; layers: {shown}"
            )
        kept |= matched
    return kept


def _slow_int8_convs(gm: fx.GraphModule, kinds, op_rules: _RulesOf) -> set[fx.Node]:
    """The Convs the rules keep float: group shapes without a fast int8 kernel
    (BackendRules.float_conv_groups) or with a wrong one (BackendRules.wrong_int8_conv), and
    thin dense ones whose output is read float anyway or that write few channels not read by
    a pooling op (BackendRules.float_thin_convs, float_thin_conv_outputs)."""
    rules = op_rules.rules
    found = set()
    for node in gm.graph.nodes:
        if node.op != "call_module" or kinds.get(node) != "conv":
            continue
        conv = gm.get_submodule(node.target)
        shape = conv_groups(conv.in_channels, conv.out_channels, conv.groups)
        thin = shape == "dense" and conv.in_channels <= rules.float_thin_convs
        narrow = (
            thin
            and conv.out_channels <= rules.float_thin_conv_outputs
            and not _read_by(node, kinds, POOLING_KINDS)
        )
        if (
            shape in rules.float_conv_groups
            or rules.wrong_int8_conv(conv.in_channels, conv.groups, shape)
            or narrow
            or (thin and _read_float(node, kinds, op_rules))
        ):
            found.add(node)
    return found


#: Op kinds whose 8-bit kernels are fast only inside the runtime's int8 layout chain.
POOLING_KINDS = frozenset({"maxpool", "avgpool"})


def _read_by(conv: fx.Node, kinds, wanted: frozenset[str]) -> bool:
    """Whether an op of a `wanted` kind reads the Conv's output (after its BN and fused
    activations)."""
    return any(kinds.get(user) in wanted for user in _conv_output(conv, kinds).users)


def _read_float(conv: fx.Node, kinds, op_rules: _RulesOf) -> bool:
    """Whether every reader of a Conv's output, after the BatchNorm and activations fused into
    it, takes that output float: the model's output, or ops without an int8 rule."""
    return all(
        user.op == "output"
        or (
            kinds.get(user) not in op_rules.rules.int8_carriers
            and op_rules.of_kind(user, kinds.get(user)) is None
        )
        for user in _conv_output(conv, kinds).users
    )


def _conv_output(conv: fx.Node, kinds) -> fx.Node:
    """The node whose output is the Conv's, once its BatchNorm and activations are fused in."""
    end = conv
    if len(end.users) == 1 and kinds.get(only := next(iter(end.users))) == "bn":
        end = only  # folded into the Conv
    return fused_output(end, lambda n: list(n.users), kinds.get)


def _fold_kept_bn(gm: fx.GraphModule, kinds, kept: set[fx.Node]) -> None:
    """Fold the BN after a kept-float Conv into it, as for quantized ones: the engine runs one
    Conv either way, and the exporter's own fold would name that Conv after the BN, hiding
    which layer it is from the export's keep-float tags."""
    modules = dict(gm.named_modules())
    for node in kept:
        users = list(node.users)
        if kinds.get(node) == "linear" or len(users) != 1 or kinds.get(users[0]) != "bn":
            continue
        (bn_node,) = users
        conv, bn = modules[node.target], modules[bn_node.target]
        fused = fuse_conv_bn_eval(conv, bn, transpose=kinds.get(node) == "conv_transpose")
        _set_module(gm, node.target, fused)
        bn_node.replace_all_uses_with(node)
        gm.graph.erase_node(bn_node)
        _set_module(gm, bn_node.target, None)


def _float_islands(
    gm: fx.GraphModule, kinds, rules: BackendRules, op_rules: _RulesOf, kept: set[fx.Node]
) -> set[fx.Node]:
    """The ops between kept-float layers that stay float with them (rules.float_islands)."""
    if not kept:
        return set()
    return float_islands(
        gm.graph.nodes,
        ruled=lambda n: op_rules.of_kind(n, kinds.get(n)) is not None,
        kept=lambda n: n in kept,
        weighted=lambda n: kinds.get(n) in WEIGHTED_KINDS,
        transparent=lambda n: kinds.get(n) in rules.int8_carriers,
        producers=lambda n: [
            None if a.op == "placeholder" else a for a in n.all_input_nodes if a.op != "get_attr"
        ],
        users=lambda n: [None if u.op == "output" else u for u in n.users],
    )


def _kinds(gm: fx.GraphModule) -> dict[fx.Node, str | None]:
    modules = dict(gm.named_modules())
    return {n: node_kind(n, modules) for n in gm.graph.nodes}


class _QuantizerFactory:
    """Builds FakeQuantize modules with the backend's specs and the user's choices."""

    def __init__(
        self, rules: BackendRules, bits: int, observer, learnable: bool, weight_bits: int
    ) -> None:
        self.rules, self.bits, self.observer, self.learnable = rules, bits, observer, learnable
        self.weight_bits = weight_bits

    def activation(
        self, spec: QuantSpec | None, location: str, bounds: tuple[float, float] | None = None
    ) -> FakeQuantize:
        """`bounds`: the value's range is known (lowering.VALUE_RANGE): a fixed grid that
        neither calibration nor LSQ training moves."""
        spec = (spec or self.rules.activation).with_bits(self.bits)
        if bounds is None:
            fq = FakeQuantize(spec, self.observer, learnable=self.learnable)
        else:
            fq = FakeQuantize(spec, fixed_range(*bounds))
            fq.update_qparams()
        fq.location = location
        return fq

    def table(self, module: nn.Module, location: str) -> FakeQuantize:
        """Per-row 8-bit codes: no int8 dot product reads a table, so the 7-bit weights of
        BackendRules.int16_pair_sums_without_vnni do not apply."""
        return self._per_channel(module, 0, self.bits, location)

    def weight(self, module: nn.Module, kind: str, location: str) -> FakeQuantize:
        axis = self.rules.weight_axis.get(kind, self.rules.weight.axis)
        return self._per_channel(module, axis, self.weight_bits, location)

    def _per_channel(self, module: nn.Module, axis: int, bits: int, location: str) -> FakeQuantize:
        spec = replace(self.rules.weight, axis=axis).with_bits(bits)
        fq = FakeQuantize(
            spec,
            CurrentMinMaxObserver,
            channels=module.weight.shape[axis],
            learnable=self.learnable,
        )
        fq.location = location
        return fq


def _propagate_shapes(gm: fx.GraphModule, inputs: list[torch.Tensor]) -> None:
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*inputs)
    except Exception as exc:
        shapes = ", ".join(str(tuple(x.shape)) for x in inputs)
        raise BadInputError(
            f"example input of shape {shapes} does not fit the model: {one_line(exc)}"
        ) from exc


def _is_tensor(node: fx.Node) -> bool:
    """A node whose value is one tensor (ShapeProp records a list of metadata for a chunk)."""
    return isinstance(node, fx.Node) and isinstance(node.meta.get("tensor_meta"), TensorMetadata)


def _set_module(gm: fx.GraphModule, path: str, module: nn.Module | None) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = gm.get_submodule(parent_path) if parent_path else gm
    if module is None:
        delattr(parent, name)
    else:
        setattr(parent, name, module)


def _quantize_weights(
    gm: fx.GraphModule, kinds, op_rules, factory: _QuantizerFactory, plan: QuantPlan
) -> dict[str, str]:
    """Swap Conv(+BN) and Linear for modules with fake-quantized (BN-folded) weights, where
    the rules run that kind in int8; returns conv node name -> name of the BN node folded
    into it."""
    modules = dict(gm.named_modules())
    folded_bn = {}
    for node in list(gm.graph.nodes):
        kind = kinds.get(node)
        if node.op != "call_module" or kind not in WEIGHTED_KINDS or op_rules(node, kind) is None:
            continue
        layer = modules[node.target]
        fq = factory.weight(layer, kind, f"{node.target}.weight")
        users = list(node.users)
        bn_node = users[0] if len(users) == 1 and kinds.get(users[0]) == "bn" else None
        if bn_node is not None and kind != "linear":
            axis = factory.rules.weight_axis.get(kind, factory.rules.weight.axis)
            new = QuantConvBn(layer, modules[bn_node.target], fq, kind, axis)
            bn_node.replace_all_uses_with(node)
            gm.graph.erase_node(bn_node)
            _set_module(gm, bn_node.target, None)
            folded_bn[node.name] = bn_node.name
        elif kind == "linear":
            new = QuantLinear(layer, fq)
        else:
            new = QuantConv(layer, fq, kind)
        _set_module(gm, node.target, new)
        plan.sites.append(
            QuantizerSite(f"{node.target}.weight_quant", "weight", fq.spec, node.name)
        )
    return folded_bn


def _quantize_tables(
    gm: fx.GraphModule, kinds, kept: set[fx.Node], factory: _QuantizerFactory, plan: QuantPlan
) -> None:
    """Swap the tables of BackendRules.weight_only kinds (Embedding) for per-row int8 ones."""
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        if node.op != "call_module" or node in kept:
            continue
        if kinds.get(node) not in factory.rules.weight_only:
            continue
        layer = modules[node.target]
        fq = factory.table(layer, f"{node.target}.weight")
        _set_module(gm, node.target, QuantEmbedding(layer, fq))
        plan.sites.append(
            QuantizerSite(f"{node.target}.weight_quant", "weight", fq.spec, node.name)
        )


def _find_fusions(gm, kinds, folded_bn: dict[str, str], patterns) -> list[tuple[str, ...]]:
    """Chains the backend will fuse, matched after placement: a chain stops at any inserted
    quantizer, since a Q/DQ pair is exactly what blocks a backend fusion. The longest pattern
    wins; a folded Conv+BN counts as the two tokens "conv", "bn"."""
    chains = []
    for node in gm.graph.nodes:
        if kinds.get(node) not in WEIGHTED_KINDS:
            continue
        tokens = [(kinds[node], node.name)]
        if node.name in folded_bn:
            tokens.append(("bn", folded_bn[node.name]))
        current = node
        while len(current.users) == 1:
            (current,) = current.users
            tokens.append((kinds.get(current), current.name))
        best: tuple[str, ...] = ()
        for pattern in patterns:
            if len(pattern) > len(best) and tuple(k for k, _ in tokens[: len(pattern)]) == pattern:
                best = tuple(name for _, name in tokens[: len(pattern)])
        if len(best) > 1:
            chains.append(best)
    return chains


def _float_ops(gm, kinds, rules: BackendRules, op_rules: _RulesOf, plan: QuantPlan) -> list[str]:
    """Compute ops left in float: no int8 rule, not quantization-agnostic, not fused into
    a quantized chain, or kept float by the user. Unrecognised ops land here too."""
    fused = {name for chain in plan.fused for name in chain}
    return [
        n.name
        for n in gm.graph.nodes
        if n.op in ("call_module", "call_function", "call_method")
        and n in kinds
        and op_rules(n, kinds[n]) is None
        and kinds[n] not in rules.pass_through
        and n.name not in fused
    ]


def _selected_inputs(node: fx.Node, rule: OpRule, kinds, rules: BackendRules) -> list[fx.Node]:
    """The input edges of `node` that its rule says to quantize (interpreted by
    deploy.rules.backend)."""
    tensors = [a for a in node.all_input_nodes if _is_tensor(a)]
    if rule.inputs is Inputs.ACTIVATION:  # the data input is the first argument
        first = node.args[0] if node.args else None
        tensors = [first, *(a for a in tensors if a is not first)] if _is_tensor(first) else []
    branch_sum = kinds.get(node) == "add" and _branch_sum_root(node, kinds) is not None
    facts = [
        InputFacts(
            constant=a.op == "get_attr",
            fusible_conv=kinds.get(a) in ("conv", "conv_transpose") and len(a.users) == 1,
            branch_sum=branch_sum,
        )
        for a in tensors
    ]
    chosen = selected_inputs(kinds.get(node), rule, facts, rules.float_branch_sums)
    return [tensors[i] for i in chosen]


def _branch_sum_root(add: fx.Node, kinds) -> fx.Node | None:
    """deploy.rules.backend.branch_sum_root on the torch graph."""

    def terms(node: fx.Node) -> list[fx.Node | None]:
        return [a if isinstance(a, fx.Node) and len(a.users) == 1 else None for a in node.args]

    def source(node: fx.Node) -> fx.Node | None:
        return node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None

    return branch_sum_root(add, terms, kinds.get, source)


Key = tuple[fx.Node, QuantSpec]  # a value, quantized with a spec


def _place_activation_quantizers(
    gm, kinds, op_rules, factory: _QuantizerFactory, plan: QuantPlan
) -> None:
    """Quantize every input edge the rules select, each value once per spec: one call of a
    FakeQuantize read by all its consumers (a runtime fuses a producer with the one Q that
    follows it; two Qs of one value leave the producer in float). Values that must share a
    scale form a group with one FakeQuantize module: a shared-scale op's (Concat) inputs, and
    with BackendRules.quantize_pass_through_inputs a pass-through op's input and output."""
    groups = _Groups()
    readers: dict[Key, list[fx.Node]] = {}
    on_grid: dict[fx.Node, Key] = {}  # shared-scale op -> a key of its group
    for node in list(gm.graph.nodes):
        rule = op_rules(node, kinds.get(node))
        selected = _selected_inputs(node, rule, kinds, factory.rules) if rule is not None else []
        if not selected:
            continue
        spec = (rule.activation or factory.rules.activation).with_bits(factory.bits)
        keys = [(value, spec) for value in dict.fromkeys(selected)]
        for key in keys:
            readers.setdefault(key, []).append(node)
            groups.add(key)
        if rule.shared_scale:
            members = _shared_scale_members(keys, kinds, op_rules, factory.rules)
            groups.union(*members)
            if set(selected) == {a for a in node.all_input_nodes if _is_tensor(a)}:
                on_grid[node] = members[0]
    if factory.rules.shared_scale_outputs_quantized:
        _read_on_grid(on_grid, kinds, factory.rules, readers, groups)
    for node in list(gm.graph.nodes):
        rule = op_rules(node, kinds.get(node))
        if rule is not None and rule.output:
            _quantize_output(node, rule, kinds, factory, readers, groups, on_grid.get(node))
    if factory.rules.quantize_pass_through_inputs:
        _quantize_pass_through_inputs(kinds, op_rules, factory.rules, readers, groups)
    group_specs = _group_specs(readers, groups, kinds, factory.rules)
    modules: dict[Key, str] = {}
    sites: dict[str, tuple[QuantSpec, list[tuple[str, str]]]] = {}
    for key, consumers in readers.items():
        value, _ = key
        root = groups.find(key)
        spec = group_specs[root]
        if root not in modules:
            modules[root] = name = f"act_quant_{len(modules)}"
            location = f"{value.name} -> {consumers[0].name}"
            bounds = value.meta.get(VALUE_RANGE)
            gm.add_submodule(name, factory.activation(spec, location, bounds))
            sites[name] = (spec, [])
        with gm.graph.inserting_after(value):
            q_node = gm.graph.call_module(modules[root], (value,))
        q_node.meta = dict(value.meta)
        for consumer in consumers:
            consumer.replace_input_with(value, q_node)
            sites[modules[root]][1].append((value.name, consumer.name))
    for name, (spec, site_edges) in sites.items():
        plan.sites.append(
            QuantizerSite(name, "activation", spec, site_edges[0][0], tuple(site_edges))
        )


def _group_specs(readers: dict[Key, list[fx.Node]], groups, kinds, rules: BackendRules):
    """Each group's spec: its keys' (the readers' rules), or deploy.rules.backend.activation_spec
    from the kinds of the ops that read the group's values (pass-through ops carrying one
    member to another are not readers)."""
    members: dict[Key, list[Key]] = {}
    for key in readers:
        members.setdefault(groups.find(key), []).append(key)
    specs: dict[Key, QuantSpec] = {}
    for root, keys in members.items():
        values = {value for value, _ in keys}
        direct = [r for key in keys for r in readers[key] if r not in values]
        read_as = reader_kinds(direct, kinds.get, lambda node: list(node.users))
        hardly_negative = all(  # one signed member puts the whole group on a signed grid
            value.meta.get(VALUE_RANGE) is not None or _hardly_negative(value, kinds, rules)
            for value in values
        )
        specs[root] = activation_spec(rules, root[1], read_as, hardly_negative)
    return specs


def _hardly_negative(value: fx.Node, kinds, rules: BackendRules) -> bool:
    """The value's uint8 grid keeps (nearly) full resolution: a signed one would not."""

    def passes_through(node: fx.Node) -> bool:
        return kinds.get(node) in rules.pass_through

    return hardly_negative(value, kinds.get, _tensor_producers, passes_through)


def _tensor_producers(node: fx.Node) -> list[fx.Node]:
    """The nodes computing a node's tensor inputs (and a chunk's list of them), for
    deploy.rules.backend.rectified."""
    return [a for a in node.all_input_nodes if a.meta.get("tensor_meta") is not None]


def _shared_scale_members(keys: list[Key], kinds, op_rules, rules: BackendRules) -> list[Key]:
    """deploy.rules.backend.shared_scale_members on the torch graph."""

    def carries(node: fx.Node) -> bool:
        rule = op_rules(node, kinds.get(node))
        return kinds.get(node) in rules.pass_through or (rule is not None and rule.shared_scale)

    return shared_scale_members(
        keys, lambda key: rectified(key[0], kinds.get, _tensor_producers, carries), rules
    )


def _read_on_grid(on_grid: dict[fx.Node, Key], kinds, rules: BackendRules, readers, groups) -> None:
    """BackendRules.shared_scale_outputs_quantized: a value that a shared-scale op with every
    input quantized (`on_grid`) reaches through pass-through ops only is already on that op's
    grid. Its quantizer would be the identity if it shared the op's scale, so it has none, and
    its group (a Concat reading it, with that Concat's other inputs) takes the op's scale.
    Exact in the fake-quant model: the op's output is made of quantized values."""
    for key in list(readers):
        value, spec = key
        source = value
        while kinds.get(source) in rules.pass_through and isinstance(source.args[0], fx.Node):
            source = source.args[0]
        grid = on_grid.get(source)
        if grid is None or grid[1] != spec:
            continue
        groups.union(key, grid)
        del readers[key]


def _quantize_output(node, rule: OpRule, kinds, factory, readers, groups, grid: Key | None) -> None:
    """OpRule.output: every reader of the op's (fused) output reads it quantized, unless the
    graph returns it, where a quantized output would change what the model returns. A
    shared-scale op's output joins its inputs' group (`grid`): it is made of values already on
    that grid, so its quantizer is exact."""
    value = fused_output(node, lambda n: list(n.users), kinds.get)
    if not _is_tensor(value) or any(user.op == "output" for user in value.users):
        return
    spec = (rule.activation or factory.rules.activation).with_bits(factory.bits)
    key = (value, spec)
    groups.add(key)
    quantized = readers.setdefault(key, [])
    quantized += [user for user in value.users if user not in quantized]
    if grid is not None and value is node and grid[1] == spec:
        groups.union(grid, key)


class _Groups:
    """Union-find over quantized values: members of one group share one quantizer."""

    def __init__(self) -> None:
        self.parent: dict[Key, Key] = {}

    def add(self, key: Key) -> None:
        self.parent.setdefault(key, key)

    def find(self, key: Key) -> Key:
        while self.parent[key] != key:
            self.parent[key] = self.parent[self.parent[key]]
            key = self.parent[key]
        return key

    def union(self, first: Key, *others: Key) -> None:
        for other in others:
            self.parent[self.find(other)] = self.find(first)


def _quantize_pass_through_inputs(kinds, op_rules, rules: BackendRules, readers, groups) -> None:
    """Where a quantized op's output (or a ReLU after it) reaches its readers only through
    pass-through ops of the kinds BackendRules.quantize_pass_through_inputs lists (MaxPool,
    reshapes, splits) that end in quantizers of one spec, quantize it right at the producer,
    and every pass-through output on the way, all in the readers' group: the producer then
    writes int8 and the pass-through ops run on int8. Exact: those ops commute with per-tensor
    quantization."""
    specs = list(dict.fromkeys(key[1] for key in readers))
    for value, kind in list(kinds.items()):  # graph order: deterministic quantizer names
        ruled = op_rules.of_kind(value, kind) is not None or kind in FUSED_ACTIVATIONS
        if not (ruled or _post_op(value, kind, kinds, rules)) or not _is_tensor(value):
            continue
        for spec in specs:
            tree = _pass_through_tree(value, spec, kinds, rules, readers)
            if tree is None or not any(through for _, through in tree):
                continue
            for node, through in tree:
                groups.add((node, spec))
                quantized = readers.setdefault((node, spec), [])
                quantized += [user for user in through if user not in quantized]
            groups.union(*((node, spec) for node, _ in tree))


def _post_op(value: fx.Node, kind: str | None, kinds, rules: BackendRules) -> bool:
    """BackendRules.post_op_activations: an activation that alone reads a weighted op's
    output (a Conv's after the BatchNorm folded into it, _conv_output), which the engine runs
    as that op's post-op."""
    source = value.args[0] if value.args else None
    if kind not in rules.post_op_activations or not isinstance(source, fx.Node):
        return False
    if len(source.users) != 1:
        return False
    if kinds.get(source) == "bn":  # only a Conv folds the BatchNorm after it
        conv = source.args[0]
        return kinds.get(conv) == "conv" and _conv_output(conv, kinds) is source
    return kinds.get(source) in WEIGHTED_KINDS


def _pass_through_tree(value, spec, kinds, rules: BackendRules, readers):
    """[(value or a pass-through output below it, its pass-through readers)] when every use
    of `value` ends, through pass-through ops only, in quantizers of `spec`; None when any use
    needs a float value (a float op, a graph output, a quantizer of another spec)."""
    quantized = readers.get((value, spec), ())
    through = [
        u
        for u in value.users
        if kinds.get(u) in rules.quantize_pass_through_inputs and u.args[:1] == (value,)
    ]
    if not value.users or any(u not in quantized for u in value.users if u not in through):
        return None
    tree = [(value, through)] if _is_tensor(value) else []
    for user in through:
        below = _pass_through_tree(user, spec, kinds, rules, readers)
        if below is None:
            return None
        tree += below
    return tree


def _prefixed(plan: QuantPlan) -> QuantPlan:
    """Module paths as seen from the PreparedModel (its graph module lives under `model`)."""
    plan.sites = [replace(s, module=f"model.{s.module}") for s in plan.sites]
    return plan
