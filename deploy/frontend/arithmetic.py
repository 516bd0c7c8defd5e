"""Make the fake-quant model compute what the engine's int8 kernels compute.

Plain Q/DQ semantics leave two freedoms that engines use (BackendRules says which):
- int32 bias: the kernel adds round(b / (x_scale * w_scale)) to its int32 accumulator, not b.
- unrounded fused Add: a Conv whose residual Add is fused into it gets its output quantizer
  applied as a clamp only, rounding happening once, after the Add.
- scale-shift quantization: the engine rounds clamp(x) * k + b (float32 multiply-add) where
  ONNX rounds x / scale; at near-ties the codes differ.
Each is invisible on one layer (a rounding flip in ~0.1% of values) but compounds through deep
residual networks: on random MobileNetV2 it moved int8-vs-fake-quant cosine from 0.997 to
0.985. prepare() calls link() after placing quantizers; the effects are undone in export mode,
where the graph must state plain Q/DQ semantics and the engine applies its own arithmetic.
"""

from __future__ import annotations

from collections import Counter

from torch import fx

from qat_deploy.deploy.frontend.quant_modules import BIASED_KINDS
from qat_deploy.deploy.quant.fake_quant import FakeQuantize
from qat_deploy.deploy.rules.backend import BackendRules

_CONVS = ("conv", "conv_transpose")


def link(gm: fx.GraphModule, kinds, rules: BackendRules) -> None:
    """Wire the engine arithmetic `rules` declares into the prepared graph module."""
    modules = dict(gm.named_modules())
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    for node in gm.graph.nodes:
        kind = kinds.get(node)
        quantized_layer = hasattr(modules.get(node.target), "weight_quant")  # not kept float
        if kind in rules.int32_bias and kind in BIASED_KINDS and quantized_layer:
            source = _input_quantizer(node, modules)
            if source is not None and (kind != "linear" or _rank(node.args[0]) == 2):
                modules[node.target].round_bias_with(source)  # 2-D Linear exports as Gemm
        if kind == "add" and rules.unrounded_fused_add:
            operand = _fused_conv_operand(node, kinds, modules, calls)
            if operand is not None:
                operand.rounding = False
        quantizer = _quantizer(node, modules)
        if quantizer is not None and not quantizer.spec.per_channel:
            quantizer.scale_shift = rules.scale_shift_quantize


def _quantizer(node, modules) -> FakeQuantize | None:
    if isinstance(node, fx.Node) and node.op == "call_module":
        module = modules.get(node.target)
        if isinstance(module, FakeQuantize):
            return module
    return None


def _input_quantizer(node: fx.Node, modules) -> FakeQuantize | None:
    """The per-tensor quantizer on a weighted layer's data input, if it has one."""
    source = _quantizer(node.args[0] if node.args else None, modules)
    return source if source is not None and not source.spec.per_channel else None


def _rank(node) -> int | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return len(meta.shape) if meta is not None else None


def _fused_conv_operand(add: fx.Node, kinds, modules, calls: Counter) -> FakeQuantize | None:
    """The quantizer between an Add and the first operand the engine can fuse into it: a
    Conv whose output feeds only that quantizer, which feeds only this Add and quantizes
    nothing else (a quantizer shared with other values keeps rounding them), and which does
    not read the Add's other operand itself: OpenVINO does not fuse x + conv(x) (its sum
    fusion skips an operand that is the Conv's parent) and rounds it like plain Q/DQ."""
    for arg in add.args:
        quantizer = _quantizer(arg, modules)
        if quantizer is None or calls[arg.target] != 1:
            continue
        producer = arg.args[0]
        others = [a for a in add.args if a is not arg]
        if (
            kinds.get(producer) in _CONVS
            and hasattr(modules.get(producer.target), "weight_quant")  # an int8 Conv fuses it
            and len(producer.users) == 1
            and set(arg.users) == {add}
            and not any(other in producer.args[:1] for other in others)
        ):
            return quantizer
    return None
