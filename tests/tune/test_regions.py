"""The tuner's graph rewrite: a region made float in ONNX is what prepare(keep_float=...)
exports for that layer (prepare's placement is the independent reference), and lint accepts it."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from qat_deploy.deploy.export.qdq import export
from qat_deploy.deploy.frontend.prepare import prepare
from qat_deploy.deploy.lint import float_by_rule, lint
from qat_deploy.deploy.rules.backend import available_targets, get_rules
from qat_deploy.deploy.training.calibrate import calibrate
from qat_deploy.deploy.tune.regions import drop_unneeded_quantizers, regions, with_float
from tests.frontend.blocks import BasicBlock, ConcatBlock, InvertedResidual, randomize_bn

TARGETS = available_targets()
IMG = torch.randn(2, 8, 8, 8, generator=torch.Generator().manual_seed(0))


class HardSwishBlock(nn.Module):
    """MobileNetV3's pattern: Conv -> HardSwish -> depthwise Conv -> HardSwish -> Conv."""

    def __init__(self, c=8, residual=True):
        super().__init__()
        self.residual = residual
        self.expand = nn.Conv2d(c, 2 * c, 1)
        self.depthwise = nn.Conv2d(2 * c, 2 * c, 3, padding=1, groups=2 * c)
        self.project = nn.Conv2d(2 * c, c, 1)
        self.act = nn.Hardswish()

    def forward(self, x):
        out = self.project(self.act(self.depthwise(self.act(self.expand(x)))))
        return out + x if self.residual else out


class SqueezeExciteBlock(nn.Module):
    """MobileNetV3's block with its squeeze-excite: a global average pool, two 1x1 Convs and a
    HardSigmoid gating a Mul, inside a residual Add."""

    def __init__(self, c=8):
        super().__init__()
        self.expand = nn.Conv2d(c, 2 * c, 1)
        self.depthwise = nn.Conv2d(2 * c, 2 * c, 3, padding=1, groups=2 * c)
        self.fc1 = nn.Conv2d(2 * c, c, 1)
        self.fc2 = nn.Conv2d(c, 2 * c, 1)
        self.project = nn.Conv2d(2 * c, c, 1)
        self.act = nn.Hardswish()

    def forward(self, x):
        y = self.act(self.depthwise(self.act(self.expand(x))))
        gate = nn.functional.hardsigmoid(self.fc2(torch.relu(self.fc1(y.mean((2, 3), True)))))
        return self.project(y * gate) + x


class TokenMLP(nn.Module):
    """A transformer's MLP on (batch, tokens, channels): its Linears export as a MatMul reading
    Transpose(DQ(W)), the form every Linear of a transformer takes."""

    def __init__(self, c=16):
        super().__init__()
        self.fc1 = nn.Linear(c, 2 * c)
        self.fc2 = nn.Linear(2 * c, c)

    def forward(self, x):
        return self.fc2(nn.functional.gelu(self.fc1(x))) + x


class ShuffleChain(nn.Module):
    """ShuffleNetV2's units in a row between two 1x1 Convs: chunk, a Conv branch, concat,
    channel shuffle (reshape, transpose, reshape); then a 1x1 head. Each concat reaches the
    next one only through pass-through ops, so whether one may go float depends on the
    other."""

    def __init__(self, c=8, units=3):
        super().__init__()
        self.stem = nn.Conv2d(c, c, 1)
        self.branches = nn.ModuleList(nn.Conv2d(c // 2, c // 2, 3, padding=1) for _ in range(units))
        self.tail = nn.Conv2d(c, c, 1)
        self.head = nn.Conv2d(c, c, 1)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        for branch in self.branches:
            kept, passed = x.chunk(2, dim=1)
            x = torch.cat([kept, torch.relu(branch(passed))], dim=1)
            n, c, h, w = x.shape
            x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.head(torch.relu(self.tail(x)))


class ComputedPositionConv(nn.Module):
    """timm EdgeNeXt's position encoding: a Conv over a tensor the forward computes from
    constants (no input reaches it), added to the features."""

    def __init__(self, c=8):
        super().__init__()
        self.pos = nn.Conv2d(4, c, 1)
        self.conv = nn.Conv2d(c, c, 1)

    def forward(self, x):
        n, _, h, w = x.shape
        grid = torch.ones(1, 4, h, w).cumsum(-1) / w
        return self.conv(x + self.pos(grid))


TOKENS = torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(0))

BLOCKS = {
    "basic": lambda: randomize_bn(BasicBlock()),
    "inverted": lambda: randomize_bn(InvertedResidual()),
    "concat": lambda: randomize_bn(ConcatBlock()),
    "hardswish": HardSwishBlock,
}


def exported(model, target, tmp_path, name, keep_float=(), example=IMG):
    torch.manual_seed(0)
    prepared = prepare(model, target, example, reduce_range=False, keep_float=keep_float)
    calibrate(prepared, [example], progress=False)
    return onnx.load(export(prepared, tmp_path / f"{name}.onnx", example))


def shape_of(model: onnx.ModelProto, target: str) -> tuple:
    """Op counts and the nodes float on purpose: what the placement consists of."""
    ops = collections.Counter(n.op_type for n in model.graph.node)
    return sorted(ops.items()), sorted(float_by_rule(model, target))


#: every target on the residual block (where the rules differ most), and onnxruntime's
#: QLinearConv output quantizers in front of float HardSwish (the other blocks run through the
#: cleanup test below; each layer here costs a prepare and an export, and CI on an AVX2-only
#: EPYC took 29.6 of its 30 minutes)
REWRITTEN = [*(("basic", t) for t in TARGETS), ("hardswish", "onnxruntime")]


@pytest.mark.parametrize(("block", "target"), REWRITTEN)
def test_a_region_made_float_is_what_keep_float_exports(block, target, tmp_path):
    model = BLOCKS[block]().eval()
    untuned = exported(model, target, tmp_path, "untuned")
    rules = get_rules(target)
    names = [r.layer for r in regions(untuned, rules)]
    assert names, "every block has quantized weighted layers"
    for layer in names:
        rewritten = with_float(untuned, [layer], rules)
        reference = exported(model, target, tmp_path, layer, keep_float=[layer])
        assert shape_of(rewritten, target) == shape_of(reference, target), layer
        path = tmp_path / f"rewritten-{layer}.onnx"
        onnx.save(rewritten, path)
        assert lint(path, target) == [], layer
        assert layer not in [r.layer for r in regions(rewritten, rules)]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("block", BLOCKS)
def test_prepare_places_no_quantizer_the_cleanup_would_remove(block, target, tmp_path):
    untuned = exported(BLOCKS[block]().eval(), target, tmp_path, "untuned")
    assert drop_unneeded_quantizers(untuned, get_rules(target)) == 0


def _through_qdq(name: str, producers: dict) -> str | None:
    """The op type that computed a tensor, looking through Q and DQ."""
    node = producers.get(name)
    while node is not None and node.op_type in ("QuantizeLinear", "DequantizeLinear"):
        node = producers.get(node.input[0])
    return None if node is None else node.op_type


@pytest.mark.parametrize("target", TARGETS)
def test_ops_between_float_regions_go_float_with_them_as_prepare_places_them(target, tmp_path):
    """Everything after `expand` float: the pool, the gate Mul and the residual Add read and
    feed only float layers (or the graph's input and output), so no Q/DQ pair is left for
    them, in the rewrite as in prepare(keep_float=...). The Add may read the input's DQ, which
    stays for the int8 `expand`."""
    model = SqueezeExciteBlock().eval()
    untuned = exported(model, target, tmp_path, "untuned")
    rules = get_rules(target)
    floated = [r.layer for r in regions(untuned, rules) if r.layer != "expand"]
    assert floated == ["depthwise", "fc1", "fc2", "project"]
    rewritten = with_float(untuned, floated, rules)
    reference = exported(model, target, tmp_path, "kept", keep_float=floated)
    assert shape_of(rewritten, target) == shape_of(reference, target)
    assert lint(rewritten, target) == []
    producers = {o: n for n in rewritten.graph.node for o in n.output}
    readers = collections.defaultdict(set)
    for node in rewritten.graph.node:
        for name in node.input:
            readers[name].add(node.op_type)
    for node in rewritten.graph.node:
        if node.op_type in ("ReduceMean", "GlobalAveragePool", "Mul", "Add"):
            fed = [producers[i] for i in node.input if i in producers]
            if target == "onnxruntime" and "HardSigmoid" in {
                _through_qdq(i, producers) for i in node.input
            }:
                # expand's own HardSwish, x * HardSigmoid(x) on onnxruntime: it reads the int8
                # expand's quantized output, as the float HardSwish did before
                continue
            dequantized = [p.output[0] for p in fed if p.op_type == "DequantizeLinear"]
            assert all("Conv" in readers[d] for d in dequantized), node.name


@pytest.mark.parametrize("target", TARGETS)
def test_a_chain_of_concats_between_float_layers_goes_float_whole(target, tmp_path):
    """Every layer but the head float: no concat, reshape, transpose or split between them
    keeps a Q/DQ pair (the concats wait on each other; before, none of them went float), in
    the rewrite as in prepare(keep_float=...); the only activation quantizers left are the
    head's. (A concat that fed the int8 head through the shuffle would stay int8, and with it
    every concat before it: the rules quantize a concat unless all its neighbours are
    float.)"""
    model = ShuffleChain().eval()
    untuned = exported(model, target, tmp_path, "untuned")
    rules = get_rules(target)
    floated = [r.layer for r in regions(untuned, rules) if r.layer != "head"]
    assert len(floated) == 5
    rewritten = with_float(untuned, floated, rules)
    reference = exported(model, target, tmp_path, "kept", keep_float=floated)
    assert shape_of(rewritten, target) == shape_of(reference, target)
    assert lint(rewritten, target) == []
    constants = {i.name for i in rewritten.graph.initializer}
    producers = {o: n for n in rewritten.graph.node for o in n.output}
    readers = collections.defaultdict(list)
    for node in rewritten.graph.node:
        for name in node.input:
            readers[name].append(node)
    for q in rewritten.graph.node:
        if q.op_type != "QuantizeLinear" or q.input[0] in constants:
            continue
        source = producers.get(q.input[0])
        after = [r for dq in readers[q.output[0]] for r in readers[dq.output[0]]]
        head_input = {r.op_type for r in after} == {"Conv"}
        head_output = source is not None and source.op_type == "Conv"
        assert head_input or head_output, (source and source.op_type, [r.op_type for r in after])


@pytest.mark.parametrize("target", TARGETS)
def test_a_layer_on_computed_constants_goes_float_as_keep_float_makes_it(target, tmp_path):
    """Its input's codes are computed by the graph, not stored: the rewrite crashed reading
    them as a weight ("'NoneType' object has no attribute 'astype'", EdgeNeXt on
    onnxruntime, --tune-latency)."""
    untuned = exported(ComputedPositionConv().eval(), target, tmp_path, "untuned")
    rules = get_rules(target)
    if "fold_quantized_constants" in rules.export_passes:
        # the export folds the whole quantized branch to its value: no layer left to float
        assert [r.layer for r in regions(untuned, rules)] == ["conv"]
        assert sum(n.op_type == "Conv" for n in untuned.graph.node) == 1
        return
    # the exporter folds this small grid to stored codes; EdgeNeXt's stay computed: an
    # Identity makes them so here
    graph = untuned.graph
    producers = {o: n for n in graph.node for o in n.output}
    conv = next(n for n in graph.node if n.op_type == "Conv")  # pos: the first
    codes = producers[conv.input[0]].input[0]
    assert codes in {i.name for i in graph.initializer}
    graph.node.insert(0, onnx.helper.make_node("Identity", [codes], [f"{codes}_computed"]))
    producers[conv.input[0]].input[0] = f"{codes}_computed"
    assert {"pos", "conv"} <= {r.layer for r in regions(untuned, rules)}
    rewritten = with_float(untuned, ["pos"], rules)
    assert lint(rewritten, target) == []
    assert "pos" not in [r.layer for r in regions(rewritten, rules)]


@pytest.mark.parametrize("target", TARGETS)
def test_linears_on_token_inputs_are_regions_as_keep_float_makes_them(target, tmp_path):
    model = TokenMLP().eval()
    untuned = exported(model, target, tmp_path, "untuned", example=TOKENS)
    rules = get_rules(target)
    names = [r.layer for r in regions(untuned, rules)]
    assert names == ["fc1", "fc2"]
    for layer in names:
        rewritten = with_float(untuned, [layer], rules)
        reference = exported(model, target, tmp_path, layer, keep_float=[layer], example=TOKENS)
        (ops, floats), (reference_ops, reference_floats) = (
            shape_of(m, target) for m in (rewritten, reference)
        )
        # the two exports number their nodes differently: compare how many are float
        assert (ops, len(floats)) == (reference_ops, len(reference_floats)), layer
        assert lint(rewritten, target) == [], layer


def test_float_token_linears_compute_what_the_transposed_int8_weights_say(tmp_path):
    untuned = exported(TokenMLP().eval(), "onnxruntime", tmp_path, "untuned", example=TOKENS)
    rewritten = with_float(untuned, ["fc1", "fc2"], get_rules("onnxruntime"))
    assert not any(n.op_type == "DequantizeLinear" for n in rewritten.graph.node)
    feed = {untuned.graph.input[0].name: TOKENS.numpy()}

    def run(m):
        # unoptimized: onnxruntime's fusions of the DQ(W) -> MatMul reference change its
        # arithmetic, and this compares the weights, not the kernels
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(m.SerializeToString(), options, ["CPUExecutionProvider"])
        return session.run(None, feed)[0]

    weights_only = _weights_dequantized_by_ort(untuned)
    np.testing.assert_allclose(run(rewritten), run(weights_only), rtol=1e-5, atol=1e-5)


def test_float_regions_compute_what_the_int8_weights_say(tmp_path):
    """Weights become the dequantized int8 values: with every region float no activation
    quantizer is left (onnxruntime quantizes none of HardSwish's inputs), and the graph
    computes what the int8 weights dequantized by onnxruntime itself compute."""
    model = HardSwishBlock(residual=False).eval()
    untuned = exported(model, "onnxruntime", tmp_path, "untuned")
    rules = get_rules("onnxruntime")
    names = [r.layer for r in regions(untuned, rules)]
    rewritten = with_float(untuned, names, rules)
    kinds = collections.Counter(n.op_type for n in rewritten.graph.node)
    assert kinds["QuantizeLinear"] == 0 and kinds["DequantizeLinear"] == 0
    feed = {untuned.graph.input[0].name: IMG.numpy()}

    def run(m):
        session = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run(None, feed)[0]

    assert run(rewritten).shape == run(untuned).shape
    weights_only = _weights_dequantized_by_ort(untuned)
    np.testing.assert_allclose(run(rewritten), run(weights_only), rtol=1e-5, atol=1e-5)


def _weights_dequantized_by_ort(model: onnx.ModelProto) -> onnx.ModelProto:
    """The untuned graph with every activation Q -> DQ pair bypassed: its weights still go
    through onnxruntime's own DequantizeLinear."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    producers = {o: n for n in out.graph.node for o in n.output}
    for node in out.graph.node:
        for i, name in enumerate(node.input):
            dq = producers.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = producers.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                node.input[i] = q.input[0]
    return out


def test_unknown_layer_is_refused(tmp_path):
    untuned = exported(HardSwishBlock().eval(), "openvino", tmp_path, "untuned")
    with pytest.raises(ValueError, match="no quantized weighted layer nope"):
        with_float(untuned, ["nope"], get_rules("openvino"))
