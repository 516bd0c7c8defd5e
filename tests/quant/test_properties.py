"""Round-trip property: inside the representable range, dequantize(quantize(x)) is within
half a step of x."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qat_deploy.deploy.quant import QuantSpec, dequantize, quantize


@settings(max_examples=200, deadline=None)
@given(
    bits=st.integers(2, 8),
    signed=st.booleans(),
    scale=st.floats(1e-6, 1e3, allow_nan=False),
    zp_frac=st.floats(0, 1),
    fracs=st.lists(st.floats(0, 1), min_size=1, max_size=64),
)
def test_round_trip_within_half_step(bits, signed, scale, zp_frac, fracs):
    spec = QuantSpec(bits=bits, signed=signed, symmetric=False)
    zp = int(round(spec.qmin + zp_frac * (spec.qmax - spec.qmin)))
    s = torch.tensor(scale, dtype=torch.float32)
    z = torch.tensor(zp, dtype=torch.int32)
    lo, hi = (spec.qmin - zp) * s.item(), (spec.qmax - zp) * s.item()
    x = torch.tensor(np.float32(lo) + np.float32(hi - lo) * np.asarray(fracs, np.float32))
    x = x.clamp(lo, hi)
    err = (dequantize(quantize(x, s, z, spec), s, z, spec) - x).abs()
    # half a step, plus float32 rounding of x/s and of (q - z) * s
    assert (err <= s * (0.5 + 1e-4)).all(), (err.max() / s).item()
