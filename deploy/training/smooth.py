"""SmoothQuant (Xiao et al. 2023, arXiv:2211.10438): move activation outliers into weights.

A transformer's Linear inputs (LayerNorm and GELU outputs) carry a few channels a hundred times
larger than the rest; one per-tensor int8 scale then leaves the other channels a few codes
(`deploy build --debug-layers` shows those quantizers entering 12-15 dB on all-MiniLM-L6-v2).
For an activation quantizer read only by Linear layers, per input channel j
    s_j = max|x_j|^alpha / max|W[:, j]|^(1 - alpha)
divides the activation before quantizing and multiplies every reader's weight column: the float
function is unchanged, the activation flatter, the weight (quantized per output channel) a
little less so. The strength is chosen for the whole model on the calibration data
(choose_alpha, deploy.training.choice): the candidate, or none, whose fake-quant output is
closest to float on calibration samples the candidate was not fitted to. Judged layer by
layer instead, smoothing looked better on every Linear of random-weight LeViT and made
its output worse (cosine 0.994 -> 0.974, one quantizer alone 0.977): a layer's own error is
not what reaches the output. The division is a constant per-channel Mul before the quantizer
in the exported graph (NNCF's OpenVINO graphs carry the same), which a runtime folds into its
quantization step.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import fx, nn

from qat_deploy.deploy.frontend.quant_modules import QuantLinear
from qat_deploy.deploy.quant.fake_quant import SMOOTH_ATTRIBUTE, FakeQuantize, fake_quant_only
from qat_deploy.deploy.training.calibrate import call_model
from qat_deploy.deploy.training.choice import choose

#: floor of the activation / weight channel maxima: a channel that is all zero keeps s = 1-ish
_FLOOR = 1e-5


class SmoothScale(nn.Module):
    """x times a constant per-channel factor (last axis)."""

    def __init__(self, factor: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("factor", factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


def linear_only_quantizers(model: fx.GraphModule) -> dict[str, list[QuantLinear]]:
    """Activation quantizers (by module path) whose every call site feeds only QuantLinear
    layers as their input, with those layers."""
    readers: dict[str, list[fx.Node | None]] = {}
    for node in model.graph.nodes:
        if node.op == "call_module" and isinstance(model.get_submodule(node.target), FakeQuantize):
            readers.setdefault(node.target, []).extend(
                user if user.args and user.args[0] is node else None for user in node.users
            )
    found = {}
    for path, users in readers.items():
        layers = [
            model.get_submodule(u.target) if u is not None and u.op == "call_module" else None
            for u in users
        ]
        if layers and all(isinstance(layer, QuantLinear) for layer in layers):
            found[path] = layers
    return found


@torch.no_grad()
def smooth_linear_inputs(prepared: nn.Module, batches: Iterable, alpha: float) -> list[str]:
    """Smooth every quantizer linear_only_quantizers finds with strength `alpha`, from float
    activation maxima over `batches`; returns their module paths. Every quantizer's observer
    is reset (the ranges are stale): calibrate again."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"SmoothQuant alpha {alpha} is outside [0, 1]")
    graph_module = prepared.model
    targets = linear_only_quantizers(graph_module)
    maxima = _float_input_maxima(prepared, targets, batches)
    for path, activation_max in maxima.items():
        layers = targets[path]
        weight_max = torch.stack([layer.linear.weight.abs().amax(0) for layer in layers]).amax(0)
        scale = activation_max.clamp_min(_FLOOR) ** alpha / weight_max.clamp_min(_FLOOR) ** (
            1.0 - alpha
        )
        scale = scale.clamp_min(_FLOOR)
        setattr(graph_module.get_submodule(path), SMOOTH_ATTRIBUTE, SmoothScale(1.0 / scale))
        for layer in layers:
            layer.linear.weight.mul_(scale)
    for quantizer in prepared.quantizers():
        quantizer.reset_observer()
    return list(maxima)


def choose_alpha(
    prepared: nn.Module, model: nn.Module, batches: list, alphas: Sequence[float]
) -> tuple[float | None, dict[str, float]]:
    """The candidate strength (None: no smoothing) whose fake-quant output comes closest to
    `model`'s (mean cosine on held-out calibration samples, deploy.training.choice), with
    every candidate's score; a strength must beat no smoothing clearly."""

    def unsmoothed(trial, fit) -> None:
        for quantizer in trial.quantizers():
            quantizer.reset_observer()

    def smoothed(alpha: float):
        return lambda trial, fit: smooth_linear_inputs(trial, fit, alpha)

    candidates = {"none": unsmoothed, **{str(alpha): smoothed(alpha) for alpha in alphas}}
    best, scores = choose(prepared, model, batches, candidates)
    return (None if best == "none" else float(best)), scores


def _float_input_maxima(prepared, targets, batches) -> dict[str, torch.Tensor]:
    """max |x| per last-axis channel at each target quantizer's input, every quantizer off."""
    maxima: dict[str, torch.Tensor] = {}

    def record(path):
        def hook(module, args):
            channel_max = args[0].detach().abs().flatten(0, -2).amax(0).float()
            known = maxima.get(path)
            maxima[path] = channel_max if known is None else torch.maximum(known, channel_max)

        return hook

    hooks = [
        prepared.model.get_submodule(path).register_forward_pre_hook(record(path))
        for path in targets
    ]
    try:
        with fake_quant_only(prepared.quantizers()):
            prepared.eval()
            for batch in batches:
                call_model(prepared, batch)
    finally:
        for hook in hooks:
            hook.remove()
    return maxima
