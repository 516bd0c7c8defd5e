"""Quantization arithmetic, written to agree bit for bit with ONNX QuantizeLinear.

ONNX (and onnxruntime's kernels) compute q = saturate(round_half_even(x / scale) + zero_point)
in float32. torch's own fake-quant ops multiply by 1/scale instead, which differs in the last
bit for some inputs, so the core divides. Gradients follow the straight-through estimator
(Bengio et al. 2013) and, for learnable scales, LSQ (Esser et al. 2019) / LSQ+ (Bhalgat 2020).
"""

from __future__ import annotations

import math

import torch

from qat_deploy.deploy.quant.spec import QuantSpec


def _broadcast(param: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """Reshape a per-channel parameter so it broadcasts along `axis` of x."""
    if axis is None or param.dim() == 0:
        return param
    shape = [1] * x.dim()
    shape[axis] = -1
    return param.reshape(shape)


def quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec
) -> torch.Tensor:
    """Float -> integer codes (returned as float32 holding integers, for easy arithmetic)."""
    s = _broadcast(scale.to(torch.float32), x, spec.axis)
    z = _broadcast(zero_point.to(torch.float32), x, spec.axis)
    q = torch.round(x.to(torch.float32) / s) + z
    return torch.clamp(q, spec.qmin, spec.qmax)


def dequantize(
    q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec
) -> torch.Tensor:
    s = _broadcast(scale.to(torch.float32), q, spec.axis)
    z = _broadcast(zero_point.to(torch.float32), q, spec.axis)
    return (q - z) * s


class _FakeQuantSTE(torch.autograd.Function):
    """Fake quantization whose gradient is 1 where x maps inside [qmin, qmax], else 0."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, spec):  # type: ignore[override]
        q_unclamped = torch.round(x / _broadcast(scale, x, spec.axis)) + _broadcast(
            zero_point.to(x.dtype), x, spec.axis
        )
        ctx.save_for_backward((q_unclamped >= spec.qmin) & (q_unclamped <= spec.qmax))
        q = torch.clamp(q_unclamped, spec.qmin, spec.qmax)
        return dequantize(q, scale, zero_point, spec).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        (inside,) = ctx.saved_tensors
        return grad_out * inside.to(grad_out.dtype), None, None, None


def fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec
) -> torch.Tensor:
    """dequantize(quantize(x)) with a straight-through gradient for x."""
    return _FakeQuantSTE.apply(x, scale.to(torch.float32), zero_point, spec)


def scale_shift_fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec
) -> torch.Tensor:
    """Per-tensor fake quantization as OpenVINO's FakeQuantize computes it, every step
    rounded to float32: the range [lo, hi] = [(qmin - z) s, (qmax - z) s], then
    round(clamp(x, lo, hi) * k + b) with k = (qmax - qmin) / (hi - lo) and b = -lo * k, a
    multiply-add where ONNX divides by the scale. At near-ties the two round differently (a
    helper found this formula bit-exact against the CPU plugin). No gradient: QAT takes the
    straight-through gradient of fake_quantize and this value (FakeQuantize.scale_shift)."""
    with torch.no_grad():
        s = scale.to(torch.float32).reshape(())
        z = zero_point.to(torch.float32).reshape(())
        low, high = (spec.qmin - z) * s, (spec.qmax - z) * s
        k = torch.tensor(float(spec.qmax - spec.qmin)) / (high - low)
        b = -low * k
        q = torch.round(torch.clamp(x.to(torch.float32), low, high) * k + b)
        return ((q + spec.qmin - z) * s).to(x.dtype)


def clamp_to_range(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec
) -> torch.Tensor:
    """The quantized range [(qmin - z) s, (qmax - z) s] as a clamp, without rounding: what an
    engine applies where it fuses this quantizer into a later one. Gradient 1 inside, as with
    the STE; a learnable scale gets the bounds' gradient."""
    s = _broadcast(scale, x, spec.axis)
    zp = torch.clamp(torch.round(zero_point.detach()), spec.qmin, spec.qmax)
    z = _broadcast(zp, x, spec.axis)
    return torch.clamp(x, ((spec.qmin - z) * s).to(x.dtype), ((spec.qmax - z) * s).to(x.dtype))


def lsq_grad_scale(numel_per_scale: int, spec: QuantSpec) -> float:
    """LSQ's step-size gradient scale g = 1 / sqrt(N * Q_P) (Esser et al. 2019, sec. 2.2)."""
    return 1.0 / math.sqrt(numel_per_scale * max(spec.qmax, 1))


class _FakeQuantLSQ(torch.autograd.Function):
    """Fake quantization with learnable scale (LSQ) and, for affine specs, zero point (LSQ+).

    With u = x/s, zero point z rounded in the forward pass, and g the gradient scale:
      d/dx = 1 inside the range, 0 outside;
      d/ds = g * (round(u) - u) inside, g * (qmin - z) below, g * (qmax - z) above;
      d/dz = 0 inside, -g * s outside (the clamp pins the code, so only -z*s moves).
    """

    @staticmethod
    def forward(ctx, x, scale, zero_point, spec, grad_scale):  # type: ignore[override]
        s = _broadcast(scale, x, spec.axis)
        z = _broadcast(torch.clamp(torch.round(zero_point), spec.qmin, spec.qmax), x, spec.axis)
        u = x / s
        q_unclamped = torch.round(u) + z
        below, above = q_unclamped < spec.qmin, q_unclamped > spec.qmax
        q = torch.clamp(q_unclamped, spec.qmin, spec.qmax)
        ctx.save_for_backward(u, z, s, below, above)
        ctx.spec, ctx.grad_scale = spec, grad_scale
        ctx.scale_shape, ctx.zp_shape = scale.shape, zero_point.shape
        return (q - z) * s

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        u, z, s, below, above = ctx.saved_tensors
        spec, g = ctx.spec, ctx.grad_scale
        inside = ~(below | above)
        grad_x = grad_out * inside.to(grad_out.dtype)
        d_scale = torch.where(
            below, spec.qmin - z, torch.where(above, spec.qmax - z, torch.round(u) - u)
        )
        d_zp = torch.where(inside, torch.zeros_like(u), -s.expand_as(u))
        return (
            grad_x,
            _reduce_to(grad_out * d_scale * g, ctx.scale_shape, spec.axis),
            _reduce_to(grad_out * d_zp * g, ctx.zp_shape, spec.axis),
            None,
            None,
        )


def _reduce_to(grad: torch.Tensor, shape: torch.Size, axis: int | None) -> torch.Tensor:
    """Sum an elementwise gradient down to a per-tensor or per-channel parameter's shape."""
    if axis is None or len(shape) == 0 or shape.numel() == 1:
        return grad.sum().reshape(shape)
    dims = [d for d in range(grad.dim()) if d != axis % grad.dim()]
    return grad.sum(dim=dims).reshape(shape)


def fake_quantize_lsq(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    spec: QuantSpec,
    grad_scale: float,
) -> torch.Tensor:
    """Fake quantization whose scale (and zero point) receive LSQ gradients."""
    return _FakeQuantLSQ.apply(x, scale, zero_point, spec, grad_scale)
