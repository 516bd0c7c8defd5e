"""Which layer costs the accuracy: each Conv/Linear layer's quantizer group (its weight
quantizer and the quantizers on its inputs) switched on alone, and switched off alone, in the
calibrated fake-quant model, scored against the float model's outputs on the same inputs.

The fake-quant model computes what each engine computes (deploy.frontend.arithmetic), so this ranks
layers without building an engine per choice. A quantizer shared by several layers (one per
value, deploy.frontend.prepare) belongs to each of their groups: switching a group moves it for
all of them, as keeping the layer float with --keep-float would not; the ranking is a guide for
--keep-float, whose build then measures the real result.
"""

from __future__ import annotations

from collections.abc import Sequence, Set
from dataclasses import dataclass

import torch
from torch import nn

from qat_deploy.deploy.common.errors import BadInputError, CheckFailedError
from qat_deploy.deploy.frontend.prepare import PreparedModel
from qat_deploy.deploy.quant.fake_quant import FakeQuantize, fake_quant_only
from qat_deploy.deploy.training.calibrate import call_model, first_tensor
from qat_deploy.deploy.verify import closeness


@dataclass(frozen=True)
class LayerSensitivity:
    layer: str  # module path, what --keep-float takes
    alone_quantized_sqnr_db: float  # only this group quantized: the error it brings in
    alone_float_sqnr_db: float  # every group but this one quantized
    quantizers: int  # size of the group


@dataclass(frozen=True)
class Sensitivity:
    all_quantized_sqnr_db: float
    layers: list[LayerSensitivity]  # most damaging first

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
        inputs = [
            s.module
            for s in prepared.plan.sites
            if s.role == "activation" and any(c == site.producer for _, c in s.edges)
        ]
        path = site.module.removeprefix("model.").removesuffix(".weight_quant")
        groups[path] = [modules[name] for name in (site.module, *inputs)]
    return groups


def sqnr_db(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    """deploy.verify.closeness.sqnr_db of two tensors."""
    return closeness.sqnr_db(reference.double().numpy(), approximation.double().numpy())


class _Probe:
    """The calibrated prepared model run with chosen quantizers on, beside the float model's
    outputs on the same batches (computed once)."""

    def __init__(self, prepared: PreparedModel, float_model: nn.Module, batches: Sequence):
        if not batches:
            raise BadInputError("sensitivity analysis needs at least one batch of inputs")
        self.groups = layer_groups(prepared)
        if not self.groups:
            raise BadInputError("the prepared model has no quantized Conv/Linear layer to rank")
        self.prepared, self.batches = prepared, batches
        self.quantizers = prepared.quantizers()
        self.everything = frozenset(id(fq) for fq in self.quantizers)
        self.reference = _outputs(float_model, batches)
        self.all_quantized = self.outputs(self.everything)

    def outputs(self, enabled: Set[int]) -> torch.Tensor:
        with fake_quant_only(self.quantizers, enabled):
            return _outputs(self.prepared, self.batches)

    def members(self, layer: str) -> frozenset[int]:
        return frozenset(id(fq) for fq in self.groups[layer])


def _outputs(model: nn.Module, batches: Sequence) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([first_tensor(call_model(model, b)) for b in batches])


def analyse(prepared: PreparedModel, float_model: nn.Module, batches: Sequence) -> Sensitivity:
    """Rank the layers of a calibrated prepared model on `batches` (as calibrate takes them)."""
    return _analyse(_Probe(prepared, float_model, batches))


def _analyse(probe: _Probe) -> Sensitivity:
    def score(enabled: Set[int]) -> float:
        return sqnr_db(probe.reference, probe.outputs(enabled))

    layers = []
    for path, group in probe.groups.items():
        members = probe.members(path)
        layers.append(
            LayerSensitivity(path, score(members), score(probe.everything - members), len(group))
        )
    layers.sort(key=lambda s: (s.alone_quantized_sqnr_db, s.layer))
    return Sensitivity(sqnr_db(probe.reference, probe.all_quantized), layers)


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
    """The fewest layers to keep float, greedily: the layer whose quantizers off help the
    output most first (analyse's alone-float score), until the fake-quant output reaches
    `min_cosine` against fp32. Raises CheckFailedError when even every layer float does not."""
    probe = _Probe(prepared, float_model, batches)
    ranked = sorted(_analyse(probe).layers, key=_gain)

    reference = probe.reference.double().numpy()

    def cosine(outputs: torch.Tensor) -> float:
        return closeness.mean_cosine(reference, outputs.double().numpy())

    enabled = probe.everything
    start = current = cosine(probe.all_quantized)
    chosen: list[str] = []
    for layer in ranked:
        if current >= min_cosine:
            break
        enabled -= probe.members(layer.layer)
        chosen.append(layer.layer)
        current = cosine(probe.outputs(enabled))
    if current >= min_cosine and len(chosen) == len(ranked):
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


def _gain(layer: LayerSensitivity) -> tuple[float, str]:
    return (-layer.alone_float_sqnr_db, layer.layer)
