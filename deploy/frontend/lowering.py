"""Turn a captured ATen graph into the graph prepare() places quantizers on.

- Weighted ops (conv, conv_transpose, linear, matmul with a constant 2-D right side, and
  addmm of a constant weight and bias: transformers' Conv1D in GPT-2) become call_module
  nodes of nn.Conv*/nn.Linear modules that hold the very same parameters, whether the user
  wrote nn.Conv2d or F.conv2d on an nn.Parameter; prepare() then swaps them for fake-quantized
  modules and folds BatchNorm, as torchao's PT2E QAT does for conv-bn.
- embedding of a constant table becomes an nn.Embedding module (weight-only int8 tables).
- batch_norm and dropout become nn.BatchNorm*/nn.Dropout modules, so train()/eval() of the
  prepared graph switches them as it switches the user's model (torch.export records the mode
  of the moment of capture; torchao needs move_exported_model_to_train for the same reason).
- scaled_dot_product_attention is written out as MatMul(Q, K^T) -> scale -> mask -> Softmax
  -> MatMul(P, V), so the rules can quantize its two MatMuls like any other.
- Parallel Conv(+BN) branches of one input summed by an Add (RepVGG, ACNet and Diverse Branch
  Blocks in training form) become one Conv: the smaller kernel zero-padded into the larger,
  each branch's BatchNorm folded in with its running statistics. Exact in eval mode, one Conv
  instead of two on every runtime, and one quantized output instead of one per branch. QAT
  then trains the merged Conv, its branch BatchNorms frozen.
- An expand whose every reader is a broadcasting elementwise op (timm's ECA gate:
  x * y.expand_as(x)) is dropped: the op broadcasts the unexpanded value to the same result,
  and a quantizer of the gate then works on its C values, not on a full-size copy.
- A backend may ask for composite ops to be written out (BackendRules.decompose): SiLU as
  x * sigmoid(x), and "fused_projection", a Linear whose output is only ever split into equal
  parts (timm's qkv: reshape to (B, N, 3, heads, dim), permute, unbind) as one Linear per part.
- Nodes are named after the module that computed them ("layer1_0_conv1"), so plans, errors
  and reports speak the user's names.
"""

from __future__ import annotations

import copy
import itertools
import math
import operator
import os
import re

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from qat_deploy.deploy.rules.ops import WEIGHTED_KINDS, aten_kind

aten = torch.ops.aten

_CONV_CLASSES = {
    "conv": (nn.Conv1d, nn.Conv2d, nn.Conv3d),
    "conv_transpose": (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d),
}
_BN_CLASSES = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
#: Modules lowering creates, and the kinds they compute.
MODULE_KINDS: tuple[tuple[type[nn.Module], str], ...] = (
    *((cls, "conv_transpose") for cls in _CONV_CLASSES["conv_transpose"]),
    *((cls, "conv") for cls in _CONV_CLASSES["conv"]),
    (nn.Linear, "linear"),
    (nn.Embedding, "embedding"),
    (nn.modules.batchnorm._BatchNorm, "bn"),
    (nn.Dropout, "identity"),
)


def lower(gm: fx.GraphModule, decompose: frozenset[str] = frozenset()) -> None:
    """All rewrites of this module, in place; `decompose` names the composite kinds of
    DECOMPOSITIONS a backend wants written out."""
    additive_masks: dict[fx.Node, fx.Node] = {}
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        kind = aten_kind(node.target)
        if kind in decompose and DECOMPOSITIONS[kind](gm, node):
            continue
        if node.target == aten.addmm.default:
            _addmm_to_linear(gm, node)
        elif kind in WEIGHTED_KINDS or (kind == "matmul" and _constant_2d(gm, node)):
            _to_weighted_module(gm, node, kind)
        elif kind == "embedding":
            _to_embedding(gm, node)
        elif kind == "bn" and node.target == aten.batch_norm.default:
            _to_batch_norm(gm, node)
        elif node.target == aten.dropout.default:
            _to_module(gm, node, nn.Dropout(float(node.args[1])), "dropout", node.args[0])
        elif kind == "attention":
            _decompose_attention(gm, node, additive_masks)
    if FUSED_PROJECTION in decompose:
        _split_fused_projections(gm)
    _drop_broadcast_expands(gm)
    _merge_identical_norms(gm)
    _merge_split_convs(gm)
    _batch_norm_into_concat_parts(gm)
    _merge_parallel_convs(gm)
    gm.graph.eliminate_dead_code()
    _name_after_modules(gm)
    gm.graph.lint()
    gm.recompile()


def node_kind(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """The kind of a node of a lowered graph (deploy.rules.ops vocabulary), None for placeholders,
    outputs, attributes and ops without one."""
    if node.op == "call_module":
        module = modules[node.target]
        for cls, kind in MODULE_KINDS:
            if isinstance(module, cls):
                return kind
        return getattr(module, "op_kind", None)
    if node.op != "call_function":
        return None
    kind = aten_kind(node.target)
    if kind == "relu6" and node.target != aten.relu6.default and _args(node)[1:3] != [0.0, 6.0]:
        return None  # hardtanh with other bounds: a clamp, not a ReLU6 a backend fuses
    if kind == "reduce_mean" and _spatial_mean(node):
        return "global_avgpool"
    if kind == "global_avgpool" and _args(node)[1:2] not in ([1], [[1]], [[1, 1]], [(1, 1)]):
        return "avgpool"
    return kind


def _args(node: fx.Node) -> list:
    defaults = {aten.hardtanh.default: [-1.0, 1.0]}.get(node.target, [])
    args = list(node.args)
    return args + defaults[len(args) - 1 :] if defaults and len(args) < 3 else args


def _spatial_mean(node: fx.Node) -> bool:
    """mean over the two spatial axes of an NCHW tensor: global average pooling, also without
    keepdim (ShuffleNetV2's x.mean([2, 3])); exported as ReduceMean, which the onnxruntime
    export pass rewrites to GlobalAveragePool."""
    args = node.args
    rank = _rank(args[0])
    dims = args[1] if len(args) > 1 else None
    if rank != 4 or not isinstance(dims, list | tuple):
        return False
    return sorted(d % 4 for d in dims) == [2, 3]


def _rank(node) -> int | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val.dim() if isinstance(val, torch.Tensor) else None


def _tensor_attr(gm: fx.GraphModule, node) -> torch.Tensor | None:
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    value = _attribute(gm, node.target)
    return value if isinstance(value, torch.Tensor) else None


def _attribute(gm: fx.GraphModule, path: str):
    value = gm
    for part in path.split("."):
        value = getattr(value, part, None)
    return value


def _constant_2d(gm: fx.GraphModule, node: fx.Node) -> bool:
    weight = _tensor_attr(gm, node.args[1]) if len(node.args) > 1 else None
    return weight is not None and weight.dim() == 2 and node.target != aten.bmm.default


def _parameter(tensor: torch.Tensor) -> nn.Parameter:
    return tensor if isinstance(tensor, nn.Parameter) else nn.Parameter(tensor.detach().clone())


def _to_weighted_module(gm: fx.GraphModule, node: fx.Node, kind: str) -> None:
    call = node.normalized_arguments(gm, normalize_to_only_use_kwargs=True)
    a = dict(call.kwargs) if call is not None else {}
    weight_node = a.get("weight", a.get("other"))
    weight, sources = _tensor_attr(gm, weight_node), None
    if weight is None and kind != "matmul":  # computed in forward, from parameters only?
        weight, sources = _parameter_function(gm, weight_node)
    if weight is None:  # a weight computed from the inputs: an activation x activation op
        return
    bias_node = a.get("bias")
    bias = _tensor_attr(gm, bias_node)
    if bias_node is not None and bias is None:
        return  # a bias computed at run time: keep the op as captured
    with torch.device("meta"):
        if kind == "matmul":  # x @ W == linear(x, W.T): a Linear with the transposed weight
            module = nn.Linear(weight.shape[0], weight.shape[1], bias=False)
        elif kind == "linear":
            module = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        else:
            module = _conv_module(kind, weight, bias is not None, a)
    if kind == "matmul":
        module.weight = nn.Parameter(weight.detach().t().contiguous())
        name = f"{weight_node.target}_linear"
    else:
        module.weight = _parameter(weight)
        module.bias = None if bias is None else _parameter(bias)
        name = (
            _owner_path(weight_node, kind)
            if sources is None
            else _weight_owner(gm, sources, weight)
        )
    _to_module(gm, node, module, name, a.get("input", node.args[0]))


def _parameter_function(gm: fx.GraphModule, node) -> tuple[torch.Tensor | None, list[str]]:
    """The value of a weight the model computes in forward from its parameters alone (weight
    standardisation in timm's NF nets, weight_norm parametrisations in wav2vec2), evaluated
    once, as deployment folds it, with the paths of the parameters it reads; (None, []) when it
    depends on an input. QAT then trains the folded weight."""
    values: dict[fx.Node, object] = {}
    sources: list[str] = []

    def value(n):
        if not isinstance(n, fx.Node):
            return n
        if n not in values:
            values[n] = _UNKNOWN
            if n.op == "get_attr":
                values[n] = _tensor_attr(gm, n)
                sources.append(n.target)
            elif n.op == "call_function":
                args = fx.node.map_aggregate(n.args, value)
                kwargs = fx.node.map_aggregate(n.kwargs, value)
                leaves: list = []
                fx.node.map_aggregate((args, kwargs), leaves.append)
                known = not any(v is _UNKNOWN for v in leaves)
                values[n] = n.target(*args, **kwargs) if known else _UNKNOWN
        return values[n]

    with torch.no_grad():
        folded = value(node) if isinstance(node, fx.Node) else None
    if not isinstance(folded, torch.Tensor):
        return None, []
    return folded, sources


#: a value that depends on the model's inputs (or an op lowering does not evaluate)
_UNKNOWN = object()


def _weight_owner(gm: fx.GraphModule, paths: list[str], weight: torch.Tensor) -> str:
    """The module a computed weight belongs to: the holder of the parameter of its shape (a
    parametrised layer's, not its parametrizations container's), else of all of `paths`."""
    shaped = [p for p in paths if getattr(_attribute(gm, p), "shape", None) == weight.shape]
    parts = [p.split(".")[:-1] for p in (shaped[:1] or paths)]
    return ".".join(os.path.commonprefix(parts)).split(".parametrizations")[0] or "weight_fn"


def _addmm_to_linear(gm: fx.GraphModule, node: fx.Node) -> None:
    """addmm(b, x, W) == linear(x, W.T, b) for a constant W (in, out) and b, beta = alpha = 1:
    transformers' Conv1D (GPT-2's attention and MLP projections) computes so."""
    bias_node, data, weight_node = node.args[:3]
    if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
        return
    weight, bias = _tensor_attr(gm, weight_node), _tensor_attr(gm, bias_node)
    if weight is None or bias is None or weight.dim() != 2 or bias.shape != weight.shape[1:]:
        return
    with torch.device("meta"):
        module = nn.Linear(weight.shape[0], weight.shape[1])
    module.weight = nn.Parameter(weight.detach().t().contiguous())
    module.bias = _parameter(bias)
    _to_module(gm, node, module, _owner_path(weight_node, "linear"), data)


def _to_embedding(gm: fx.GraphModule, node: fx.Node) -> None:
    """aten.embedding of a constant table -> nn.Embedding holding that table, so a backend
    that stores tables in int8 (BackendRules.weight_only) can give it a weight quantizer."""
    weight_node, indices = node.args[:2]
    weight = _tensor_attr(gm, weight_node)
    if weight is None or weight.dim() != 2:
        return
    padding = node.args[2] if len(node.args) > 2 else -1
    with torch.device("meta"):
        module = nn.Embedding(*weight.shape, padding_idx=None if padding < 0 else padding)
    module.weight = _parameter(weight)
    _to_module(gm, node, module, _owner_path(weight_node, "embedding"), indices)


def _owner_path(weight_node: fx.Node, kind: str) -> str:
    """Where the module taking over a weight goes: the module that held it, else beside it."""
    return weight_node.target.rpartition(".")[0] or f"{weight_node.target}_{kind}"


def _conv_module(kind: str, weight: torch.Tensor, has_bias: bool, a: dict) -> nn.Module:
    groups = a.get("groups", 1)
    spatial = weight.dim() - 2
    cls = _CONV_CLASSES[kind][spatial - 1]
    common = {
        "kernel_size": tuple(weight.shape[2:]),
        "stride": a.get("stride", 1),
        "padding": a.get("padding", 0),
        "dilation": a.get("dilation", 1),
        "groups": groups,
        "bias": has_bias,
    }
    if kind == "conv":
        return cls(weight.shape[1] * groups, weight.shape[0], **common)
    return cls(
        weight.shape[0],
        weight.shape[1] * groups,
        output_padding=a.get("output_padding", 0),
        **common,
    )


def _to_batch_norm(gm: fx.GraphModule, node: fx.Node) -> None:
    x, weight, bias, mean, var, _, momentum, eps = node.args[:8]
    tensors = [_tensor_attr(gm, n) for n in (weight, bias, mean, var)]
    rank = _rank(x)
    if rank not in _BN_CLASSES or tensors[2] is None or tensors[3] is None:
        return
    w, b, running_mean, running_var = tensors
    with torch.device("meta"):
        bn = _BN_CLASSES[rank](
            running_mean.numel(), eps=eps, momentum=momentum, affine=w is not None
        )
    if w is not None:
        bn.weight, bn.bias = _parameter(w), _parameter(b)
    bn.running_mean, bn.running_var = running_mean, running_var
    counter = _tensor_attr(gm, _sibling(gm, mean, "num_batches_tracked"))
    bn.num_batches_tracked = counter if counter is not None else torch.tensor(0)
    _to_module(gm, node, bn, mean.target.rpartition(".")[0] or "batch_norm", x)


def _sibling(gm: fx.GraphModule, node: fx.Node, name: str) -> fx.Node | None:
    prefix = node.target.rpartition(".")[0]
    target = f"{prefix}.{name}" if prefix else name
    return next((n for n in gm.graph.nodes if n.op == "get_attr" and n.target == target), None)


def _to_module(
    gm: fx.GraphModule,
    node: fx.Node,
    module: nn.Module,
    path: str,
    x,
    replaces: frozenset[int] = frozenset(),
) -> fx.Node:
    """Replace `node` by a call of `module`, stored at `path` when that is free or holds
    only the tensors `module` took over (the container torch.export left there) or
    `replaces` (those of a layer a rewrite replaces), else at a fresh path beside it."""
    path = _place(gm, path, module.eval(), replaces)  # captured in eval mode, like the graph
    with gm.graph.inserting_before(node):
        call = gm.graph.call_module(path, (x,))
    call.meta = dict(node.meta)
    node.replace_all_uses_with(call)
    gm.graph.erase_node(node)
    return call


def _place(
    gm: fx.GraphModule, path: str, module: nn.Module, replaces: frozenset[int] = frozenset()
) -> str:
    owned = {id(t) for t in (*module.parameters(), *module.buffers())} | replaces
    try:
        existing = gm.get_submodule(path)
    except AttributeError:
        existing = None
    if existing is not None and path:
        tensors = [*existing.parameters(recurse=False), *existing.buffers(recurse=False)]
        if type(existing) is type(module) and all(id(t) in owned for t in tensors):
            return path  # the same layer called again: share it
        if not list(existing.children()) and all(id(t) in owned for t in tensors):
            _set_submodule(gm, path, module)
            return path
    fresh, i = path.replace(".", "_") or "op", 0
    while hasattr(gm, fresh):
        i += 1
        fresh = f"{path.replace('.', '_')}_{i}"
    gm.add_submodule(fresh, module)
    return fresh


def _set_submodule(gm: fx.GraphModule, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, name, module)


_EXPANDS = (aten.expand.default, aten.expand_as.default)
#: elementwise ops that broadcast their tensor operands against each other
_BROADCASTING = (aten.mul.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.div.Tensor)


def _drop_broadcast_expands(gm: fx.GraphModule) -> None:
    """x * y.expand_as(x) -> x * y where the elementwise op's result keeps its shape and
    dtype. Exact, and the gate stays [N, C, 1, 1] up to the op: quantized after the expand,
    OpenVINO materialised every ECA gate as a full-size bf16 Broadcast (ECA-ResNet26t)."""
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _EXPANDS:
            continue
        source = node.args[0]
        if node.users and all(_broadcasts_alike(user, node, source) for user in node.users):
            node.replace_all_uses_with(source)


def _broadcasts_alike(user: fx.Node, expand: fx.Node, source) -> bool:
    """Whether `user` computes the same tensor with `source` in place of `expand`."""
    if user.target not in _BROADCASTING or expand in user.kwargs.values():
        return False
    result, unexpanded = user.meta.get("val"), getattr(source, "meta", {}).get("val")
    if not isinstance(result, torch.Tensor) or not isinstance(unexpanded, torch.Tensor):
        return False
    shapes = []
    for arg in user.args:
        val = unexpanded if arg is expand else arg
        if isinstance(val, fx.Node):
            val = val.meta.get("val")
            if not isinstance(val, torch.Tensor):
                return False
        shapes.append(val.shape if isinstance(val, torch.Tensor) else ())  # else a scalar
    try:
        same_shape = torch.broadcast_shapes(*shapes) == result.shape
    except RuntimeError:
        return False
    return same_shape and unexpanded.dtype == expand.meta["val"].dtype


_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


def _merge_identical_norms(gm: fx.GraphModule) -> None:
    """Norm layers with equal settings and equal tensors reading the same value compute the
    same value: the ONNX exporter's common-subexpression pass merges them into one node read
    twice (FastViT's identity BatchNorms of one input, at equal statistics). Lowering merges
    them first, so prepare places quantizers on the graph that lint will check."""
    seen: dict[tuple, list[fx.Node]] = {}
    merged = set()
    for node in list(gm.graph.nodes):
        module = gm.get_submodule(node.target) if node.op == "call_module" else None
        if not isinstance(module, _NORMS) or node.kwargs:
            continue
        twins = seen.setdefault((type(module), repr(module), node.args), [])
        twin = next((t for t in twins if _same_tensors(gm.get_submodule(t.target), module)), None)
        if twin is None:
            twins.append(node)
            continue
        node.replace_all_uses_with(twin)
        gm.graph.erase_node(node)
        merged.add(node.target)
    gm.graph.eliminate_dead_code()  # the attributes a merged module took over at capture
    called = {n.target for n in gm.graph.nodes if n.op in ("call_module", "get_attr")}
    for target in merged:
        if not any(t == target or t.startswith(f"{target}.") for t in called):
            gm.delete_submodule(target)


def _same_tensors(a: nn.Module, b: nn.Module) -> bool:
    """Equal parameters and buffers, bit for bit (a BatchNorm's update count aside: it does
    not change what eval mode computes)."""
    left, right = a.state_dict(), b.state_dict()
    left.pop("num_batches_tracked", None)
    right.pop("num_batches_tracked", None)
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


#: Channel splits into parts: each takes (x, sizes or size or count, dim).
_SPLITS = (aten.split_with_sizes.default, aten.split.Tensor, aten.chunk.default)


def _merge_split_convs(gm: fx.GraphModule) -> None:
    """Concat(Conv_1(x_1), ..., Conv_k(x_k)) over channels, x_i the channel parts of one x
    in order -> one grouped Conv of x: MixNet's mixed depthwise convs (kernels 3x3 ... 11x11
    on channel groups, each zero-padded to the largest) and its split pointwise convs (two
    groups). Exact in training and eval mode. The Split and Concat leave the graph, which
    int8 runtimes otherwise run between quantizers (OpenVINO 2026.4 on an AMD EPYC Zen 4,
    2 threads, random timm MixNet-S at 160x160: int8 0.73x fp32 as split convs, 1.65x
    merged). The Conv lives at the parts' parent path when they were its only layers (timm's
    MixedConv2d), else at the first part's."""
    for cat in list(gm.graph.nodes):
        parts = _conv_parts_of_concat(gm, cat)
        source = _split_source(parts) if parts else None
        if source is None:
            continue
        if any(_calls(gm, p.target) != 1 for p in parts):
            continue  # a module called elsewhere too: merging would change that call
        convs = [gm.get_submodule(p.target) for p in parts]
        whole = sum(c.in_channels for c in convs) == source.meta["val"].shape[1]
        merged = _grouped_conv(convs) if whole else None
        if merged is None:
            continue
        path = _merged_path(gm, [p.target for p in parts])
        for part in parts:
            if part.target != path:
                gm.delete_submodule(part.target)
        _set_submodule(gm, path, merged)
        with gm.graph.inserting_before(cat):
            call = gm.graph.call_module(path, (source,))
        call.meta = dict(cat.meta)
        cat.replace_all_uses_with(call)
        for dead in (cat, *parts):
            gm.graph.erase_node(dead)
    gm.graph.eliminate_dead_code()


def _split_source(parts: list[fx.Node]) -> fx.Node | None:
    """x when parts[i] reads getitem i of a channel split of x that nothing else reads."""
    items = [p.args[0] for p in parts]
    if any(not isinstance(i, fx.Node) or i.target is not operator.getitem for i in items):
        return None
    split = items[0].args[0]
    if not isinstance(split, fx.Node) or split.target not in _SPLITS:
        return None
    dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
    in_order = [i.args for i in items] == [(split, k) for k in range(len(items))]
    read_once = all(len(i.users) == 1 for i in items) and len(split.users) == len(items)
    if _rank(split.args[0]) != 4 or dim % 4 != 1 or not in_order or not read_once:
        return None
    return split.args[0]


def _merged_path(gm: fx.GraphModule, paths: list[str]) -> str:
    parent = paths[0].rpartition(".")[0]
    if not parent or any(p.rpartition(".")[0] != parent for p in paths):
        return paths[0]
    container = gm.get_submodule(parent)
    own = [*container.parameters(recurse=False), *container.buffers(recurse=False)]
    children = {f"{parent}.{name}" for name, _ in container.named_children()}
    return parent if not own and children == set(paths) else paths[0]


@torch.no_grad()
def _grouped_conv(convs: list[nn.Module]) -> nn.Module | None:
    """One Conv2d computing Concat(conv_1(x_1), ...) from x: groups add up, each part's kernel
    centred in the largest; None where stride, dilation or the per-group shape differ, or a
    part's padding does not centre its kernel the way the largest's does."""
    first = convs[0]
    same = ("stride", "dilation", "padding_mode")
    if any(getattr(c, f) != getattr(first, f) for c in convs for f in same):
        return None
    per_group = {(c.in_channels // c.groups, c.out_channels // c.groups) for c in convs}
    if len(per_group) != 1 or first.padding_mode != "zeros":
        return None
    if any(isinstance(c.padding, str) for c in convs):
        return None
    largest = max(convs, key=lambda c: c.weight[0].numel())
    offsets = [_tap_offsets(largest, conv) for conv in convs]
    if None in offsets:
        return None
    merged = nn.Conv2d(
        sum(c.in_channels for c in convs),
        sum(c.out_channels for c in convs),
        largest.kernel_size,
        first.stride,
        largest.padding,
        first.dilation,
        sum(c.groups for c in convs),
        bias=any(c.bias is not None for c in convs),
    )
    merged.weight.zero_()
    start = 0
    for conv, (dy, dx) in zip(convs, offsets, strict=True):
        rows = slice(start, start + conv.out_channels)
        kh, kw = conv.kernel_size
        merged.weight[rows, :, dy : dy + kh, dx : dx + kw] = conv.weight
        if merged.bias is not None:
            merged.bias[rows] = conv.bias if conv.bias is not None else 0.0
        start += conv.out_channels
    return merged.train(first.training)


def _batch_norm_into_concat_parts(gm: fx.GraphModule) -> None:
    """BN(Concat(Conv_1(x_1), ..., Conv_k(x_k)) over channels) -> Concat(BN_1(Conv_1(x_1)),
    ...), BN_i the BN's channels of part i, where the Convs did not merge into one
    (_merge_split_convs): parts of different inputs or shapes. Each slice then folds into
    its Conv like any Conv+BN instead of running float after the Concat. Exact in eval mode
    and in training mode (a BatchNorm's statistics are per channel)."""
    for node in list(gm.graph.nodes):
        bn = gm.get_submodule(node.target) if node.op == "call_module" else None
        if not isinstance(bn, nn.BatchNorm2d) or bn.running_mean is None or node.kwargs:
            continue
        parts = _conv_parts_of_concat(gm, node.args[0])
        if parts is None or len(node.args[0].users) != 1 or _calls(gm, node.target) != 1:
            continue
        cat, start = node.args[0], 0
        pieces = []
        for i, part in enumerate(parts):
            size = gm.get_submodule(part.target).out_channels
            path = _place(gm, f"{node.target}_{i}", _batch_norm_slice(bn, start, size))
            start += size
            with gm.graph.inserting_after(part):
                piece = gm.graph.call_module(path, (part,))
            _stands_for(piece, part)
            pieces.append(piece)
        cat.args = (pieces, *cat.args[1:])
        node.replace_all_uses_with(cat)
        gm.graph.erase_node(node)
        gm.delete_submodule(node.target)


def _conv_parts_of_concat(gm: fx.GraphModule, cat) -> list[fx.Node] | None:
    """The parts of a channel Concat when each is a Conv2d read by the Concat alone; else
    None."""
    if not (isinstance(cat, fx.Node) and cat.target == aten.cat.default):
        return None
    parts, dim = cat.args[0], cat.args[1] if len(cat.args) > 1 else 0
    if _rank(cat) != 4 or dim % 4 != 1:
        return None
    for part in parts:
        conv = gm.get_submodule(part.target) if part.op == "call_module" else None
        if not isinstance(conv, nn.Conv2d) or len(part.users) != 1:
            return None
    return list(parts)


def _calls(gm: fx.GraphModule, target: str) -> int:
    """How many nodes call the module at `target`."""
    return sum(n.op == "call_module" and n.target == target for n in gm.graph.nodes)


def _batch_norm_slice(bn: nn.BatchNorm2d, start: int, size: int) -> nn.BatchNorm2d:
    piece = nn.BatchNorm2d(size, eps=bn.eps, momentum=bn.momentum, affine=bn.affine)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            if getattr(bn, name) is not None:
                getattr(piece, name).copy_(getattr(bn, name)[start : start + size])
        piece.num_batches_tracked.copy_(bn.num_batches_tracked)
    return piece.train(bn.training)


def _merge_parallel_convs(gm: fx.GraphModule) -> None:
    """Add(Conv_a(+BN)(x), Conv_b(+BN)(x)) -> one Conv at Conv_a's or Conv_b's (the larger
    kernel's) path, repeatedly, so a sum of three or more branches folds too; also when one
    Conv sits in an inner Add with another term (_conv_pair)."""
    gm.graph.eliminate_dead_code()  # the attributes the modules took over: no longer read
    for node in list(gm.graph.nodes):
        found = _conv_pair(gm, node) if _is_plain_add(node) else None
        if found is None:
            continue
        *branches, inner, rest = found
        (a, a_bn, _), (b, b_bn, _) = sorted(
            branches, key=lambda branch: -gm.get_submodule(branch[0].target).weight[0].numel()
        )
        merged = _merged_conv(*_modules(gm, a, a_bn), *_modules(gm, b, b_bn))
        if merged is None:
            continue
        _set_submodule(gm, a.target, merged)
        if inner is None:
            node.replace_all_uses_with(a)
            a.meta = dict(node.meta)
        else:  # (Conv_a(x) + rest) + Conv_b(x) -> Conv_ab(x) + rest
            node.args = (a, rest)
            a.meta = dict(inner.meta)
        for dead in (inner if inner is not None else node, a_bn, b_bn, b):
            if dead is not None:
                gm.graph.erase_node(dead)
        for dead in (a_bn, b_bn, b):
            if dead is not None:
                gm.delete_submodule(dead.target)


Branch = tuple[fx.Node, fx.Node | None, fx.Node]


def _conv_pair(
    gm: fx.GraphModule, add: fx.Node
) -> tuple[Branch, Branch, fx.Node | None, object] | None:
    """Two Conv branches of one input that `add` sums: Conv_a(x) + Conv_b(x), or one of them
    inside an Add read by this one alone, (Conv_a(x) + y) + Conv_b(x): MobileOne and FastViT
    blocks add their identity BatchNorm y between the Conv branches. Returns both branches,
    the inner Add (None when direct) and y."""
    branches = [_conv_branch(gm, arg) for arg in add.args]
    if None not in branches and branches[0][2] is branches[1][2]:
        return branches[0], branches[1], None, None
    for outer in (0, 1):
        inner, c = add.args[1 - outer], branches[outer]
        if c is None or not _is_plain_add(inner) or len(inner.users) != 1:
            continue
        for j in (0, 1):
            b = _conv_branch(gm, inner.args[j])
            if b is not None and b[2] is c[2]:
                return b, c, inner, inner.args[1 - j]
    return None


def _is_plain_add(node) -> bool:
    return (
        isinstance(node, fx.Node)
        and node.op == "call_function"
        and aten_kind(node.target) == "add"
        and not node.kwargs
        and len(node.args) == 2
    )


def _conv_branch(gm: fx.GraphModule, node) -> tuple[fx.Node, fx.Node | None, fx.Node] | None:
    """(conv, its BatchNorm or None, their input) when `node` is Conv(x) or BN(Conv(x)) and
    each is read once and owns its module; else None."""
    if not isinstance(node, fx.Node) or node.op != "call_module" or len(node.users) != 1:
        return None
    bn = None
    if isinstance(gm.get_submodule(node.target), nn.modules.batchnorm._BatchNorm):
        bn, node = node, node.args[0]
        if not isinstance(node, fx.Node) or node.op != "call_module" or len(node.users) != 1:
            return None
    conv = gm.get_submodule(node.target)
    if type(conv) not in _CONV_CLASSES["conv"] or not isinstance(node.args[0], fx.Node):
        return None
    if any(_calls(gm, n.target) != 1 for n in (node, bn) if n is not None):
        return None  # a module called twice: merging would change its other call
    return node, bn, node.args[0]


def _modules(gm: fx.GraphModule, conv: fx.Node, bn: fx.Node | None) -> tuple[nn.Module, ...]:
    return gm.get_submodule(conv.target), gm.get_submodule(bn.target) if bn is not None else None


def _merged_conv(a: nn.Module, a_bn, b: nn.Module, b_bn) -> nn.Module | None:
    """One Conv computing a(+BN) + b(+BN), b's kernel placed inside a's; None where their
    geometry differs or b's taps cannot be aligned with a's."""
    same = ("in_channels", "out_channels", "stride", "groups", "padding_mode")
    if any(getattr(a, f) != getattr(b, f) for f in same) or a.padding_mode != "zeros":
        return None
    if isinstance(a.padding, str) or isinstance(b.padding, str):
        return None
    offsets = _tap_offsets(a, b)
    if offsets is None:
        return None
    folded_a, folded_b = _folded(a, a_bn), _folded(b, b_bn)
    if folded_a is None or folded_b is None:
        return None
    (weight_a, bias_a), (weight_b, bias_b) = folded_a, folded_b
    window = tuple(slice(o, o + k) for o, k in zip(offsets, b.kernel_size, strict=True))
    weight = weight_a.clone()
    weight[(slice(None), slice(None), *window)] += weight_b
    merged = copy.deepcopy(a)
    merged.weight = nn.Parameter(weight)
    merged.bias = nn.Parameter(bias_a + bias_b)
    return merged


def _tap_offsets(big: nn.Module, small: nn.Module) -> list[int] | None:
    """Per spatial axis, the tap of `big`'s kernel on which `small`'s first tap lands when
    both read the same input at their paddings; None where `small`'s taps cannot be aligned
    with `big`'s (a fractional or out-of-kernel offset, or a different tap spacing)."""
    offsets = []
    geometry = (big.kernel_size, small.kernel_size, big.padding, small.padding)
    for k_big, k, p_big, p, d_big, d in zip(*geometry, big.dilation, small.dilation, strict=True):
        offset, rest = divmod(p_big - p, d_big)
        if rest or not 0 <= offset <= k_big - k or (k > 1 and d != d_big):
            return None
        offsets.append(offset)
    return offsets


@torch.no_grad()
def _folded(conv: nn.Module, bn: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Conv(+BN)'s weight and bias as one Conv's, BN at its running statistics (torch's
    fuse_conv_bn_eval, as prepare folds the BN of a kept-float Conv); None for a BN without
    them."""
    if bn is not None:
        if bn.running_mean is None or bn.running_var is None:
            return None
        conv = fuse_conv_bn_eval(conv, bn)
    weight = conv.weight.detach()
    bias = conv.bias.detach() if conv.bias is not None else weight.new_zeros(weight.shape[0])
    return weight, bias


def _decompose_attention(
    gm: fx.GraphModule, node: fx.Node, additive_masks: dict[fx.Node, fx.Node]
) -> None:
    """softmax(Q K^T * scale + mask) V, as ops the rules know. Causal and grouped-query
    attention stay as captured (float). A boolean mask becomes an additive one (0 where
    attended, the dtype's lowest where hidden), computed once per mask (`additive_masks`
    caches it for the other layers): masked_fill over every layer's [B, heads, S, S] scores
    ran as a broadcasting Where, 0.89 of 9.7 ms of the pretrained MiniLM-L6 int8 engine on
    onnxruntime (seq 128), and the engine with one Add per layer instead ran 1.10x faster.
    Softmax is the same: a hidden score is the lowest value either way, up to rounding."""
    call = node.normalized_arguments(gm, normalize_to_only_use_kwargs=True)
    a = dict(call.kwargs) if call is not None else {}
    if a.get("is_causal") or a.get("enable_gqa") or a.get("dropout_p", 0.0):
        return
    q, k, v, mask = a["query"], a["key"], a["value"], a.get("attn_mask")
    head_dim = q.meta["val"].shape[-1]
    scale = a.get("scale") or 1.0 / math.sqrt(head_dim)
    graph = gm.graph
    if mask is not None and mask.meta["val"].dtype == torch.bool:
        mask = _additive_mask(graph, node, mask, q.meta["val"].dtype, additive_masks)
    with graph.inserting_before(node):
        keys = graph.call_function(aten.transpose.int, (k, -2, -1))
        scores = graph.call_function(aten.matmul.default, (q, keys))
        scores = graph.call_function(aten.mul.Tensor, (scores, float(scale)))
        if mask is not None:
            scores = graph.call_function(aten.add.Tensor, (scores, mask))
        probs = graph.call_function(aten.softmax.int, (scores, -1))
        out = graph.call_function(aten.matmul.default, (probs, v))
    keys.meta["nn_module_stack"] = node.meta.get("nn_module_stack", {})
    _stands_for(out, node)
    node.replace_all_uses_with(out)
    graph.erase_node(node)


def _additive_mask(
    graph: fx.Graph,
    first_reader: fx.Node,
    mask: fx.Node,
    dtype: torch.dtype,
    cache: dict[fx.Node, fx.Node],
) -> fx.Node:
    """where(mask, 0, lowest) in `dtype`, one node per mask, placed before its first reader
    (lower() visits the attentions in graph order, so it precedes the others too)."""
    if mask not in cache:
        with graph.inserting_before(first_reader):
            bias = graph.call_function(
                aten.where.Scalar, (mask, 0.0, float(torch.finfo(dtype).min))
            )
            if dtype != torch.get_default_dtype():
                bias = graph.call_function(aten._to_copy.default, (bias,), {"dtype": dtype})
        cache[mask] = bias
    return cache[mask]


def _stands_for(new: fx.Node, node: fx.Node) -> None:
    """Give a node computing a value of `node`'s shape its module path and its example value:
    the rules read the rank of what a mean reduces (_spatial_mean), and without it a
    squeeze-excite x.mean((2, 3)) of a written-out SiLU went unquantized (timm MixNet)."""
    new.meta["nn_module_stack"] = node.meta.get("nn_module_stack", {})
    if "val" in node.meta:
        new.meta["val"] = node.meta["val"]


def _gate_times_input(gate_op):
    """A decomposition of act(x) = x * gate(x): what the exporter writes for SiLU (Sigmoid) and
    HardSwish (HardSigmoid, the ONNX function's expansion) anyway, as two ops the rules see."""

    def decompose(gm: fx.GraphModule, node: fx.Node) -> bool:
        graph, x = gm.graph, node.args[0]
        with graph.inserting_before(node):
            gate = graph.call_function(gate_op, (x,))
            product = graph.call_function(aten.mul.Tensor, (x, gate))
        for new in (gate, product):
            _stands_for(new, node)
        node.replace_all_uses_with(product)
        graph.erase_node(node)
        return True

    return decompose


def _gelu_as_gate_times_input(gm: fx.GraphModule, node: fx.Node) -> bool:
    """GELU (erf form) as x * gate(x), gate = 0.5 * (1 + erf(x / sqrt(2))): the exporter's own
    ops and order, but the rules now see the product (a Mul) and may quantize the gate. The
    gate lies in [0, 1]; its range is fixed at [0, 255/254] (VALUE_RANGE): on that uint8 grid
    (scale 1/254) Q(gate) equals a Q of erf itself (scale 1/127, zero point 127), which lets
    onnxruntime drop the Add and Mul (backends/onnxruntime/gelu_gate.py). False, and nothing
    rewritten, for the tanh form."""
    if node.kwargs.get("approximate", "none") != "none":
        return False
    graph, x = gm.graph, node.args[0]
    with graph.inserting_before(node):
        scaled = graph.call_function(aten.div.Tensor, (x, math.sqrt(2.0)))
        erf = graph.call_function(aten.erf.default, (scaled,))
        shifted = graph.call_function(aten.add.Tensor, (erf, 1.0))
        gate = graph.call_function(aten.mul.Tensor, (shifted, 0.5))
        product = graph.call_function(aten.mul.Tensor, (x, gate))
    _stands_for(product, node)  # the module's one op: it takes the module's name (nn.GELU's)
    path = _module_path(node)
    owner = _path_name(path) if path is not None else node.name
    for new, part in ((scaled, "div"), (erf, "erf"), (shifted, "add"), (gate, "gate")):
        new.meta["val"] = node.meta.get("val")
        new._rename(f"{owner}_{part}")  # "act_erf": plans and reports say whose op it is
    gate.meta[VALUE_RANGE] = GELU_GATE_RANGE
    node.replace_all_uses_with(product)
    graph.erase_node(node)
    return True


def _conv_transpose_as_conv(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A 2-D ConvTranspose whose output is `stride` times its input (kernel - 2 * padding ==
    stride) as a Conv with stride^2 x the output channels and a pixel shuffle (ONNX
    DepthToSpace, CRD): output phase (a, b) of channel c is Conv channel c*s*s + a*s + b,
    whose taps are the transposed kernel's that land on it. Exact (the same products and
    sums); False, and nothing rewritten, for any other ConvTranspose."""
    call = node.normalized_arguments(gm, normalize_to_only_use_kwargs=True)
    a = dict(call.kwargs) if call is not None else {}
    weight, bias = _tensor_attr(gm, a.get("weight")), _tensor_attr(gm, a.get("bias"))
    geometry = _upsampling_geometry(a, weight)
    if geometry is None or (a.get("bias") is not None and bias is None):
        return False
    s, k, p, dmin, dmax = geometry
    c_in, c_out = weight.shape[:2]
    taps = dmax - dmin + 1
    w = weight.detach().new_zeros(c_out, s, s, c_in, taps, taps)
    for ph, pw, t, u in itertools.product(range(s), range(s), range(taps), range(taps)):
        i, j = ph + p - s * (t + dmin), pw + p - s * (u + dmin)
        if 0 <= i < k and 0 <= j < k:
            w[:, ph, pw, :, t, u] = weight.detach()[:, :, i, j].t()
    with torch.device("meta"):
        conv = nn.Conv2d(c_in, c_out * s * s, taps, padding=-dmin, bias=bias is not None)
    conv.weight = nn.Parameter(w.reshape(c_out * s * s, c_in, taps, taps))
    if bias is not None:
        conv.bias = nn.Parameter(bias.detach().repeat_interleave(s * s))
    name = a["weight"].target.rpartition(".")[0] or "conv_transpose"
    replaced = frozenset(id(t) for t in (weight, bias) if t is not None)
    conv_node = _to_module(gm, node, conv, name, a.get("input", node.args[0]), replaced)
    with gm.graph.inserting_after(conv_node):
        shuffled = gm.graph.call_function(aten.pixel_shuffle.default, (conv_node, s))
    conv_node.replace_all_uses_with(shuffled, delete_user_cb=lambda user: user is not shuffled)
    shuffled.meta = dict(conv_node.meta)
    return True


def _upsampling_geometry(a: dict, weight) -> tuple[int, int, int, int, int] | None:
    """(stride, kernel, padding, first tap offset, last tap offset) of a square 2-D
    ConvTranspose that upsamples by its stride with symmetric Conv padding, else None."""
    if weight is None or weight.dim() != 4 or a.get("groups", 1) != 1:
        return None
    square = {n: a.get(n, d) for n, d in (("stride", 1), ("padding", 0), ("dilation", 1))}
    square["output_padding"] = a.get("output_padding", 0)
    values = {}
    for name, value in square.items():
        value = list(value) if isinstance(value, list | tuple) else [value, value]
        if len(set(value)) != 1:
            return None
        values[name] = value[0]
    k = weight.shape[2]
    s, p = values["stride"], values["padding"]
    if weight.shape[3] != k or values["dilation"] != 1 or values["output_padding"]:
        return None
    if k - 2 * p != s:
        return None
    dmin, dmax = -((k - 1 - p) // s), (s - 1 + p) // s  # ceil((p - k + 1) / s), floor(...)
    return (s, k, p, dmin, dmax) if -dmin == dmax else None


DECOMPOSITIONS = {
    "silu": _gate_times_input(aten.sigmoid.default),
    # onnxruntime runs both parts in int8 once the HardSigmoid is an Add before a Q
    "hardswish": _gate_times_input(aten.hardsigmoid.default),
    "conv_transpose": _conv_transpose_as_conv,
    "gelu": _gelu_as_gate_times_input,
}
FUSED_PROJECTION = "fused_projection"
_RESHAPES = (aten.reshape.default, aten.view.default)


#: node.meta key: the user's module path of a layer lowering made out of it (a fused
#: projection's pieces live at fresh top-level paths such as "blocks_0_attn_qkv_0")
SOURCE_MODULE = "qat_deploy_source_module"
#: node.meta key: a value's (low, high), known from the function that computes it; prepare()
#: gives its quantizer that fixed range (observers.FixedRangeObserver)
VALUE_RANGE = "qat_deploy_value_range"
#: uint8 scale 1/254, so 1 / (2 * scale) is a whole number of codes (_gelu_as_gate_times_input)
GELU_GATE_RANGE = (0.0, 255 / 254)


def _split_fused_projections(gm: fx.GraphModule) -> None:
    """A Linear whose output is only used as k equal parts becomes k Linears on row slices of
    the weight, each followed by the shape ops its part went through. Two forms: timm's
    reshape (..., k, *rest) -> permute -> unbind of the k axis, and GPT-2's (transformers'
    Conv1D) [reshape of the leading dims] -> split of the last axis. Exact: each output
    channel, and its per-channel weight quantizer, stays what it was."""
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        linear = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(linear, nn.Linear):
            continue
        found = _fused_parts(node) or _split_parts(node)
        if found is None:
            continue
        parts, shape_ops = found
        rows = linear.out_features // len(parts)
        graph = gm.graph
        for i, part in enumerate(parts):
            with torch.device("meta"):
                piece = nn.Linear(linear.in_features, rows, bias=linear.bias is not None)
            piece.weight = nn.Parameter(linear.weight.detach()[i * rows : (i + 1) * rows].clone())
            if linear.bias is not None:
                piece.bias = nn.Parameter(linear.bias.detach()[i * rows : (i + 1) * rows].clone())
            path = _place(gm, f"{node.target}_{i}", piece.eval())
            with graph.inserting_before(part):
                out = graph.call_module(path, (node.args[0],))
                out.meta[SOURCE_MODULE] = str(node.target)  # what keep_float globs match
                for target, argument in shape_ops:
                    out = graph.call_function(target, (out, argument))
            out.meta = dict(part.meta)
            part.replace_all_uses_with(out)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()


def _split_parts(node: fx.Node):
    """([part per index], shape ops) when `node`'s output reaches its readers only as equal
    parts of its last axis: [reshape keeping that axis] -> split -> getitem 0..k-1."""
    out = node.meta.get("val")
    if not isinstance(out, torch.Tensor) or len(node.users) != 1:
        return None
    split, shape_ops = next(iter(node.users)), []
    if split.target in _RESHAPES:
        shaped = split.meta.get("val")
        if not isinstance(shaped, torch.Tensor) or shaped.shape[-1] != out.shape[-1]:
            return None
        if len(split.users) != 1:
            return None
        reshape, split = split, next(iter(split.users))
        shape_ops = [(reshape.target, list(reshape.args[1]))]
    if split.target not in (aten.split.Tensor, aten.split_with_sizes.default):
        return None
    source = split.args[0].meta.get("val")
    dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
    if not isinstance(source, torch.Tensor) or dim % source.dim() != source.dim() - 1:
        return None
    parts = sorted(split.users, key=lambda n: n.args[1] if n.target is operator.getitem else -1)
    sizes = [p.meta["val"].shape[-1] for p in parts if isinstance(p.meta.get("val"), torch.Tensor)]
    k = len(parts)
    if any(p.target is not operator.getitem for p in parts) or k < 2 or len(sizes) != k:
        return None
    if [p.args[1] for p in parts] != list(range(k)) or set(sizes) != {out.shape[-1] // k}:
        return None
    if out.shape[-1] % k:  # an unread last part (50 = 16 + 16 + 16 + 2, three read)
        return None
    for i, (target, shape) in enumerate(shape_ops):  # each part's own width on the last axis
        shape_ops[i] = (target, [*shape[:-1], sizes[0]])
    return parts, shape_ops


def _fused_parts(node: fx.Node):
    """([part per index], shape ops) when `node`'s output reaches its readers only as equal
    parts: reshape -> permute -> unbind (or one select per part) along the new axis."""
    users = list(node.users)
    out = node.meta.get("val")
    if len(users) != 1 or users[0].target not in _RESHAPES or not isinstance(out, torch.Tensor):
        return None
    reshape, axis = users[0], out.dim() - 1  # the first axis the reshape splits off
    shaped = reshape.meta.get("val")
    if not isinstance(shaped, torch.Tensor) or shaped.dim() < axis + 3:
        return None
    permutes = list(reshape.users)
    if len(permutes) != 1 or permutes[0].target != aten.permute.default:
        return None
    permute = permutes[0]
    parts = _parts_along(permute, list(permute.args[1]).index(axis))
    k = int(shaped.shape[axis])
    if parts is None or [i for _, i in parts] != list(range(k)) or out.shape[-1] % k:
        return None
    parts = [part for part, _ in parts]
    shape = [d for i, d in enumerate(reshape.args[1]) if i != axis]
    dims = [d - (d > axis) for d in permute.args[1] if d != axis]
    return parts, [(reshape.target, shape), (aten.permute.default, dims)]


def _parts_along(value: fx.Node, dim: int) -> list[tuple[fx.Node, int]] | None:
    """(part, index) of every reader when `value` is only read as parts along `dim`: unbind ->
    getitem (timm), or one select per part (torchvision Swin's qkv[0], qkv[1], qkv[2])."""
    readers = list(value.users)
    if len(readers) == 1 and readers[0].target == aten.unbind.int:
        if (list(readers[0].args[1:]) or [0])[0] != dim:
            return None
        parts = list(readers[0].users)
        if any(p.target is not operator.getitem for p in parts):
            return None
        return sorted(((p, p.args[1]) for p in parts), key=lambda pair: pair[1])
    if readers and all(r.target == aten.select.int and r.args[1] == dim for r in readers):
        return sorted(((r, r.args[2]) for r in readers), key=lambda pair: pair[1])
    return None


def _module_path(node: fx.Node) -> str | None:
    """The path of the innermost module that computed `node` (torch.export's module stack)."""
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else None


def _path_name(path: str) -> str:
    """A module path as a node name ("layer1.0.act" -> "layer1_0_act")."""
    name = re.sub(r"\W", "_", path)
    return f"_{name}" if name[:1].isdigit() else name


def _name_after_modules(gm: fx.GraphModule) -> None:
    """An op that is the only computing op of a leaf module (nn.ReLU, nn.GELU, nn.LayerNorm)
    takes that module's path as its name, as call_module nodes already do."""
    owners: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        path = _module_path(node)
        if node.op == "call_function" and aten_kind(node.target) is not None and path is not None:
            owners.setdefault(path, []).append(node)
    taken = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    for path, nodes in owners.items():
        leaf = not any(other.startswith(f"{path}.") for other in owners)
        name = _path_name(path)
        if path and leaf and len(nodes) == 1 and path not in taken and nodes[0].name != name:
            nodes[0]._rename(name)
