"""Observers that keep a histogram and clip outliers: percentile and MSE-optimal range.

One histogram per channel (a single one per tensor), re-binned when the observed range grows,
so any number of calibration batches fits in fixed memory.
"""

from __future__ import annotations

import torch

from qat_deploy.deploy.errors import BadInputError
from qat_deploy.deploy.quant.observers import MIN_SCALE, Observer, qparams_from_range
from qat_deploy.deploy.quant.spec import QuantSpec
from qat_deploy.deploy.quant.sync import reduce_counts


class HistogramObserver(Observer):
    """Keeps min/max plus a histogram of values with `bins` bins per channel."""

    def __init__(self, spec: QuantSpec, channels: int | None = None, bins: int | None = None):
        super().__init__(spec, channels)
        self.bins = bins or (256 if spec.per_channel else 2048)
        rows = channels if spec.per_channel else 1
        self.register_buffer("hist", torch.zeros(rows, self.bins, dtype=torch.float64))

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """Data as (channels, values); one row for per-tensor observers."""
        if not self.spec.per_channel:
            return x.reshape(1, -1)
        return x.transpose(0, self.spec.axis).reshape(x.shape[self.spec.axis], -1)

    def _edges(self) -> tuple[torch.Tensor, torch.Tensor]:
        lo = self.min_val.reshape(-1).to(torch.float64)
        width = (self.max_val.reshape(-1).to(torch.float64) - lo).clamp_min(MIN_SCALE) / self.bins
        return lo, width

    def _binned(self, values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """`weights` summed into this observer's current bins (one row per channel)."""
        lo, width = self._edges()
        idx = torch.floor((values - lo[:, None]) / width[:, None]).clamp(0, self.bins - 1)
        return torch.zeros_like(self.hist).scatter_add_(1, idx.long(), weights)

    def observe(self, x: torch.Tensor) -> None:
        old_lo, old_width = self._edges()
        had_data = self.has_data
        super().observe(x)
        if had_data:  # every rank holds the same histogram: re-bin it without syncing
            centers = old_lo[:, None] + (torch.arange(self.bins) + 0.5) * old_width[:, None]
            self.hist.copy_(self._binned(centers, self.hist))
        rows = self._rows(x).to(torch.float64)
        self.hist.add_(reduce_counts(self._binned(rows, torch.ones_like(rows))))

    def _centers(self) -> tuple[torch.Tensor, torch.Tensor]:
        lo, width = self._edges()
        return lo[:, None] + (torch.arange(self.bins) + 0.5) * width[:, None], width

    def _shape_like_range(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.float32).reshape(self.min_val.shape)


class PercentileObserver(HistogramObserver):
    """Clips the range so that `percentile` % of observed values stay inside it."""

    def __init__(
        self,
        spec: QuantSpec,
        channels: int | None = None,
        percentile: float = 99.99,
        bins: int | None = None,
    ):
        super().__init__(spec, channels, bins)
        if not 50.0 < percentile <= 100.0:
            raise BadInputError(f"percentile must be in (50, 100], got {percentile}")
        self.percentile = percentile

    def clip_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        centers, width = self._centers()
        total = self.hist.sum(dim=1, keepdim=True)
        q = self.percentile / 100.0
        if self.spec.symmetric:
            mags, order = centers.abs().sort(dim=1)
            cum = self.hist.gather(1, order).cumsum(dim=1)
            k = torch.searchsorted(cum, q * total).clamp(max=self.bins - 1)
            amax = mags.gather(1, k).squeeze(1) + width / 2
            amax = torch.minimum(amax, torch.maximum(-self._lo64(), self._hi64()))
            return self._shape_like_range(-amax), self._shape_like_range(amax)
        cum = self.hist.cumsum(dim=1)
        k_lo = torch.searchsorted(cum, (1 - q) * total).clamp(max=self.bins - 1)
        k_hi = torch.searchsorted(cum, q * total).clamp(max=self.bins - 1)
        lo = torch.maximum(centers.gather(1, k_lo).squeeze(1) - width / 2, self._lo64())
        hi = torch.minimum(centers.gather(1, k_hi).squeeze(1) + width / 2, self._hi64())
        return self._shape_like_range(lo), self._shape_like_range(hi)

    def _lo64(self) -> torch.Tensor:
        return self.min_val.reshape(-1).to(torch.float64)

    def _hi64(self) -> torch.Tensor:
        return self.max_val.reshape(-1).to(torch.float64)


class MSEObserver(HistogramObserver):
    """Picks the range, among `candidates` shrinkings of min/max, with the least expected MSE.

    Values inside the range cost scale^2/12 (uniform rounding error); values outside cost
    their squared distance to the nearest representable bound (saturation).
    """

    def __init__(
        self,
        spec: QuantSpec,
        channels: int | None = None,
        candidates: int = 100,
        bins: int | None = None,
    ):
        super().__init__(spec, channels, bins)
        self.candidates = candidates

    def clip_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        centers, _ = self._centers()
        lo, hi = self.min_val.reshape(-1), self.max_val.reshape(-1)
        best_err = torch.full_like(lo, float("inf"), dtype=torch.float64)
        best_lo, best_hi = lo.clone(), hi.clone()
        for t in torch.linspace(1.0 / self.candidates, 1.0, self.candidates):
            cand_lo, cand_hi = lo * t, hi * t
            scale, zp = qparams_from_range(cand_lo, cand_hi, self.spec)
            scale, zp = scale.to(torch.float64)[:, None], zp.to(torch.float64)[:, None]
            rep_lo, rep_hi = (self.spec.qmin - zp) * scale, (self.spec.qmax - zp) * scale
            clipped = centers.clamp(min=rep_lo, max=rep_hi)
            inside = (centers >= rep_lo) & (centers <= rep_hi)
            per_value = torch.where(inside, scale**2 / 12, (centers - clipped) ** 2)
            err = (per_value * self.hist).sum(dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo = torch.where(better, cand_lo, best_lo)
            best_hi = torch.where(better, cand_hi, best_hi)
        return best_lo.reshape(self.min_val.shape), best_hi.reshape(self.max_val.shape)
