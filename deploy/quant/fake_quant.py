"""FakeQuantize: the module the front end inserts wherever a backend will quantize a tensor.

It owns an observer (what range to use) and the qparams it produced. Observing and fake
quantizing switch on and off independently, so one module serves calibration (observe only),
QAT (both, or fake-quant with frozen ranges) and float evaluation (neither). Everything that
defines its behaviour is a buffer or parameter, so state_dict round-trips it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from qat_deploy.deploy.common.errors import BadInputError
from qat_deploy.deploy.quant.functional import (
    clamp_to_range,
    fake_quantize,
    fake_quantize_lsq,
    lsq_grad_scale,
    scale_shift_fake_quantize,
)
from qat_deploy.deploy.quant.observers import (
    MIN_SCALE,
    FixedRangeObserver,
    MinMaxObserver,
    Observer,
)
from qat_deploy.deploy.quant.spec import QuantSpec

ObserverFactory = Callable[[QuantSpec, int | None], Observer]

#: The integer ranges torch's ONNX exporter turns into QuantizeLinear/DequantizeLinear.
_EXPORTABLE_RANGES = {(0, 255), (-128, 127), (0, 127)}
#: the FakeQuantize attribute holding a SmoothQuant scale (exports name its Mul after it)
SMOOTH_ATTRIBUTE = "smooth"


class FakeQuantize(nn.Module):
    """Observe, then simulate quantization with a straight-through gradient.

    With `learnable=True` the scale (and, for affine specs, the zero point) become
    nn.Parameters trained with LSQ gradients; the observer then only initialises them.
    """

    def __init__(
        self,
        spec: QuantSpec,
        observer: ObserverFactory = MinMaxObserver,
        channels: int | None = None,
        learnable: bool = False,
    ) -> None:
        super().__init__()
        if spec.per_channel and channels is None:
            raise BadInputError("a per-channel fake quantizer needs its channel count")
        self.spec = spec
        self.learnable = learnable
        self._export: tuple[bool, torch.Tensor, torch.Tensor] | None = None
        self._observer_factory = observer
        self.observer = observer(spec, channels)
        shape = (channels,) if spec.per_channel else ()
        scale = torch.ones(shape)
        zero_point = torch.zeros(shape, dtype=torch.float32 if learnable else torch.int32)
        if learnable:
            self.scale = nn.Parameter(scale)
            self.zero_point = nn.Parameter(zero_point, requires_grad=not spec.symmetric)
        else:
            self.register_buffer("scale", scale)
            self.register_buffer("zero_point", zero_point)
        self.register_buffer("observer_enabled", torch.tensor(True))
        self.register_buffer("fake_quant_enabled", torch.tensor(True))
        #: False: clamp to the quantized range without rounding, where the engine fuses this
        #: quantizer into a later one (deploy/frontend/arithmetic.py). Export still writes Q/DQ.
        self.rounding = True
        #: True: round as the engine's multiply-add form does (per-tensor quantizers of
        #: engines with BackendRules.scale_shift_quantize), values only; gradients unchanged.
        self.scale_shift = False
        #: a constant per-channel scale applied before quantizing (deploy.training.smooth); it is
        #: part of the float function, so it applies with fake quantization off too
        self.smooth: nn.Module | None = None  # SMOOTH_ATTRIBUTE
        #: True: observing leaves the qparams alone until update_qparams() (calibration with
        #: fake quantization off computes them once at the end: a histogram observer's range
        #: search then runs once, not once per batch)
        self.defer_qparams = False

    def reset_observer(self, observer: ObserverFactory | None = None) -> None:
        """Forget observed ranges: the next calibration starts afresh, with `observer` from
        now on when given, else the same observer kind. A fixed range stays fixed."""
        channels = self.scale.numel() if self.spec.per_channel else None
        location = self.location
        if isinstance(self.observer, FixedRangeObserver):
            observer = None  # the function's bounds, not a calibration choice
        self._observer_factory = observer or self._observer_factory
        self.observer = self._observer_factory(self.spec, channels)
        self.location = location

    @property
    def location(self) -> str:
        return self.observer.location

    @location.setter
    def location(self, name: str) -> None:
        self.observer.location = name

    def enable_observer(self, enabled: bool = True) -> FakeQuantize:
        self.observer_enabled.fill_(enabled)
        return self

    def enable_fake_quant(self, enabled: bool = True) -> FakeQuantize:
        self.fake_quant_enabled.fill_(enabled)
        return self

    def effective_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale (positive) and integer zero point as the integer grid will use them."""
        scale = self.scale.detach().abs().clamp_min(MIN_SCALE)
        zp = torch.round(self.zero_point.detach()).clamp(self.spec.qmin, self.spec.qmax)
        return scale, zp.to(torch.int32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.smooth is not None:
            x = self.smooth(x)
        if self._export is not None:
            return self._export_forward(x)
        if bool(self.observer_enabled):
            self._observe(x)
        if not bool(self.fake_quant_enabled):
            return x
        if not self.rounding:
            scale = self.scale.abs().clamp_min(MIN_SCALE)
            return clamp_to_range(x, scale, self.zero_point, self.spec)
        if self.learnable:
            scale = self.scale.abs().clamp_min(MIN_SCALE)
            per_scale = x.numel() // max(scale.numel(), 1)
            g = lsq_grad_scale(per_scale, self.spec)
            y = fake_quantize_lsq(x, scale, self.zero_point, self.spec, g)
        else:
            y = fake_quantize(x, self.scale, self.zero_point, self.spec)
        if self.scale_shift and not self.spec.per_channel:
            scale, zero_point = self.effective_qparams()
            return y + (scale_shift_fake_quantize(x, scale, zero_point, self.spec) - y).detach()
        return y

    def _observe(self, x: torch.Tensor) -> None:
        self.observer(x)
        if not self.defer_qparams:
            self.update_qparams()

    def update_qparams(self) -> None:
        """Scale and zero point from what the observer saw so far."""
        scale, zero_point = self.observer.compute_qparams()
        with torch.no_grad():
            self.scale.copy_(scale)
            self.zero_point.copy_(zero_point.to(self.zero_point.dtype))

    @property
    def export_mode(self) -> bool:
        return self._export is not None

    def set_export_mode(self, enabled: bool) -> None:
        """Freeze switches and qparams as Python constants so torch.export sees no
        data-dependent branches, and emit torch's fake-quant ops that become Q/DQ in ONNX."""
        if not enabled:
            self._export = None
            return
        if bool(self.fake_quant_enabled):
            self.export_range()  # fail early, naming the quantizer, if ONNX cannot express it
        scale, zp = self.effective_qparams()
        self._export = (bool(self.fake_quant_enabled), scale.clone(), zp.clone())

    def export_range(self) -> tuple[int, int]:
        """Integer range for ONNX. Narrow-range (weight) quantizers of 8 bits, and of 7 bits
        (reduced-range weights for engines without VNNI), are exported as int8 [-128, 127]:
        their scale keeps every code of an observed weight inside their own range, and ONNX
        has no narrow-range flag."""
        if self.spec.narrow_range and self.spec.bits in (7, 8):
            return -128, 127
        qmin = self.spec.qmin
        if (qmin, self.spec.qmax) not in _EXPORTABLE_RANGES:
            raise BadInputError(
                f"{self.location}: {self.spec.describe()} cannot be expressed in ONNX "
                "QuantizeLinear; export supports 8-bit quantizers only"
            )
        return qmin, self.spec.qmax

    def within_range(self, weight: torch.Tensor) -> torch.Tensor:
        """`weight` clamped to this quantizer's own codes, where export writes it on a wider
        range (7-bit weights as int8): a QAT step after the last observation can move a
        weight past its observed range, and int8 codes would not clip it as fake-quant does.
        Layers apply it to the constant weight they export."""
        if self.export_range() == (self.spec.qmin, self.spec.qmax):
            return weight
        scale, zp = self.effective_qparams()
        if self.spec.per_channel:
            shape = [-1 if d == self.spec.axis % weight.dim() else 1 for d in range(weight.dim())]
            scale, zp = scale.reshape(shape), zp.reshape(shape)
        low, high = (self.spec.qmin - zp) * scale, (self.spec.qmax - zp) * scale
        return torch.maximum(torch.minimum(weight, high), low)

    def _export_forward(self, x: torch.Tensor) -> torch.Tensor:
        """torch's fake-quant ops, which the ONNX exporter turns into Q/DQ pairs."""
        enabled, scale, zp = self._export
        if not enabled:
            return x
        qmin, qmax = self.export_range()
        if self.spec.per_channel:
            return torch.fake_quantize_per_channel_affine(
                x, scale, zp, self.spec.axis % x.dim(), qmin, qmax
            )
        # Python constants (snapshotted outside tracing) also work with a dynamic batch axis,
        # where the tensor-qparams overload has no shape-propagation kernel.
        return torch.fake_quantize_per_tensor_affine(x, float(scale), int(zp), qmin, qmax)

    def extra_repr(self) -> str:
        mode = "LSQ" if self.learnable else type(self.observer).__name__
        return f"{self.spec.describe()}, {mode}"


@contextlib.contextmanager
def fake_quant_only(
    quantizers: Sequence[FakeQuantize], enabled: set[int] = frozenset()
) -> Iterator[None]:
    """For the block: observers off, and only the quantizers in `enabled` (by id) fake-
    quantizing (none: the float model); both switches restored afterwards."""
    before = [(bool(q.observer_enabled), bool(q.fake_quant_enabled)) for q in quantizers]
    try:
        for q in quantizers:
            q.enable_observer(False).enable_fake_quant(id(q) in enabled)
        yield
    finally:
        for q, (observing, quantizing) in zip(quantizers, before, strict=True):
            q.enable_observer(observing).enable_fake_quant(quantizing)
