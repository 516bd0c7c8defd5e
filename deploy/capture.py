"""Graph capture: trace a user's nn.Module with torch.fx and name what each node computes.

Op kinds are the shared vocabulary between the generic pass and the backends' rules. When the
tracer fails, we report which module it was tracing, so the user knows what to change.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from deploy.errors import one_line

_MODULE_KINDS: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.ConvTranspose1d, "conv_transpose"),
    (nn.ConvTranspose2d, "conv_transpose"),
    (nn.ConvTranspose3d, "conv_transpose"),
    (nn.Conv1d, "conv"),
    (nn.Conv2d, "conv"),
    (nn.Conv3d, "conv"),
    (nn.Linear, "linear"),
    (nn.BatchNorm1d, "bn"),
    (nn.BatchNorm2d, "bn"),
    (nn.BatchNorm3d, "bn"),
    (nn.ReLU, "relu"),
    (nn.ReLU6, "relu6"),
    (nn.MaxPool1d, "maxpool"),
    (nn.MaxPool2d, "maxpool"),
    (nn.AvgPool1d, "avgpool"),
    (nn.AvgPool2d, "avgpool"),
    (nn.AdaptiveAvgPool1d, "global_avgpool"),
    (nn.AdaptiveAvgPool2d, "global_avgpool"),
    (nn.Flatten, "reshape"),
    (nn.Dropout, "identity"),
    (nn.Identity, "identity"),
    (nn.LayerNorm, "layer_norm"),
    (nn.GELU, "gelu"),
    (nn.Softmax, "softmax"),
    (nn.Sigmoid, "sigmoid"),
    (nn.LeakyReLU, "leaky_relu"),
    (nn.Upsample, "interpolate"),
    (nn.Embedding, "embedding"),
    (nn.ZeroPad2d, "pad"),
)

_FUNCTION_KINDS = {
    operator.add: "add",
    torch.add: "add",
    operator.mul: "mul",
    torch.mul: "mul",
    operator.matmul: "matmul",
    torch.matmul: "matmul",
    torch.bmm: "matmul",
    torch.cat: "concat",
    torch.concat: "concat",
    torch.flatten: "reshape",
    torch.unflatten: "reshape",
    torch.reshape: "reshape",
    torch.squeeze: "reshape",
    torch.unsqueeze: "reshape",
    torch.transpose: "transpose",
    torch.permute: "transpose",
    torch.relu: "relu",
    F.relu: "relu",
    F.relu6: "relu6",
    F.gelu: "gelu",
    torch.softmax: "softmax",
    F.softmax: "softmax",
    torch.sigmoid: "sigmoid",
    F.layer_norm: "layer_norm",
    F.max_pool2d: "maxpool",
    F.avg_pool2d: "avgpool",
    F.adaptive_avg_pool2d: "global_avgpool",
    F.interpolate: "interpolate",
    F.pad: "pad",
    F.dropout: "identity",
    torch.mean: "reduce_mean",
    operator.getitem: "getitem",
}

_METHOD_KINDS = {
    "add": "add",
    "mul": "mul",
    "matmul": "matmul",
    "view": "reshape",
    "reshape": "reshape",
    "flatten": "reshape",
    "unflatten": "reshape",
    "squeeze": "reshape",
    "unsqueeze": "reshape",
    "contiguous": "identity",
    "transpose": "transpose",
    "permute": "transpose",
    "softmax": "softmax",
    "relu": "relu",
    "sigmoid": "sigmoid",
    "mean": "reduce_mean",
}


def module_kind(module: nn.Module) -> str | None:
    """The op kind of a module, or None when we do not recognise it."""
    for cls, kind in _MODULE_KINDS:
        if isinstance(module, cls):
            return kind
    return getattr(module, "op_kind", None)


def op_kind(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """The op kind of a graph node, or None for placeholders, outputs, attributes and ops we
    do not recognise (those stay float)."""
    if node.op == "call_module":
        return module_kind(modules[node.target])
    if node.op == "call_function":
        return _FUNCTION_KINDS.get(node.target)
    if node.op == "call_method":
        return _METHOD_KINDS.get(node.target)
    return None


@dataclass(frozen=True)
class TraceFailure:
    """Why symbolic tracing stopped, and in which module."""

    module: str
    reason: str

    def __str__(self) -> str:
        return f"torch.fx could not trace module '{self.module}': {self.reason}"


class _LocatingTracer(fx.Tracer):
    """An fx tracer that remembers which module it is inside, to name the culprit on failure."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.culprit: str | None = None

    def call_module(self, m, forward, args, kwargs):
        self.stack.append(self.path_of_module(m) or type(m).__name__)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            self.culprit = self.culprit or self.stack[-1]  # innermost module wins
            raise
        finally:
            self.stack.pop()


def trace(model: nn.Module) -> fx.GraphModule | TraceFailure:
    """Symbolically trace `model`; on failure say which module stopped the tracer."""
    tracer = _LocatingTracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # fx raises many types (TraceError, TypeError, ...)
        where = tracer.culprit or f"{type(model).__name__} (top level forward)"
        return TraceFailure(module=where, reason=one_line(exc))
    return fx.GraphModule(tracer.root, graph, type(model).__name__)
