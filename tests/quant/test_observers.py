"""Observers: finite positive scales for any finite input, refusal of NaN/Inf, and ranges checked
against independent numpy computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from qat_deploy.deploy.common.errors import BadInputError
from qat_deploy.deploy.quant import (
    FakeQuantize,
    FixedRangeObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MSEObserver,
    PercentileObserver,
    QuantSpec,
    dequantize,
    fake_quantize,
    fixed_range,
    quantize,
)
from qat_deploy.deploy.quant.histogram_observers import EntropyObserver

OBSERVERS = [
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    PercentileObserver,
    MSEObserver,
    EntropyObserver,
]
SPECS = [
    QuantSpec(bits=8, signed=True, symmetric=True),
    QuantSpec(bits=8, signed=False, symmetric=False),
    QuantSpec(bits=8, signed=True, symmetric=True, axis=0, narrow_range=True),
    QuantSpec(bits=4, signed=True, symmetric=False),
    QuantSpec(bits=2, signed=False, symmetric=True),
]

finite_f32 = st.floats(allow_nan=False, allow_infinity=False, width=32)


def make(observer_cls, spec, channels=3):
    return observer_cls(spec, channels if spec.per_channel else None)


@settings(max_examples=60, deadline=None)
@given(
    data=arrays(np.float32, (3, 7), elements=finite_f32),
    observer_idx=st.integers(0, len(OBSERVERS) - 1),
    spec_idx=st.integers(0, len(SPECS) - 1),
)
def test_scale_always_finite_positive_and_zero_exact(data, observer_idx, spec_idx):
    spec = SPECS[spec_idx]
    obs = make(OBSERVERS[observer_idx], spec)
    obs(torch.from_numpy(data))
    obs(torch.from_numpy(data[::-1].copy() * 0.5))
    scale, zp = obs.compute_qparams()
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert ((zp >= spec.qmin) & (zp <= spec.qmax)).all()
    zero = torch.zeros(3 if spec.per_channel else 1, 1).squeeze(-1)
    zero = zero if spec.per_channel else zero.reshape(())
    assert (dequantize(quantize(zero, scale, zp, spec), scale, zp, spec) == 0).all()


@pytest.mark.parametrize("observer_cls", OBSERVERS)
@pytest.mark.parametrize("value", [0.0, 3.5, -2.0])
def test_constant_and_all_zero_tensors(observer_cls, value):
    for spec in SPECS:
        obs = make(observer_cls, spec)
        obs(torch.full((3, 10), value))
        scale, _ = obs.compute_qparams()
        assert torch.isfinite(scale).all() and (scale > 0).all()


@pytest.mark.parametrize("observer_cls", OBSERVERS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_and_inf_are_refused(observer_cls, bad):
    obs = make(observer_cls, SPECS[0])
    obs.location = "layer1.conv1.input"
    x = torch.randn(3, 10)
    x[1, 2] = bad
    with pytest.raises(BadInputError, match=r"layer1\.conv1\.input.*(NaN|Inf)"):
        obs(x)


def test_empty_and_unobserved_are_refused():
    obs = MinMaxObserver(SPECS[0])
    with pytest.raises(BadInputError, match="no data observed"):
        obs.compute_qparams()
    with pytest.raises(BadInputError, match="empty"):
        obs(torch.empty(0, 4))


def test_per_channel_minmax_matches_numpy():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(16, 8, 3, 3)).astype(np.float32) * rng.uniform(0.1, 3, (16, 1, 1, 1))
    spec = SPECS[2]
    obs = MinMaxObserver(spec, 16)
    obs(torch.from_numpy(w))
    scale, zp = obs.compute_qparams()
    expected = np.abs(w).reshape(16, -1).max(axis=1) / 127
    np.testing.assert_allclose(scale.numpy(), expected, rtol=1e-6)
    assert (zp == 0).all()


def test_affine_minmax_matches_formula():
    spec = SPECS[1]
    obs = MinMaxObserver(spec)
    obs(torch.tensor([-1.0, 0.5, 3.0]))
    scale, zp = obs.compute_qparams()
    assert scale.item() == pytest.approx(4.0 / 255)
    assert zp.item() == round(1.0 / (4.0 / 255))  # code of 0.0 is -min/scale


def test_moving_average_follows_ema():
    obs = MovingAverageMinMaxObserver(SPECS[1], momentum=0.9)
    obs(torch.tensor([-1.0, 2.0]))
    obs(torch.tensor([-3.0, 6.0]))
    assert obs.min_val.item() == pytest.approx(0.9 * -1 + 0.1 * -3)
    assert obs.max_val.item() == pytest.approx(0.9 * 2 + 0.1 * 6)


def test_percentile_clips_outliers_like_numpy():
    rng = np.random.default_rng(1)
    x = rng.normal(size=200_000).astype(np.float32)
    x[:20] = 80.0  # 0.01% outliers
    obs = PercentileObserver(SPECS[0], percentile=99.9)
    for chunk in np.array_split(x, 4):
        obs(torch.from_numpy(chunk))
    lo, hi = obs.clip_range()
    expected = np.percentile(np.abs(x), 99.9)
    bin_width = float(x.max() - x.min()) / obs.bins
    assert hi.item() == pytest.approx(expected, abs=2 * bin_width)
    assert lo.item() == -hi.item()


def test_affine_percentile_both_tails():
    rng = np.random.default_rng(2)
    x = rng.exponential(size=100_000).astype(np.float32) - 0.5
    obs = PercentileObserver(SPECS[1], percentile=99.0)
    obs(torch.from_numpy(x))
    lo, hi = obs.clip_range()
    bin_width = float(x.max() - x.min()) / obs.bins
    assert lo.item() == pytest.approx(np.percentile(x, 1.0), abs=2 * bin_width)
    assert hi.item() == pytest.approx(np.percentile(x, 99.0), abs=2 * bin_width)


@pytest.mark.parametrize("spec", [SPECS[0], SPECS[1], QuantSpec(bits=4, signed=True)])
def test_mse_observer_near_brute_force_optimum(spec):
    """The histogram search must land within a few % of the best clip found by actually
    fake-quantizing the data at 200 candidate ranges."""
    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.laplace(size=20_000).astype(np.float32))
    obs = MSEObserver(spec)
    obs(x)
    scale, zp = obs.compute_qparams()
    chosen = torch.mean((fake_quantize(x, scale, zp, spec) - x) ** 2).item()

    def mse_at(t):
        ref = MinMaxObserver(spec)
        ref(x * t)
        s, z = ref.compute_qparams()
        return torch.mean((fake_quantize(x, s, z, spec) - x) ** 2).item()

    best = min(mse_at(t) for t in np.linspace(0.01, 1.0, 200))
    naive = mse_at(1.0)
    assert chosen <= best * 1.05
    assert chosen < naive


def test_histogram_rebinning_matches_single_pass():
    rng = np.random.default_rng(4)
    a = rng.normal(size=50_000).astype(np.float32)
    b = rng.normal(size=50_000).astype(np.float32) * 4  # range grows: old bins re-binned
    spec = SPECS[0]
    two = PercentileObserver(spec, percentile=99.0)
    two(torch.from_numpy(a))
    two(torch.from_numpy(b))
    expected = np.percentile(np.abs(np.concatenate([a, b])), 99.0)
    bin_width = float(max(a.max(), b.max()) - min(a.min(), b.min())) / two.bins
    assert two.clip_range()[1].item() == pytest.approx(expected, abs=3 * bin_width)


def test_per_channel_observer_checks_channel_count():
    obs = MinMaxObserver(SPECS[2], 4)
    with pytest.raises(BadInputError, match="expected 4 channels"):
        obs(torch.randn(3, 5))


def _bulk_mse(x: torch.Tensor, bulk: torch.Tensor, obs) -> float:
    """Fake-quant MSE on the `bulk` values, with the qparams `obs` chose after seeing `x`."""
    obs(x)
    scale, zp = obs.compute_qparams()
    return torch.mean((fake_quantize(bulk, scale, zp, obs.spec) - bulk) ** 2).item()


@pytest.mark.parametrize("spec", [SPECS[0], SPECS[1]])
def test_entropy_clips_far_outliers_and_beats_minmax_on_the_bulk(spec):
    rng = np.random.default_rng(5)
    bulk = torch.from_numpy(rng.normal(size=100_000).astype(np.float32))
    outliers = torch.tensor([35.0, -42.0, 50.0, -60.0, 55.0])
    x = torch.cat([bulk, outliers])
    obs = EntropyObserver(spec)
    mse = _bulk_mse(x, bulk, obs)
    lo, hi = obs.clip_range()
    assert 3.0 < hi.item() < 60.0 / 4  # the outliers go, the bulk (|x| < 4.5) stays
    assert -60.0 / 4 < lo.item() < -3.0
    assert mse < 0.5 * _bulk_mse(x, bulk, MinMaxObserver(spec))


@pytest.mark.parametrize(
    ("spec", "low"), [(SPECS[0], -1.0), (SPECS[1], 0.0), (SPECS[1], -1.0), (SPECS[3], -1.0)]
)
def test_entropy_keeps_the_range_of_uniform_data(spec, low):
    rng = np.random.default_rng(6)
    x = rng.uniform(low, 1.0, size=100_000).astype(np.float32)
    obs = EntropyObserver(spec)
    obs(torch.from_numpy(x))
    lo, hi = obs.clip_range()
    assert hi.item() >= 0.98 * x.max()
    assert lo.item() <= 0.98 * x.min() if low < 0 else lo.item() == x.min()


def _reference_kl_threshold(x: np.ndarray, bins: int = 2048, levels: int = 128) -> float:
    """Migacz, "8-bit Inference with TensorRT" (2017), written out candidate by candidate.

    The one point the slides leave open, Q = 0 where P > 0 (outliers folded into an empty bin),
    gets a count of 1e-4 there, as MXNet's TensorRT-style calibrator smooths.
    """
    hist, edges = np.histogram(np.abs(x), bins=bins, range=(0.0, float(np.abs(x).max())))
    hist = hist.astype(np.float64)
    best_kl, best_i = np.inf, bins
    for i in range(levels, bins + 1):  # i == bins: no clipping
        p = hist[:i].copy()
        p[i - 1] += hist[i:].sum()
        level = np.digitize(np.arange(i), np.linspace(0, i, levels + 1)) - 1
        merged = np.bincount(level, weights=hist[:i], minlength=levels)
        filled = np.bincount(level, weights=hist[:i] > 0, minlength=levels)
        q = np.where(hist[:i] > 0, merged[level] / np.maximum(filled[level], 1), 0.0)
        q[(p > 0) & (q == 0)] = 1e-4
        p, q = p / p.sum(), q / q.sum()
        kl = np.sum(p[p > 0] * np.log(p[p > 0] / q[p > 0]))
        if kl < best_kl:
            best_kl, best_i = kl, i
    return (best_i - 1 + 0.5) * (edges[1] - edges[0])  # the slides' (m + 0.5) * bin width


@pytest.mark.parametrize("dist", ["normal", "laplace", "student_t", "normal_outliers"])
def test_entropy_threshold_matches_reference_kl_search(dist):
    rng = np.random.default_rng(7)
    x = {
        "normal": lambda: rng.normal(size=200_000),
        "laplace": lambda: rng.laplace(size=200_000),
        "student_t": lambda: rng.standard_t(4, size=200_000),
        "normal_outliers": lambda: np.concatenate(
            [rng.normal(size=200_000), rng.uniform(-30, 30, size=8)]
        ),
    }[dist]().astype(np.float32)
    obs = EntropyObserver(SPECS[0])
    obs(torch.from_numpy(x))
    lo, hi = obs.clip_range()
    bin_width = float(np.abs(x).max()) / obs.bins
    assert hi.item() == pytest.approx(_reference_kl_threshold(x), abs=2 * bin_width)
    assert lo.item() == -hi.item()


def test_entropy_affine_relu_output_starts_at_zero():
    """Post-ReLU data: lo stays 0 (zero point 0), and the half of the values that are exactly
    0 does not drag the threshold into the bulk."""
    rng = np.random.default_rng(8)
    relu = np.maximum(rng.normal(size=200_000), 0).astype(np.float32)
    positive = relu[relu > 0]
    for x, most in [(relu, positive.max()), (np.append(relu, [40.0, 50.0]), 50.0 / 4)]:
        obs = EntropyObserver(SPECS[1])
        obs(torch.from_numpy(x))
        lo, hi = obs.clip_range()
        _, zp = obs.compute_qparams()
        assert lo.item() == 0.0 and zp.item() == 0
        assert np.percentile(positive, 99.9) < hi.item() <= most


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(bits=8, signed=True, symmetric=True, axis=1),
        QuantSpec(bits=8, signed=False, symmetric=False, axis=1),
    ],
)
def test_entropy_per_channel_matches_per_tensor_on_each_channel(spec):
    """Channels with different shapes (and, affine, different level counts) are searched
    independently: each gets what a per-tensor observer on that channel alone gets."""
    rng = np.random.default_rng(9)
    spiky = np.append(rng.normal(size=4_999), 40.0)
    channels = [spiky, np.maximum(rng.normal(size=5_000), 0), rng.uniform(-1, 1, size=5_000)]
    x = torch.from_numpy(np.stack(channels, axis=1).astype(np.float32).reshape(100, 3, 50))
    obs = EntropyObserver(spec, channels=3)
    obs(x)
    lo, hi = obs.clip_range()
    assert hi[0].item() < 40.0 / 4
    per_tensor = QuantSpec(bits=8, signed=spec.signed, symmetric=spec.symmetric)
    for c in range(3):
        ref = EntropyObserver(per_tensor, bins=obs.bins)
        ref(x[:, c])
        ref_lo, ref_hi = ref.clip_range()
        assert lo[c].item() == pytest.approx(ref_lo.item(), rel=1e-6)
        assert hi[c].item() == pytest.approx(ref_hi.item(), rel=1e-6)


def test_a_fixed_range_ignores_the_data_but_not_its_nans():
    """GELU's gate: a grid known from the function (frontend/lowering.py), which neither
    calibration, another observer choice nor a wider batch may move."""
    spec = QuantSpec(bits=8, signed=False, symmetric=False)
    fq = FakeQuantize(spec, fixed_range(0.0, 255 / 254))
    fq.update_qparams()
    fq(torch.linspace(-5, 5, 101))
    fq.reset_observer(MinMaxObserver)
    fq(torch.linspace(0, 0.3, 11))
    fq.update_qparams()
    scale, zero_point = fq.effective_qparams()
    assert float(scale) == pytest.approx(1 / 254, rel=1e-6) and int(zero_point) == 0
    # the grid: 0.5 is code 127, 1 is code 254 (quantize() is checked against onnxruntime)
    codes = quantize(torch.tensor([0.0, 0.5, 1.0]), scale, zero_point, spec)
    assert codes.tolist() == [0, 127, 254]
    with pytest.raises(BadInputError, match="NaN"):
        fq(torch.tensor([0.1, float("nan")]))
    with pytest.raises(BadInputError, match="fixed range"):
        FixedRangeObserver(spec, None, 1.0, 0.0)
