"""Observers that keep a histogram and clip outliers: percentile, MSE-optimal and entropy
(TensorRT's KL-divergence calibration) ranges.

One histogram per channel (a single one per tensor), re-binned when the observed range grows,
so any number of calibration batches fits in fixed memory.
"""

from __future__ import annotations

import torch

from qat_deploy.deploy.common.errors import BadInputError
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
        self.hist.add_(reduce_counts(self._binned(rows, self._counts(rows))))

    def _counts(self, rows: torch.Tensor) -> torch.Tensor:
        """How much each value adds to its bin: every value counts once."""
        return torch.ones_like(rows)

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


class EntropyObserver(HistogramObserver):
    """TensorRT's entropy calibration (IInt8EntropyCalibrator2; Migacz, "8-bit Inference with
    TensorRT", 2017): the threshold t whose quantized |x| histogram loses the least
    information, i.e. minimises KL(P || Q) over candidate thresholds.

    For each candidate, P is the histogram up to t with everything beyond folded into its last
    bin, and Q is the histogram up to t merged into the grid's levels and spread back evenly over
    the bins that held data (Q gets _UNCOVERED_COUNT where P's folded outliers meet an empty
    bin). Symmetric specs use qmax + 1 levels (128 for int8) on [0, t].
    Affine specs: non-negative data (post-ReLU) keeps lo at its observed min and searches t with
    all qmax - qmin + 1 levels, since the whole grid then serves [0, t]; signed data searches |x|
    with half the levels, as a grid clipped to [-t, t] spends half its codes on each side (a
    search per tail would need the split of codes, which depends on both thresholds).
    Exact zeros are not counted: the grid holds 0 exactly, and a ReLU's spike at 0 would
    otherwise dominate the divergence and drag t far down.
    """

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        return super()._rows(x).abs()

    def _edges(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Bins over [0, max |x|]: the search only looks at magnitudes."""
        amax = torch.maximum(-self.min_val, self.max_val).reshape(-1).to(torch.float64)
        return torch.zeros_like(amax), amax.clamp_min(MIN_SCALE) / self.bins

    def _counts(self, rows: torch.Tensor) -> torch.Tensor:
        return (rows != 0).to(rows.dtype)

    def clip_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        lo = self.min_val.reshape(-1).to(torch.float64)
        hi = self.max_val.reshape(-1).to(torch.float64)
        if self.spec.symmetric:
            levels = torch.full_like(lo, self.spec.qmax + 1, dtype=torch.long)
        else:
            codes = self.spec.qmax - self.spec.qmin + 1
            levels = torch.where(lo >= 0, codes, codes // 2)
        kept = torch.empty_like(levels)
        for n in levels.unique().tolist():
            rows = levels == n
            kept[rows] = _least_divergent(self.hist[rows], n)
        _, width = self._edges()
        t = torch.minimum(kept * width, torch.maximum(-lo, hi))
        if self.spec.symmetric:
            return self._shape_like_range(-t), self._shape_like_range(t)
        return self._shape_like_range(lo.clamp_min(-t)), self._shape_like_range(hi.clamp_max(t))


#: Q's count in the bin P's outliers fold into when no data fell there (MXNet's TensorRT-style
#: calibrator smooths with the same 1e-4): without it a threshold in the empty stretch between
#: the bulk and far outliers has infinite KL, and the search keeps an outlier instead
_UNCOVERED_COUNT = 1e-4


def _least_divergent(hist: torch.Tensor, levels: int) -> torch.Tensor:
    """Per row of `hist` (rows, bins), the number of leading bins i whose threshold minimises
    KL(P || Q), for every i in [levels, bins] at once.

    With cumulative sums over bins, each candidate costs O(levels) instead of O(bins):
    KL = (sum P log P - sum P log Q) / S + log(C / S), where S is the total count, C the count
    below the threshold (plus Q's count for uncovered outliers), and sum P log Q = sum over
    levels of m log(m / n) (m: a level's count, n: its non-empty bins) plus the outliers times
    the log of Q in the last bin.
    """
    rows, bins = hist.shape
    cand = torch.arange(min(levels, bins), bins + 1)
    # level k of candidate i holds bins [ceil(k i / levels), ceil((k + 1) i / levels))
    bounds = (cand[:, None] * torch.arange(levels + 1) + levels - 1) // levels

    def cumulative(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.zeros(rows, 1, dtype=t.dtype), t.cumsum(dim=1)], dim=1)

    counts, nonempty = cumulative(hist), cumulative((hist > 0).to(hist.dtype))
    level_count = counts[:, bounds].diff(dim=2)
    level_mean = level_count / nonempty[:, bounds].diff(dim=2).clamp_min(1)
    total, below = counts[:, -1:], counts[:, cand]
    outliers, last = total - below, hist[:, cand - 1]
    p_log_p = cumulative(torch.xlogy(hist, hist))[:, cand - 1] + torch.xlogy(
        last + outliers, last + outliers
    )
    # outliers folded into a bin Q leaves empty: a tiny count there, not an infinite divergence
    uncovered = (last == 0) & (outliers > 0)
    q_top = torch.where(uncovered, _UNCOVERED_COUNT, level_mean[..., -1])
    q_total = below + torch.where(uncovered, _UNCOVERED_COUNT, 0.0)
    p_log_q = torch.xlogy(level_count, level_mean).sum(dim=2) + torch.xlogy(outliers, q_top)
    kl = (p_log_p - p_log_q) / total + torch.log(q_total / total)
    return cand[torch.where(below == 0, torch.inf, kl).argmin(dim=1)]
