"""The schema of a backend's quantization rules, and how a target name finds its rules.

Rules are data (backends/<name>/rules.py defines RULES); deploy.frontend.prepare is the one
generic pass that applies them. Adding a backend means adding a folder with a rules.py, nothing
here.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import TypeVar

from qat_deploy import backends
from qat_deploy.deploy.common.errors import BadInputError
from qat_deploy.deploy.quant.spec import QuantSpec

T = TypeVar("T")


class Inputs(str, Enum):
    """Which tensor inputs of an op get a quantizer."""

    ACTIVATION = "activation"  # the data input of a weighted op (its weight is handled apart)
    ALL = "all"  # every tensor input (MatMul, Add in CNNs, pooling, ...)
    SKIP_BRANCH = "skip_branch"  # residual Add: only inputs NOT produced by a fusible Conv(+BN)


@dataclass(frozen=True)
class OpRule:
    inputs: Inputs = Inputs.ALL
    #: One quantizer shared by all inputs (Concat), so the op needs no requantization.
    shared_scale: bool = False
    #: Activation spec for this op's inputs when it differs from the backend default.
    activation: QuantSpec | None = None
    #: Quantize the op's output too (after the ReLU/ReLU6 fused into it), unless it is a graph
    #: output: for runtimes that run the op in int8 only between a DQ and a Q (onnxruntime's
    #: QLinearConv), even where its readers stay float.
    output: bool = False


@dataclass(frozen=True)
class BackendRules:
    """Everything the front end needs to know about a backend's int8 support."""

    name: str
    activation: QuantSpec
    weight: QuantSpec
    #: op kind (see deploy.rules.ops) -> how its inputs are quantized, CNN mode.
    ops: Mapping[str, OpRule]
    #: op kinds whose input and output share quantization (no quantizer of their own).
    pass_through: frozenset[str]
    #: producer chains the backend fuses into one kernel; no quantizer goes inside them.
    fusions: tuple[tuple[str, ...], ...]
    #: transformer mode: op rules replacing `ops` (kinds absent here stay float).
    transformer_ops: Mapping[str, OpRule] = field(default_factory=dict)
    #: weight quantization axis per op kind (default: weight spec's axis).
    weight_axis: Mapping[str, int] = field(default_factory=dict)
    #: Where the engine's int8 arithmetic departs from plain Q/DQ semantics. prepare() makes
    #: the fake-quant model compute the same (deploy/frontend/arithmetic.py), so what QAT trains and
    #: what the accuracy check compares against is what the engine runs.
    #: Weighted op kinds whose float bias the engine rounds to int32 at input scale x weight
    #: scale; export writes those biases as int32 DequantizeLinear (some fusions require it).
    int32_bias: frozenset[str] = frozenset()
    #: The engine fuses a residual Add into the Conv producing its first Conv operand and
    #: applies that operand's quantizer as a clamp, without rounding.
    unrounded_fused_add: bool = False
    #: The engine quantizes activations as round(clamp(x) * k + b) (k = levels / range, float32
    #: steps), not round(x / scale) + zero point: prepare() makes the activation quantizers
    #: round the same way (deploy.quant.functional.scale_shift_fake_quantize).
    scale_shift_quantize: bool = False
    #: The engine's u8 x s8 kernels add product pairs in saturating int16 on x86 CPUs without
    #: VNNI (255 * 127 * 2 > 32767): prepare() then quantizes weights to 7 bits, which keeps
    #: every pair sum exact (onnxruntime's reduce_range, NNCF's overflow_fix).
    int16_pair_sums_without_vnni: bool = False
    #: Quantize a quantized op's output before the pass-through ops of these kinds (MaxPool,
    #: reshapes, splits) that carry it to its quantized readers, in their group
    #: (deploy.frontend.prepare): a runtime that fuses an op with the Q right after it, and does
    #: not move a Q up across such ops itself, then writes that output in int8 instead of
    #: leaving the op in float.
    quantize_pass_through_inputs: frozenset[str] = frozenset()
    #: Activations the engine runs as a post-op of the weighted op (Conv, Linear) that alone
    #: feeds them, a quantizer after them included: with quantize_pass_through_inputs, a
    #: quantizer below pass-through ops moves up to such an activation too, and the weighted
    #: op writes int8 (timm's ECA gate: Conv1d -> sigmoid -> view -> Mul).
    post_op_activations: frozenset[str] = frozenset()
    #: A shared-scale op (Concat) whose every input is quantized writes int8 on their one
    #: grid: a reader that reaches its output through pass-through ops only (ShuffleNet's
    #: shuffle and split) reads it as it is, with no quantizer of its own, and a shared-scale
    #: reader joins its scale, so a chain of Concats shares one scale (NNCF's unified scales).
    #: Without it the CPU plugin requantizes each split half u8 -> u8 (16 extra kernels in
    #: ShuffleNetV2 x0.5).
    shared_scale_outputs_quantized: bool = False
    #: Composite ops written out as their parts before placement, where the parts have int8
    #: kernels and the whole has none: kinds of deploy.frontend.lowering.DECOMPOSITIONS, and
    #: "fused_projection" (a Linear whose output is only used split into equal parts).
    decompose: frozenset[str] = frozenset()
    #: Leave an Add float when it only sums parallel linear branches of one value
    #: (InputFacts.branch_sum: RepVGG / ACNet / DBB blocks in training form): the sum is
    #: quantized once, by its reader. Quantizing each branch puts one per-tensor scale on an
    #: identity BatchNorm whose per-channel gains spread its output over thousands of steps.
    float_branch_sums: bool = False
    #: Conv group shapes (deploy.rules.ops.conv_groups) the runtime has no fast int8 kernel
    #: for: such Convs stay float, weights included, as if the user kept them float (the
    #: export tags them, lint and the kernel reports count them float on purpose).
    float_conv_groups: frozenset[str] = frozenset()
    #: Dense Convs reading at most this many channels (an RGB stem: 3) stay float where every
    #: reader of their output (after a fused BatchNorm/ReLU) takes it float anyway: the int8
    #: kernel gains little over so few input channels and pays a Q before and a DQ after it.
    #: 0: never. Tagged like float_conv_groups.
    float_thin_convs: int = 0
    #: Such thin Convs also stay float, whatever reads them, when they write at most this
    #: many channels and no pooling op reads them: the int8 GEMM (K = 27 for a 3x3 RGB stem)
    #: gains nothing, and quantizing the narrow float output costs about what quantizing the
    #: input did. 0: never.
    float_thin_conv_outputs: int = 0
    #: A grouped Conv (deploy.rules.ops.conv_groups "grouped") reading more than this many
    #: channels per group, and not a multiple of it, stays float: the runtime's int8 kernel
    #: computes it wrong (wrong_int8_conv). 0: never. Tagged like float_conv_groups.
    float_grouped_conv_width: int = 0
    #: ONNX post-passes (names in deploy/export/passes.py) export() applies for this backend.
    export_passes: tuple[str, ...] = ()
    #: Transformer mode: SmoothQuant migration strengths to choose from, per activation
    #: quantizer read only by Linear layers (deploy.training.smooth); empty: off. It adds a
    #: per-channel Mul before those quantizers, which the runtime must fold into its
    #: quantization step to stay fast.
    smooth_quant_alphas: tuple[float, ...] = ()
    #: Op kinds whose constant table the engine stores int8 and dequantizes itself (weight-only
    #: int8: Embedding): per-row symmetric 8-bit codes, float compute. The export writes the
    #: table as int8 -> DequantizeLinear -> Gather, which must not cost run time (the runtime
    #: gathers from the compressed table, or folds the DQ once).
    weight_only: frozenset[str] = frozenset()
    #: Activation observers (deploy.frontend.prepare.OBSERVERS) calibration="auto" chooses
    #: from, the default first (deploy.training.choice): minmax keeps every value in range;
    #: MSE clips the rare outliers that otherwise leave the bulk of a tensor a few codes
    #: (random timm RepVGG-A0, whose identity BatchNorms amplify sparse channels: fake-quant
    #: cosine vs fp32 0.78 with minmax, 0.93 with MSE on OpenVINO).
    auto_observers: tuple[str, ...] = ("minmax", "mse")
    #: The runtime drops a ReLU/ReLU6 before a quantizer only when that quantizer's zero
    #: point is its lowest code (onnxruntime's ReluQuantFusion, ClipQuantFusion); otherwise
    #: the ReLU runs float, and so does the Conv before it. A shared-scale op (Concat) whose
    #: inputs mix rectified values with signed ones would put them all on a grid whose zero
    #: point is higher: there the rectified inputs keep their own scale and the op
    #: requantizes them (shared_scale_members).
    relu_fold_needs_lowest_zero_point: bool = False
    #: Op kinds that read a signed activation faster with zero point 0: a value that only
    #: such ops read (through pass-through ops and Concats), and that can be well below 0, is
    #: quantized with `signed_activation` instead of the default (activation_spec). The CPU
    #: plugin runs a Mul, a pooling or a float BatchNorm on u8 data as a kernel that
    #: subtracts the zero point first, and its AMX Convs run slower with one; a residual Add
    #: fused into the Conv before it reads the zero point itself and keeps the default.
    zero_point_free_readers: frozenset[str] = frozenset()
    signed_activation: QuantSpec | None = None
    notes: str = ""

    def __post_init__(self) -> None:
        if self.zero_point_free_readers and self.signed_activation is None:
            raise ValueError(f"{self.name} rules: zero_point_free_readers needs signed_activation")
        stray = self.quantize_pass_through_inputs - self.pass_through
        if stray:  # a quantizer above an op that does not commute with it changes the function
            raise ValueError(
                f"{self.name} rules: quantize_pass_through_inputs names kinds that are not "
                f"pass-through: {', '.join(sorted(stray))}"
            )

    def wrong_int8_conv(self, in_channels: int, groups: int, shape: str) -> bool:
        """Whether the runtime's int8 kernel computes a Conv of this group `shape`
        (deploy.rules.ops.conv_groups) wrong: float_grouped_conv_width."""
        width, per_group = self.float_grouped_conv_width, in_channels // groups
        return shape == "grouped" and 0 < width < per_group and per_group % width != 0

    def op_rules(self, transformer: bool) -> Mapping[str, OpRule]:
        """A node's rules: transformer mode's, except in a conv stage (conv_stage), which
        is a CNN and takes the CNN rules; pass transformer=False for those nodes."""
        return self.transformer_ops if transformer else self.ops

    @property
    def int8_carriers(self) -> frozenset[str]:
        """Kinds int8 data crosses unchanged: the pass-through ops, and the activations every
        backend fuses into the op before them (float_islands walks through both)."""
        return self.pass_through | frozenset(FUSED_ACTIVATIONS)


def available_targets() -> list[str]:
    """Every sub-package of backends/ that ships a rules module."""
    names = []
    for info in pkgutil.iter_modules(backends.__path__):
        if (
            info.ispkg
            and importlib.util.find_spec(f"qat_deploy.backends.{info.name}.rules") is not None
        ):
            names.append(info.name)
    return sorted(names)


def get_rules(target: str) -> BackendRules:
    targets = available_targets()
    if target not in targets:
        raise BadInputError(f"unknown target '{target}'; known targets: {', '.join(targets)}")
    return importlib.import_module(f"qat_deploy.backends.{target}.rules").RULES


#: Activations every backend fuses into the op before it: an op's quantized output follows them.
FUSED_ACTIVATIONS = ("relu", "relu6")


def rectified(
    op: T,
    kind: Callable[[T], str | None],
    producers: Callable[[T], Sequence[T | None]],
    carries: Callable[[T], bool],
    sources: Iterable[str] = FUSED_ACTIVATIONS,
) -> bool:
    """Whether the op's output can never be negative: the output of a `sources` kind (a fused
    ReLU/ReLU6), or made only of such values by ops that `carries` (pass-through ops,
    shared-scale Concats). producers: the ops computing an op's run-time data inputs, None
    for a graph input. One walk for the torch graph (prepare) and the ONNX graph (lint,
    through its Q/DQ)."""
    if kind(op) in sources:
        return True
    if not carries(op):
        return False
    found = producers(op)
    return bool(found) and all(
        p is not None and rectified(p, kind, producers, carries, sources) for p in found
    )


#: Kinds whose output is never negative (a quantizer reading them has zero point 0 already),
#: or hardly: SiLU >= -0.28, HardSwish >= -0.375, GELU >= -0.17. Symmetric int8 would halve
#: their resolution (activation_spec).
HARDLY_NEGATIVE = (
    *FUSED_ACTIVATIONS,
    "sigmoid",
    "hardsigmoid",
    "softmax",
    "silu",
    "hardswish",
    "gelu",
)

#: Kinds whose output is a mean of their input's values, so never below the input's least.
AVERAGING = ("avgpool", "global_avgpool", "reduce_mean")
#: Kinds whose output lies in [0, 1]: a Mul by one (a squeeze-excite or ECA gate) keeps its
#: other input's lower bound.
GATES = ("sigmoid", "hardsigmoid")


def hardly_negative(
    op: T,
    kind: Callable[[T], str | None],
    producers: Callable[[T], Sequence[T | None]],
    passes_through: Callable[[T], bool],
) -> bool:
    """Whether the op's output is never or hardly negative: a HARDLY_NEGATIVE kind's output,
    carried by pass-through ops, averaging ops, or a Mul by a gate (squeeze-excite:
    mean(SiLU(x)) and SiLU(x) * sigmoid(s) are >= -0.28 too). One walk for prepare and lint
    (rectified's producers)."""

    def gate(node: T | None) -> bool:
        return node is not None and rectified(node, kind, producers, passes_through, GATES)

    def carries(node: T) -> bool:
        if passes_through(node) or kind(node) in AVERAGING:
            return True
        return kind(node) == "mul" and any(gate(p) for p in producers(node))

    return rectified(op, kind, producers, carries, HARDLY_NEGATIVE)


def reader_kinds(
    readers: Iterable[T], kind: Callable[[T], str | None], users: Callable[[T], Iterable[T]]
) -> list[str | None]:
    """The kinds of the ops that read a value, for activation_spec: a Concat's readers in its
    place, as it moves the value unchanged into its output (DenseNet's Concats, read by the
    next layer's BatchNorm)."""
    found: list[str | None] = []
    for reader in readers:
        if kind(reader) == "concat":
            found += reader_kinds(users(reader), kind, users) or [None]
        else:
            found.append(kind(reader))
    return found


def activation_spec(
    rules: BackendRules,
    default: QuantSpec,
    reader_kinds: Sequence[str | None],
    hardly_negative: bool,
) -> QuantSpec:
    """The spec of a value quantized with `default` by its readers' rules:
    BackendRules.signed_activation where every reader is a zero_point_free_readers kind and
    the value can be well below 0 (a non-negative one has zero point 0 on the default grid;
    a HARDLY_NEGATIVE one keeps twice the resolution there). One decision for prepare and
    lint."""
    zero_point_free = rules.zero_point_free_readers
    if not zero_point_free or hardly_negative or not reader_kinds:
        return default
    if default != rules.activation.with_bits(default.bits):  # an op rule's own spec
        return default
    if any(kind not in zero_point_free for kind in reader_kinds):
        return default
    return rules.signed_activation.with_bits(default.bits)


def shared_scale_members(
    inputs: Sequence[T], is_rectified: Callable[[T], bool], rules: BackendRules
) -> list[T]:
    """The inputs of a shared-scale op that take its one scale: all of them, except, with
    BackendRules.relu_fold_needs_lowest_zero_point, the rectified ones where some input is
    signed (DenseNet's stem ReLU -> MaxPool beside its dense layers' Conv outputs)."""
    if not rules.relu_fold_needs_lowest_zero_point:
        return list(inputs)
    signed = [i for i in inputs if not is_rectified(i)]
    return signed or list(inputs)


#: Every backend quantizes the data input of weighted ops and both inputs of MatMul.
WEIGHTED_OPS: Mapping[str, OpRule] = {
    "conv": OpRule(Inputs.ACTIVATION),
    "conv_transpose": OpRule(Inputs.ACTIVATION),
    "linear": OpRule(Inputs.ACTIVATION),
    "matmul": OpRule(Inputs.ALL),
}


@dataclass(frozen=True)
class InputFacts:
    """What the rule interpreter needs to know about one tensor input of an op, whichever
    graph it comes from (a captured torch graph in prepare, an ONNX graph in lint)."""

    constant: bool  # known before run time (a weight, a folded constant)
    #: produced by a Conv(+BN) that has no other reader, so a backend can fuse it into this op
    fusible_conv: bool = False
    #: a term of a parallel-branch sum: the op adds only linear branches of one value
    #: (branch_sum_root), so with BackendRules.float_branch_sums it stays float
    branch_sum: bool = False


def selected_inputs(
    kind: str | None, rule: OpRule, inputs: Sequence[InputFacts], float_branch_sums: bool = False
) -> list[int]:
    """Indices of the run-time inputs of an op that its rule quantizes. The one interpreter of
    a backend's op rules: prepare() places quantizers where it says, lint() checks the same.
    A weighted op's weight is not among them (it has its own per-channel quantizer).
    float_branch_sums: the backend's BackendRules.float_branch_sums."""
    runtime = [i for i, facts in enumerate(inputs) if not facts.constant]
    if rule.inputs is Inputs.ACTIVATION:
        return [0] if 0 in runtime else []
    if kind in ("add", "mul") and len(runtime) < 2:
        return []  # x + constant: nothing to requantize
    if kind == "add" and float_branch_sums and all(inputs[i].branch_sum for i in runtime):
        return []  # parallel branches of one value: quantized once, after the sum
    if rule.inputs is Inputs.SKIP_BRANCH:
        fusible = [i for i in runtime if inputs[i].fusible_conv]
        if fusible:  # the backend fuses the first Conv(+BN) into the Add; quantize the rest
            return [i for i in runtime if i != fusible[0]]
    return runtime


def fused_output(node: T, users: Callable[[T], list[T]], kind: Callable[[T], str | None]) -> T:
    """Where an op's output quantizer goes: after the ReLU/ReLU6 that alone reads it (and so
    on). One walk for the torch graph (prepare) and the ONNX graph (lint)."""
    while len(following := users(node)) == 1 and kind(following[0]) in FUSED_ACTIVATIONS:
        node = following[0]
    return node


#: Op kinds that are one linear branch of their data input: a Conv (its BatchNorm folded in)
#: or a standalone BatchNorm.
BRANCH_KINDS = ("conv", "bn")


def branch_sum_root(
    add: T,
    terms: Callable[[T], Sequence[T | None]],
    kind: Callable[[T], str | None],
    source: Callable[[T], Hashable],
) -> Hashable | None:
    """The value X when `add` sums only parallel linear branches of X: Conv(+BN)(X), BN(X),
    or Adds of such (RepVGG's 3x3 + 1x1 + identity BN, ACNet, Diverse Branch Blocks), each
    read by that sum alone; else None. A residual x + f(x) is no such sum: x is not a branch
    of itself. One walk for the torch graph (prepare) and the ONNX graph (lint).

    terms: the ops producing an Add's run-time inputs, None where a term has other readers or
    no producer; source: the data input of a branch op, as a hashable handle."""
    roots: set[Hashable | None] = set()
    for term in terms(add):
        term_kind = kind(term) if term is not None else None
        if term_kind in BRANCH_KINDS:
            roots.add(source(term))
        elif term_kind == "add":
            roots.add(branch_sum_root(term, terms, kind, source))
        else:
            return None
    return roots.pop() if len(roots) == 1 and None not in roots else None


#: Producer chains every backend fuses into its Conv / Linear kernel.
CONV_FUSIONS: tuple[tuple[str, ...], ...] = (
    ("conv", "bn"),
    ("conv", "bn", "relu"),
    ("conv", "bn", "relu6"),
    ("conv", "relu"),
    ("conv", "relu6"),
    ("linear", "relu"),
)


def float_islands(
    nodes: Iterable[T],
    *,
    ruled: Callable[[T], bool],
    kept: Callable[[T], bool],
    weighted: Callable[[T], bool],
    transparent: Callable[[T], bool],
    producers: Callable[[T], Iterable[T | None]],
    users: Callable[[T], Iterable[T | None]],
) -> set[T]:
    """The ops whose rule would quantize them, left float because every op they exchange data
    with computes in float, with at least one kept float by the user (keep_float or the latency
    tuner): an Add, Mul, pooling or attention MatMul between float layers would only add Q/DQ
    pairs that no int8 kernel reads. One interpreter for the torch graph (prepare) and the ONNX
    graph (lint, the tuner's rewrite); each passes its own walks over hashable node handles.

    ruled: the op's kind has a rule; kept: a layer kept float; weighted: Conv/Linear, which
    never join an island (only keep_float moves them); transparent: ops the data crosses
    unchanged in int8 (pass-through kinds, fused activations, Q/DQ). producers / users: the
    data neighbours, None for a graph input or output."""
    near = {
        node: [*_across(node, producers, transparent), *_across(node, users, transparent)]
        for node in nodes
        if ruled(node) and not kept(node) and not weighted(node) and not transparent(node)
    }

    def computes_float(neighbour: T | None, floating: set[T]) -> bool:
        return neighbour is None or kept(neighbour) or not ruled(neighbour) or neighbour in floating

    # The largest set of candidates with no int8 neighbour outside it. Grown from the kept
    # layers one op at a time instead, a chain of such ops (ShuffleNet's concats, joined
    # through reshapes and splits) would never start: each waits for the next to be float.
    floating = set(near)
    shrunk = True
    while shrunk:
        shrunk = False
        for node in [n for n in floating if not all(computes_float(m, floating) for m in near[n])]:
            floating.discard(node)
            shrunk = True
    # ... of which only the ops a kept layer reaches: a model with no layer kept stays as is
    islands: set[T] = set()
    pending = [n for n in floating if any(m is not None and kept(m) for m in near[n])]
    while pending:
        node = pending.pop()
        if node not in islands:
            islands.add(node)
            pending.extend(m for m in near[node] if m in floating)
    return islands


def _across(
    node: T, step: Callable[[T], Iterable[T | None]], transparent: Callable[[T], bool]
) -> list[T | None]:
    """The ops one step from `node` in one direction, seen through transparent ops."""
    found: list[T | None] = []
    pending, seen = list(step(node)), set()
    while pending:
        current = pending.pop()
        if current is None or not transparent(current):
            found.append(current)
        elif current not in seen:
            seen.add(current)
            pending.extend(step(current))
    return found


#: Kinds of a transformer's token stream: a conv stage ends where its feature map reaches one.
TOKEN_KINDS = frozenset({"layer_norm", "softmax", "linear", "matmul", "attention", "embedding"})
#: Kinds a feature map crosses unchanged (a transformer's unfold into patches among them).
_RESHUFFLES = frozenset({"reshape", "transpose", "identity", "getitem", "pad", "maxpool"})


def conv_stage(
    nodes: Iterable[T],
    *,
    kind: Callable[[T], str | None],
    transparent: Callable[[T], bool],
    producers: Callable[[T], Sequence[T | None]],
) -> set[T]:
    """In a transformer, the ops of its convolutional stages: those whose every data input
    is a convolution's feature map (a Conv's output, or one of an op of the stage) seen
    through reshuffles and transparent ops, up to the token stream (TOKEN_KINDS). A hybrid's
    MobileNet blocks (MobileViT: SiLU, residual Adds, the Concat that fuses conv and
    transformer features) are a CNN and take the backend's CNN rules; a ViT's patch
    embedding leads straight into the token stream and has none. One interpreter for the
    torch graph (prepare) and the ONNX graph (lint).

    nodes: in topological order; transparent: ops the data crosses that are not the model's
    own (Q/DQ, a weighted op's helper nodes); producers: of the data inputs, None for a graph
    input or a constant (a ViT's class token makes its Concat no feature map)."""
    features: set[T] = set()
    stage: set[T] = set()
    for node in nodes:
        node_kind = kind(node)
        if node_kind == "conv":
            features.add(node)
            continue
        inputs = producers(node)
        if not inputs or any(p is None or p not in features for p in inputs):
            continue
        if transparent(node) or node_kind in _RESHUFFLES:
            features.add(node)
        elif node_kind is not None and node_kind not in TOKEN_KINDS:
            features.add(node)
            stage.add(node)
    return stage
