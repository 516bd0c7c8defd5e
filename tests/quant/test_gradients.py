"""Straight-through estimator and LSQ/LSQ+ gradients."""

from __future__ import annotations

import math

import pytest
import torch

from qat_deploy.deploy.quant import QuantSpec, fake_quantize, fake_quantize_lsq
from qat_deploy.deploy.quant.functional import lsq_grad_scale

INT8 = QuantSpec(bits=8, signed=True, symmetric=True)
UINT4_AFFINE = QuantSpec(bits=4, signed=False, symmetric=False)


def test_ste_gradient_is_one_inside_zero_outside():
    scale, zp = torch.tensor(0.1), torch.tensor(0)
    # grid covers [-12.8, 12.7]; values map inside iff round(x/0.1) in [-128, 127]
    x = torch.tensor([-20.0, -12.8, -1.0, 0.0, 0.04, 5.0, 12.7, 12.76, 50.0], requires_grad=True)
    fake_quantize(x, scale, zp, INT8).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]


def test_ste_gradient_per_channel_uses_each_channels_range():
    spec = QuantSpec(bits=8, signed=True, symmetric=True, axis=0, narrow_range=True)
    scale = torch.tensor([0.01, 1.0])
    x = torch.tensor([[0.5, 2.0], [0.5, 2.0]], requires_grad=True)  # 2.0 > 1.27 in channel 0
    fake_quantize(x, scale, torch.zeros(2, dtype=torch.int32), spec).sum().backward()
    assert x.grad.tolist() == [[1.0, 0.0], [1.0, 1.0]]


def test_lsq_scale_gradient_hand_built():
    """Esser et al. 2019 eq. 3: d x_hat / d s = -v/s + round(v/s) inside, -Q_N or Q_P at the
    clamps."""
    s = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    v = torch.tensor([0.3, 0.76, -0.2, 100.0, -100.0], dtype=torch.float64)
    g = 0.25
    fake_quantize_lsq(v, s, torch.tensor(0.0, dtype=torch.float64), INT8, g).sum().backward()
    # v/s = 0.6, 1.52, -0.4 -> round 1, 2, -0 ; clamps at 127 and -128
    expected = g * ((1 - 0.6) + (2 - 1.52) + (0 + 0.4) + 127 + (-128))
    assert s.grad.item() == pytest.approx(expected, rel=1e-6)


def test_lsq_zero_point_gradient_hand_built():
    """LSQ+: the offset gets no gradient inside the range and -s outside (times g)."""
    s = torch.tensor(0.5, requires_grad=True)
    z = torch.tensor(3.0, requires_grad=True)
    v = torch.tensor([0.3, 100.0, -100.0])  # inside, above (qmax 15), below (qmin 0)
    g = 0.1
    fake_quantize_lsq(v, s, z, UINT4_AFFINE, g).sum().backward()
    assert z.grad.item() == pytest.approx(g * (0 - 0.5 - 0.5), rel=1e-6)
    # d/ds: inside round(0.6)-0.6 = 0.4; above qmax - z = 12; below qmin - z = -3
    assert s.grad.item() == pytest.approx(g * (0.4 + 12 - 3), rel=1e-6)


def test_lsq_grad_scale_formula():
    spec = QuantSpec(bits=4, signed=True, symmetric=True)
    assert lsq_grad_scale(1000, spec) == pytest.approx(1 / math.sqrt(1000 * 7))


def _surrogate(v, s, z, spec, frozen_round):
    """Independent formulation of LSQ's gradient: round() replaced by its value frozen at the
    evaluation point (a constant offset), so ordinary calculus gives what the STE claims."""
    q = torch.clamp(v / s + frozen_round + z, spec.qmin, spec.qmax)
    return (q - z) * s


@pytest.mark.parametrize("spec", [INT8, UINT4_AFFINE, QuantSpec(bits=3, signed=True)])
def test_lsq_gradient_matches_finite_difference(spec):
    torch.manual_seed(0)
    s0, z0 = 0.13, float(spec.qmin + (spec.qmax - spec.qmin) // 3) if not spec.symmetric else 0.0
    v = torch.randn(400, dtype=torch.float64) * s0 * (spec.qmax - spec.qmin) * 0.4
    # keep off the kinks where round(v/s) + z sits exactly on qmin or qmax: no derivative there
    code = torch.round(v / s0) + z0
    v = v[(code != spec.qmin) & (code != spec.qmax)][:200]
    assert ((torch.round(v / s0) + z0 > spec.qmax) | (torch.round(v / s0) + z0 < spec.qmin)).any()
    g = lsq_grad_scale(v.numel(), spec)
    w = torch.randn(v.numel(), dtype=torch.float64)  # random projection of the output

    s = torch.tensor(s0, dtype=torch.float64, requires_grad=True)
    z = torch.tensor(z0, dtype=torch.float64, requires_grad=not spec.symmetric)
    (fake_quantize_lsq(v, s, z, spec, g) * w).sum().backward()

    frozen = torch.round(v / s0) - v / s0
    eps = 1e-7
    # LSQ scales the step-size gradient by g (Esser et al. sec. 2.2); the surrogate does not

    def loss(s_val, z_val):
        return (_surrogate(v, s_val, z_val, spec, frozen) * w).sum().item()

    fd_s = (loss(s0 + eps, z0) - loss(s0 - eps, z0)) / (2 * eps)
    assert s.grad.item() == pytest.approx(g * fd_s, rel=1e-5, abs=1e-9)
    if not spec.symmetric:
        fd_z = (loss(s0, z0 + eps) - loss(s0, z0 - eps)) / (2 * eps)
        assert z.grad.item() == pytest.approx(g * fd_z, rel=1e-5, abs=1e-9)


def test_lsq_per_channel_gradients_land_on_each_channel():
    spec = QuantSpec(bits=8, signed=True, symmetric=True, axis=0, narrow_range=True)
    s = torch.tensor([1.0, 0.001], requires_grad=True)
    v = torch.tensor([[0.3, 0.3], [5.0, 5.0]])  # channel 1 saturates at +127
    fake_quantize_lsq(v, s, torch.zeros(2), spec, 1.0).sum().backward()
    assert s.grad[0].item() == pytest.approx(2 * (0 - 0.3))
    assert s.grad[1].item() == pytest.approx(2 * 127.0)
