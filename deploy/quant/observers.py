"""Observers: watch tensors during calibration and turn what they saw into (scale, zero point).

Every observer refuses NaN/Inf input (a silently wrong scale is worse than an error) and always
yields a finite, positive scale, also for all-zero or constant tensors.
"""

from __future__ import annotations

import torch
from torch import nn

from qat_deploy.deploy.common.errors import BadInputError
from qat_deploy.deploy.quant.spec import QuantSpec
from qat_deploy.deploy.quant.sync import reduce_range

#: Smallest scale we hand out; keeps x / scale finite for any float32 x.
MIN_SCALE = float(torch.finfo(torch.float32).eps)
_MAX_SCALE = float(torch.finfo(torch.float32).max) / 256


def qparams_from_range(
    min_val: torch.Tensor, max_val: torch.Tensor, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """Map a float range onto the spec's grid; zero is always exactly representable.

    Symmetric: scale = max(|min|, |max|) / qmax, zero point 0 (TensorRT's amax/127 for int8).
    Affine: the range is widened to include 0, scale = (max - min) / (qmax - qmin).
    Computed in float64 so extreme float32 ranges do not overflow.
    """
    lo = torch.clamp(min_val.to(torch.float64), max=0.0)
    hi = torch.clamp(max_val.to(torch.float64), min=0.0)
    if spec.symmetric:
        scale = torch.maximum(-lo, hi) / spec.qmax
        scale = scale.clamp(MIN_SCALE, _MAX_SCALE)
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
    else:
        scale = ((hi - lo) / (spec.qmax - spec.qmin)).clamp(MIN_SCALE, _MAX_SCALE)
        zero_point = torch.clamp(spec.qmin - torch.round(lo / scale), spec.qmin, spec.qmax)
        zero_point = zero_point.to(torch.int32)
    return scale.to(torch.float32), zero_point


def check_finite(x: torch.Tensor, where: str) -> None:
    if not bool(torch.isfinite(x).all()):
        bad = "NaN" if bool(torch.isnan(x).any()) else "Inf"
        raise BadInputError(f"{where}: observed {bad} values; calibration data must be finite")


class Observer(nn.Module):
    """Base: tracks per-tensor or per-channel min/max; subclasses refine the range."""

    def __init__(self, spec: QuantSpec, channels: int | None = None) -> None:
        super().__init__()
        if spec.per_channel and channels is None:
            raise BadInputError("a per-channel observer needs its channel count")
        self.spec = spec
        self.location = "observer"
        shape = (channels,) if spec.per_channel else ()
        self.register_buffer("min_val", torch.full(shape, float("inf")))
        self.register_buffer("max_val", torch.full(shape, float("-inf")))

    @property
    def has_data(self) -> bool:
        return bool(torch.isfinite(self.min_val).all())

    def _batch_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.numel() == 0:
            raise BadInputError(f"{self.location}: observed an empty tensor")
        if not self.spec.per_channel:
            return self._checked(*torch.aminmax(x))
        flat = x.transpose(0, self.spec.axis).reshape(x.shape[self.spec.axis], -1)
        if flat.shape[0] != self.min_val.shape[0]:
            raise BadInputError(
                f"{self.location}: expected {self.min_val.shape[0]} channels on axis "
                f"{self.spec.axis}, got {flat.shape[0]}"
            )
        return self._checked(*torch.aminmax(flat, dim=1))

    def _checked(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's range, refused where the data held NaN or Inf (a NaN makes min and max
        NaN, an Inf makes one of them infinite: no second pass over the data is needed), then
        reduced over data-parallel ranks."""
        check_finite(torch.stack([lo, hi]), self.location)
        return reduce_range(lo, hi)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().to(torch.float32)
        self.observe(x)
        return x

    def observe(self, x: torch.Tensor) -> None:
        lo, hi = self._batch_range(x)
        self.min_val.copy_(torch.minimum(self.min_val, lo))
        self.max_val.copy_(torch.maximum(self.max_val, hi))

    def clip_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The float range to map onto the grid; subclasses may clip outliers."""
        return self.min_val, self.max_val

    def compute_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.has_data:
            raise BadInputError(f"{self.location}: no data observed; run calibration first")
        lo, hi = self.clip_range()
        return qparams_from_range(lo, hi, self.spec)


class MinMaxObserver(Observer):
    """Running min and max over everything seen: no clipping, never saturates calibration data."""


class MovingAverageMinMaxObserver(Observer):
    """Exponential moving average of per-batch min/max, as used during QAT.

    `momentum` is the fraction of the previous estimate kept at each batch (0.9 keeps 90%).
    """

    def __init__(self, spec: QuantSpec, channels: int | None = None, momentum: float = 0.9):
        super().__init__(spec, channels)
        if not 0.0 <= momentum < 1.0:
            raise BadInputError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum

    def observe(self, x: torch.Tensor) -> None:
        lo, hi = self._batch_range(x)
        if not self.has_data:
            self.min_val.copy_(lo.expand_as(self.min_val))
            self.max_val.copy_(hi.expand_as(self.max_val))
            return
        m = self.momentum
        self.min_val.copy_(m * self.min_val + (1 - m) * lo)
        self.max_val.copy_(m * self.max_val + (1 - m) * hi)


class FixedRangeObserver(Observer):
    """A range known before any data: the output of a bounded function (GELU's gate
    0.5 * (1 + erf) lies in [0, 1]). Data is still checked for NaN/Inf, but never moves the
    range, so the grid is one an engine rewrite can rely on (backends/onnxruntime/gelu_gate.py)."""

    def __init__(self, spec: QuantSpec, channels: int | None, low: float, high: float) -> None:
        super().__init__(spec, channels)
        if spec.per_channel or not low < high:
            raise BadInputError(f"a fixed range is per-tensor with low < high, got [{low}, {high}]")
        self.min_val.fill_(low)
        self.max_val.fill_(high)

    def observe(self, x: torch.Tensor) -> None:
        self._batch_range(x)


def fixed_range(low: float, high: float):
    """An observer factory (FakeQuantize's `observer`) for FixedRangeObserver."""
    return lambda spec, channels=None: FixedRangeObserver(spec, channels, low, high)


class CurrentMinMaxObserver(Observer):
    """Range of the latest tensor only: weights change at every QAT step, so an accumulated
    min/max would keep stale extremes."""

    def observe(self, x: torch.Tensor) -> None:
        lo, hi = self._batch_range(x)
        self.min_val.copy_(lo.expand_as(self.min_val))
        self.max_val.copy_(hi.expand_as(self.max_val))
