"""Which layer costs the accuracy: each Conv/Linear layer switched on alone (its weight
quantizer and the quantizers on its inputs), and kept float alone, in the calibrated fake-quant
model, scored against the float model's outputs on the same inputs.

The fake-quant model computes what each engine computes (deploy.frontend.arithmetic), so this ranks
layers without building an engine per choice. "Kept float" emulates prepare(keep_float=...)
without recalibrating: the layer's weight quantizer and the input quantizers only it reads are
off, and where it shares a quantized input with other layers (one quantizer per value, e.g. the
Q/K/V projections of one attention block) it alone reads that input unquantized. Switching the
shared quantizer off instead would also free the other layers' inputs: on the trained digits
ResNet with TensorRT rules that missed layer1.conv1's real keep-float model by 1.07 dB and
ranked the layers at 0.74 rank correlation with those models (now 0.03 dB and 1.0; see
tests/verify/test_sensitivity.py). The ranking is a guide; a --keep-float build measures the
real engine."""

from __future__ import annotations

from collections.abc import Iterator, Sequence, Set
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from qat_deploy.deploy.common.errors import BadInputError, CheckFailedError
from qat_deploy.deploy.frontend.plan import QuantizerSite
from qat_deploy.deploy.frontend.prepare import PreparedModel
from qat_deploy.deploy.quant.fake_quant import FakeQuantize, fake_quant_only
from qat_deploy.deploy.training.calibrate import call_model, first_tensor
from qat_deploy.deploy.verify import closeness


@dataclass(frozen=True)
class LayerSensitivity:
    layer: str  # module path, what --keep-float takes
    alone_quantized_sqnr_db: float  # only this group quantized: the error it brings in
    alone_float_sqnr_db: float  # every layer but this one quantized (--keep-float this layer)
    quantizers: int  # size of the group


@dataclass(frozen=True)
class Sensitivity:
    all_quantized_sqnr_db: float
    layers: list[LayerSensitivity]  # the layer whose keeping float helps most first

    def to_dict(self) -> dict:
        return {
            "metric": "output SQNR vs the float model, dB (higher is closer)",
            "all_quantized_sqnr_db": self.all_quantized_sqnr_db,
            "layers": [vars(layer) for layer in self.layers],
        }


def layer_groups(prepared: PreparedModel) -> dict[str, list[FakeQuantize]]:
    """Module path of each quantized Conv/Linear layer -> its weight quantizer and the
    activation quantizers on its inputs."""
    modules = dict(prepared.named_modules())
    groups: dict[str, list[FakeQuantize]] = {}
    for site in prepared.plan.sites:
        if site.role != "weight":
            continue
        inputs = [s.module for s in _activation_sites(prepared) if site.producer in _readers(s)]
        groups[_layer_path(site)] = [modules[name] for name in (site.module, *inputs)]
    return groups


def _activation_sites(prepared: PreparedModel) -> list[QuantizerSite]:
    return [s for s in prepared.plan.sites if s.role == "activation"]


def _readers(site: QuantizerSite) -> frozenset[str]:
    """Graph node names that read the value a quantizer quantizes."""
    return frozenset(consumer for _, consumer in site.edges)


def _layer_path(weight_site: QuantizerSite) -> str:
    return weight_site.module.removeprefix("model.").removesuffix(".weight_quant")


def sqnr_db(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    """deploy.verify.closeness.sqnr_db of two tensors."""
    return closeness.sqnr_db(reference.double().numpy(), approximation.double().numpy())


class _Probe:
    """The calibrated prepared model run with chosen quantizers on, or chosen layers kept
    float, beside the float model's outputs on the same batches (computed once)."""

    def __init__(self, prepared: PreparedModel, float_model: nn.Module, batches: Sequence):
        if not batches:
            raise BadInputError("sensitivity analysis needs at least one batch of inputs")
        self.groups = layer_groups(prepared)
        if not self.groups:
            raise BadInputError("the prepared model has no quantized Conv/Linear layer to rank")
        self.prepared, self.batches = prepared, batches
        self.quantizers = prepared.quantizers()
        self.everything = frozenset(id(fq) for fq in self.quantizers)
        modules = dict(prepared.named_modules())
        weights = [s for s in prepared.plan.sites if s.role == "weight"]
        self.node = {_layer_path(s): s.producer for s in weights}
        self.layer = {
            _layer_path(s): modules[s.module.removesuffix(".weight_quant")] for s in weights
        }
        self.inputs = [(modules[s.module], _readers(s)) for s in _activation_sites(prepared)]
        # output quantizers that only clamp because the int8 Conv before them fuses the Add
        # after them (deploy.frontend.arithmetic); after a float Conv they round again
        self.clamps = {
            s.producer: modules[s.module]
            for s in _activation_sites(prepared)
            if not modules[s.module].rounding
        }
        self.reference = _outputs(float_model, batches)
        self.all_quantized = self.outputs(self.everything)

    def outputs(self, enabled: Set[int]) -> torch.Tensor:
        with fake_quant_only(self.quantizers, enabled):
            return _outputs(self.prepared, self.batches)

    def members(self, layer: str) -> frozenset[int]:
        return frozenset(id(fq) for fq in self.groups[layer])

    def kept_float_outputs(self, layers: Set[str]) -> torch.Tensor:
        """The outputs with `layers` float as prepare(keep_float=layers) would leave them, on
        this calibration (see the module docstring)."""
        nodes = {self.node[layer] for layer in layers}
        off = {id(self.layer[layer].weight_quant) for layer in layers}
        shared = []
        for fq, readers in self.inputs:
            if readers <= nodes:
                off.add(id(fq))
            elif readers & nodes:
                shared.append(fq)
        rounding = [self.clamps[n] for n in nodes if n in self.clamps]
        with (
            _reading_unquantized(self.prepared, shared, [self.layer[path] for path in layers]),
            _rounding(rounding),
        ):
            return self.outputs(self.everything - off)


@contextmanager
def _rounding(quantizers: Sequence[FakeQuantize]) -> Iterator[None]:
    try:
        for fq in quantizers:
            fq.rounding = True
        yield
    finally:
        for fq in quantizers:
            fq.rounding = False


@contextmanager
def _reading_unquantized(
    model: nn.Module, quantizers: Sequence[FakeQuantize], layers: Sequence[nn.Module]
) -> Iterator[None]:
    """For the block, `layers` read the input of any of `quantizers` instead of its output,
    where they read that output directly (not through a reshape in between)."""
    if not quantizers:
        yield
        return
    float_of: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(output) -> (output, input)

    def remember(_module, args, output):
        float_of[id(output)] = (output, args[0])

    def swap(_module, args):
        return tuple(float_of[id(a)][1] if id(a) in float_of else a for a in args)

    handles = [model.register_forward_pre_hook(lambda *_: float_of.clear())]
    handles += [fq.register_forward_hook(remember) for fq in quantizers]
    handles += [layer.register_forward_pre_hook(swap) for layer in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        float_of.clear()


def _outputs(model: nn.Module, batches: Sequence) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([first_tensor(call_model(model, b)) for b in batches])


def analyse(prepared: PreparedModel, float_model: nn.Module, batches: Sequence) -> Sensitivity:
    """Rank the layers of a calibrated prepared model on `batches` (as calibrate takes them)."""
    return _analyse(_Probe(prepared, float_model, batches))


def _analyse(probe: _Probe) -> Sensitivity:
    def score(outputs: torch.Tensor) -> float:
        return sqnr_db(probe.reference, outputs)

    layers = [
        LayerSensitivity(
            path,
            score(probe.outputs(probe.members(path))),
            score(probe.kept_float_outputs({path})),
            len(group),
        )
        for path, group in probe.groups.items()
    ]
    layers.sort(key=_gain)
    return Sensitivity(score(probe.all_quantized), layers)


@dataclass(frozen=True)
class BudgetChoice:
    """The layers --accuracy-budget keeps float, and what the fake-quant model reaches."""

    min_cosine: float
    cosine_all_quantized: float
    cosine: float  # with `layers` float
    layers: list[str]  # in the order they were chosen

    def to_dict(self) -> dict:
        return {
            "metric": "mean per-sample cosine of the fake-quant output vs fp32, calibration data",
            "min_cosine": self.min_cosine,
            "cosine_all_quantized": self.cosine_all_quantized,
            "cosine": self.cosine,
            "kept_float": self.layers,
        }


def choose_keep_float(
    prepared: PreparedModel, float_model: nn.Module, batches: Sequence, min_cosine: float
) -> BudgetChoice:
    """The fewest layers to keep float, greedily by the kept-float score analyse ranks by
    (the layer whose keeping float helps most first), until the fake-quant output with them
    kept float reaches `min_cosine` against fp32. A model that already meets it costs one
    pass, not a ranking; the quantized-alone scores, which the greedy order does not use, are
    not computed (on MiniLM they are half of a ranking's passes)."""
    probe = _Probe(prepared, float_model, batches)
    reference = probe.reference.double().numpy()

    def cosine(outputs: torch.Tensor) -> float:
        return closeness.mean_cosine(reference, outputs.double().numpy())

    start = current = cosine(probe.all_quantized)
    chosen: list[str] = []
    ranked: list[str] = []
    if current < min_cosine:
        kept_alone = {
            path: sqnr_db(probe.reference, probe.kept_float_outputs({path}))
            for path in probe.groups
        }
        ranked = sorted(kept_alone, key=lambda path: (-kept_alone[path], path))
    for layer in ranked:
        if current >= min_cosine:
            break
        chosen.append(layer)
        current = cosine(probe.kept_float_outputs(set(chosen)))
    if chosen and len(chosen) == len(ranked) and current >= min_cosine:
        raise CheckFailedError(
            f"accuracy budget cosine {min_cosine} needs every Conv/Linear layer float "
            f"(all int8: {start:.5f}): nothing would run int8; lower the budget"
        )
    if current < min_cosine:
        raise CheckFailedError(
            f"accuracy budget cosine {min_cosine} not reached: with every Conv/Linear layer "
            f"float the fake-quant model reaches {current:.5f} (the other ops' quantizers); "
            "lower the budget or try another --calibration"
        )
    return BudgetChoice(min_cosine, start, current, chosen)


def _gain(layer: LayerSensitivity) -> tuple[float, float, str]:
    """Most helpful to keep float first; among equals, the one that alone brings in most."""
    return (-layer.alone_float_sqnr_db, layer.alone_quantized_sqnr_db, layer.layer)
