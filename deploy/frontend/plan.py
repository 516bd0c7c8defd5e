"""The quantization plan: every quantizer prepare() placed, where, and with which scheme.

Kept as plain data beside the prepared model so users (and tests) can read exactly what the
backend rules produced, and print it as a table with the ranges calibration found.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rich.table import Table
from torch import nn

from qat_deploy.deploy.quant.fake_quant import FakeQuantize
from qat_deploy.deploy.quant.spec import QuantSpec


@dataclass(frozen=True)
class QuantizerSite:
    """One FakeQuantize module: `edges` are (producer, consumer) graph node names it sits on;
    weight quantizers name their layer in `producer` and have no edges."""

    module: str
    role: str  # "activation" or "weight"
    spec: QuantSpec
    producer: str
    edges: tuple[tuple[str, str], ...] = ()


@dataclass
class QuantPlan:
    target: str
    mode: str  # "cnn" or "transformer"
    sites: list[QuantizerSite] = field(default_factory=list)
    fused: list[tuple[str, ...]] = field(default_factory=list)
    float_ops: list[str] = field(default_factory=list)
    #: module paths of the Conv/Linear layers prepare(keep_float=...) left float
    kept_float: list[str] = field(default_factory=list)
    #: module paths of the Convs the target's rules keep float (BackendRules.float_conv_groups)
    float_by_rule: list[str] = field(default_factory=list)
    #: what deploy.recipe's accuracy budget chose (deploy.verify.sensitivity.BudgetChoice.to_dict)
    accuracy_budget: dict | None = None
    #: activation observer deploy.recipe calibrated with: {"observer", "auto"}, "auto" the
    #: choice's held-out cosine per candidate ({"observer", "cosine"}) or None when named
    calibration: dict | None = None
    #: SmoothQuant chosen by deploy.recipe: {"alpha", "cosine", "quantizers"}
    smooth_quant: dict | None = None
    #: QAT run by deploy.recipe: {"epochs", "loss", "loss_per_epoch"}
    qat: dict | None = None
    #: the latency tuner's search (deploy.tune.search.TuneResult.to_dict)
    latency_tuning: dict | None = None
    input_shapes: list[tuple[int, ...]] = field(default_factory=list)
    #: the captured graph's inputs, in the order of input_shapes (forward() parameter names)
    input_names: list[str] = field(default_factory=list)

    @property
    def activation_edges(self) -> set[tuple[str, str]]:
        return {e for s in self.sites if s.role == "activation" for e in s.edges}

    @property
    def weight_layers(self) -> set[str]:
        return {s.producer for s in self.sites if s.role == "weight"}

    def site_for_edge(self, producer: str, consumer: str) -> QuantizerSite:
        for s in self.sites:
            if (producer, consumer) in s.edges:
                return s
        raise KeyError(f"no quantizer on edge {producer} -> {consumer}")

    def table(self, model: nn.Module) -> Table:
        """Rich table of every quantizer with its current scale range."""
        title = f"quantizers for target {self.target} ({self.mode} mode)"
        table = Table(title=title)
        for col in ("quantizer", "where", "scheme", "bits", "scale min", "scale max", "zp"):
            table.add_column(col)
        modules = dict(model.named_modules())
        for site in self.sites:
            fq = modules.get(site.module)
            where = (
                ", ".join(f"{p}->{c}" for p, c in site.edges)
                if site.edges
                else f"{site.producer}.weight"
            )
            if isinstance(fq, FakeQuantize) and fq.observer.has_data:
                scale, zp = fq.effective_qparams()
                lo, hi = f"{scale.min().item():.3g}", f"{scale.max().item():.3g}"
                zmin, zmax = int(zp.min()), int(zp.max())
                zps = str(zmin) if zmin == zmax else f"{zmin}..{zmax}"
            else:
                lo = hi = zps = "uncalibrated"
            scheme = site.spec.describe()
            if isinstance(fq, FakeQuantize) and not fq.rounding:
                scheme += " (clamp only: the engine rounds after the fused Add)"
            table.add_row(site.module, where, scheme, str(site.spec.bits), lo, hi, zps)
        return table
