"""The core's quantize/dequantize must equal onnxruntime's QuantizeLinear/DequantizeLinear bit for
bit: per-tensor and per-channel, int8 and uint8, ties (round half to even) and saturation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qat_deploy.deploy.app.selfcheck import onnxruntime_qdq
from qat_deploy.deploy.quant import QuantSpec, dequantize, fake_quantize, quantize

SPECS = {
    "int8": QuantSpec(bits=8, signed=True, symmetric=False),
    "uint8": QuantSpec(bits=8, signed=False, symmetric=False),
}


def make_inputs(rng, shape, scale, zero_point, axis, spec):
    """Random values spanning beyond the grid (saturation), plus exact .5 ties."""
    s = (
        scale
        if axis is None
        else scale.reshape([-1 if d == axis else 1 for d in range(len(shape))])
    )
    z = zero_point.astype(np.float32)
    if axis is not None:
        z = z.reshape(s.shape)
    codes = rng.integers(spec.qmin - 40, spec.qmax + 40, size=shape).astype(np.float32)
    ties = ((codes - z) + 0.5) * s  # exactly halfway between two codes
    noise = rng.uniform(-0.49, 0.49, size=shape).astype(np.float32)
    plain = ((codes - z) + noise) * s
    use_tie = rng.random(shape) < 0.3
    return np.where(use_tie, ties, plain).astype(np.float32)


@pytest.mark.parametrize("dtype", ["int8", "uint8"])
@pytest.mark.parametrize("axis", [None, 0, 1])
@pytest.mark.parametrize("pow2_scale", [True, False])
@pytest.mark.parametrize("seed", range(3))
def test_quantize_dequantize_bit_exact(dtype, axis, pow2_scale, seed):
    rng = np.random.default_rng(seed)
    spec = QuantSpec(bits=8, signed=dtype == "int8", symmetric=False, axis=axis)
    shape = (6, 5, 37)  # 1110 values: long enough for vectorized kernels, odd tail too
    channels = shape[axis] if axis is not None else None
    n = channels or 1
    if pow2_scale:  # every tie is exactly representable: tests round-half-to-even
        scale = (2.0 ** rng.integers(-8, 2, size=n)).astype(np.float32)
    else:
        scale = rng.uniform(1e-3, 0.5, size=n).astype(np.float32)
    zp_np = rng.integers(spec.qmin, spec.qmax + 1, size=n).astype(np.dtype(dtype))
    if axis is None:
        scale, zp_np = scale.reshape(()), zp_np.reshape(())
    x = make_inputs(rng, shape, scale, zp_np, axis, spec)

    ref_q, ref_dq = onnxruntime_qdq(x, scale, zp_np, axis)

    xt, st = torch.from_numpy(x), torch.from_numpy(scale)
    zt = torch.from_numpy(zp_np.astype(np.int32))
    q = quantize(xt, st, zt, spec)
    dq = dequantize(q, st, zt, spec)
    np.testing.assert_array_equal(q.numpy().astype(np.dtype(dtype)), ref_q)
    assert np.array_equal(dq.numpy().view(np.int32), ref_dq.view(np.int32)), (
        "dequantize bits differ"
    )
    fq = fake_quantize(xt, st, zt, spec)
    assert np.array_equal(fq.numpy().view(np.int32), ref_dq.view(np.int32)), (
        "fake-quant bits differ"
    )


def test_ties_really_round_half_to_even():
    """Independent of onnxruntime: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, -0.5 -> 0, -1.5 -> -2."""
    spec = SPECS["int8"]
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 300.0, -300.0])
    q = quantize(x, torch.tensor(1.0), torch.tensor(0), spec)
    assert q.tolist() == [0.0, 2.0, 2.0, -0.0, -2.0, -2.0, 127.0, -128.0]
