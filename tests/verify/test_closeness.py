"""Accuracy metrics on hand-computed arrays, and the threshold gate."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest

from qat_deploy.deploy.common import errors
from qat_deploy.deploy.common.errors import BadInputError, CheckFailedError
from qat_deploy.deploy.verify.closeness import (
    DEFAULT_THRESHOLDS,
    FLOOR_FACTOR,
    METRICS,
    Thresholds,
    check,
    compare,
    floor_adjusted,
    range_step,
    top1_accuracy,
)

REF = np.array([[0, 1, 2], [2, 1, 0], [0, 0, 1], [1, 0, 0]], dtype=np.float32)
ENG = np.array([[0, 1, 2], [2, 1, 0.5], [0, 0, 1], [0, 3, 0]], dtype=np.float32)


def test_compare_matches_hand_computed_metrics():
    metrics = compare(ENG, REF, step=0.5)
    assert (
        set(metrics)
        == set(METRICS)
        == {
            "top1_agreement",
            "max_err_steps",
            "p999_err_steps",
            "cosine",
            "samples",
            "top1_agreement_decisive",
            "decisive_samples",
            "decisive_margin_steps",
        }
    )
    assert metrics["samples"] == 4
    # every reference margin is 1 = 2 steps of 0.5, under the 8-step decisive margin
    assert metrics["decisive_samples"] == 0 and metrics["top1_agreement_decisive"] == 1.0
    assert metrics["top1_agreement"] == 0.75  # only the last sample's argmax moved (0 -> 1)
    # |diff| / 0.5 is 1 (sample 1), 2 and 6 (sample 3), nine zeros; 99.9th percentile of the
    # 12 values interpolates between the two largest at position 0.999 * 11 = 10.989.
    assert metrics["max_err_steps"] == 6.0
    assert metrics["p999_err_steps"] == pytest.approx(2 + 0.989 * 4)
    # per-sample cosines: 1, 5 / sqrt(5.25 * 5), 1, 0 (orthogonal)
    assert metrics["cosine"] == pytest.approx((2 + 5 / math.sqrt(26.25)) / 4)


def test_identical_outputs_agree_perfectly():
    metrics = compare(REF, REF.copy(), step=0.1)
    assert metrics == {
        "top1_agreement": 1.0,
        "max_err_steps": 0.0,
        "p999_err_steps": 0.0,
        "cosine": pytest.approx(1.0),
        "samples": 4,
        "top1_agreement_decisive": 1.0,
        "decisive_samples": 4,  # margins of 1 are 10 steps of 0.1
        "decisive_margin_steps": 8.0,
    }


def test_cosine_of_zero_vectors():
    zero, one = np.zeros((1, 3)), np.ones((1, 3))
    assert compare(zero, zero, step=1.0)["cosine"] == 1.0
    assert compare(zero, one, step=1.0)["cosine"] == 0.0


def test_argmax_is_taken_along_the_last_axis_per_position():
    ref = np.zeros((2, 3, 4))
    ref[..., 1] = 1.0
    eng = ref.copy()
    eng[0, 2] = [5, 0, 0, 0]  # one of six positions moves
    assert compare(eng, ref, step=1.0)["top1_agreement"] == pytest.approx(5 / 6)


def test_missing_step_is_derived_from_the_reference_range_and_said(caplog):
    ref = np.array([[0.0, 2.55], [1.0, 1.0]])
    eng = ref + np.array([[0.0, 0.03], [0.0, 0.0]])
    assert range_step(ref) == pytest.approx(0.01)
    with caplog.at_level(logging.WARNING, logger="qat_deploy.deploy.verify.closeness"):
        metrics = compare(eng, ref, step=None)
    assert metrics["max_err_steps"] == pytest.approx(3.0)
    assert "(max - min) / 255" in caplog.text


def test_constant_reference_has_no_derivable_step():
    with pytest.raises(BadInputError, match="constant"):
        compare(np.ones((2, 3)), np.ones((2, 3)), step=None)


@pytest.mark.parametrize("step", [0, -1.0, float("nan"), float("inf"), True, "0.1"])
def test_bad_steps_are_rejected(step):
    with pytest.raises(BadInputError, match="step"):
        compare(ENG, REF, step=step)


def test_numpy_scalar_step_is_accepted():
    assert compare(ENG, REF, step=np.float32(0.5))["max_err_steps"] == 6.0


@pytest.mark.parametrize(
    "engine, reference, message",
    [
        (np.zeros((4, 3)), np.zeros((4, 2)), "does not match"),
        (np.zeros(4), np.zeros(4), "batch first"),
        (np.zeros((0, 3)), np.zeros((0, 3)), "batch first"),
        (np.zeros((1, 2)), np.array([[0.0, np.nan]]), "NaN"),
    ],
)
def test_unusable_outputs_are_bad_input(engine, reference, message):
    with pytest.raises(BadInputError, match=message):
        compare(engine, reference, step=1.0)


def test_nan_engine_output_fails_every_bound():
    eng = ENG.copy()
    eng[0, 0] = np.nan
    metrics = compare(eng, REF, step=0.5)
    with pytest.raises(CheckFailedError) as info:
        check(metrics, Thresholds(min_top1_agreement=None), "int8_vs_fakequant")
    assert "cosine nan" in str(info.value) and "p999_err_steps nan" in str(info.value)


def _metrics(**changes: float) -> dict[str, float]:
    return {**compare(REF, REF, step=1.0), **changes}


def test_flips_between_classes_tied_within_int8_resolution_do_not_fail_the_check():
    """Sample 0's two top logits differ by 1 step: an int8 engine may swap them. Sample 1's
    differ by 20 steps: swapping those is a real disagreement."""
    ref = np.array([[1.0, 1.1, 0.0], [0.0, 2.0, 0.0]])
    tied_flip = np.array([[1.1, 1.0, 0.0], [0.0, 2.0, 0.0]])
    metrics = compare(tied_flip, ref, step=0.1)
    assert metrics["top1_agreement"] == 0.5 and metrics["top1_agreement_decisive"] == 1.0
    check(metrics, Thresholds(max_p999_err_steps=None, min_cosine=None), "tied")
    real_flip = np.array([[1.0, 1.1, 0.0], [2.0, 0.0, 0.0]])
    with pytest.raises(CheckFailedError, match="top1_agreement_decisive 0"):
        check(
            compare(real_flip, ref, step=0.1),
            Thresholds(max_p999_err_steps=None, min_cosine=None),
            "real",
        )


def test_check_passes_at_and_within_the_bounds():
    check(_metrics(top1_agreement=0.999, cosine=0.999, p999_err_steps=4.0), Thresholds(), "x")


def test_check_names_metric_value_and_threshold_in_one_line():
    with pytest.raises(CheckFailedError) as info:
        check(_metrics(top1_agreement_decisive=0.99), Thresholds(), "int8_vs_fakequant")
    message = str(info.value)
    assert len(message.splitlines()) == 1
    assert "int8_vs_fakequant" in message
    assert "top1_agreement_decisive 0.99 (required >= 0.999)" in message
    assert "cosine" not in message
    assert info.value.exit_code == errors.CHECK_FAILED


def test_check_lists_every_violation_and_skips_unset_bounds():
    bad = _metrics(top1_agreement=0.5, cosine=0.8, p999_err_steps=9.0)
    with pytest.raises(CheckFailedError) as info:
        check(bad, Thresholds(min_top1_agreement=None, min_cosine=0.9, max_p999_err_steps=5), "y")
    message = str(info.value)
    assert "cosine 0.8 (required >= 0.9)" in message
    assert "p999_err_steps 9 (required <= 5)" in message
    assert "top1_agreement" not in message
    check(bad, Thresholds(None, None, None), "y")


def test_default_thresholds_per_comparison():
    strict = DEFAULT_THRESHOLDS["int8_vs_fakequant"]
    assert strict == Thresholds() and strict.min_top1_agreement == 0.999
    loose = DEFAULT_THRESHOLDS["int8_vs_fp32"]
    check(_metrics(top1_agreement=0.9, cosine=0.97, p999_err_steps=40.0), loose, "int8_vs_fp32")
    with pytest.raises(CheckFailedError, match="cosine"):
        check(_metrics(cosine=0.5), loose, "int8_vs_fp32")


def test_top1_accuracy():
    assert top1_accuracy(REF, np.array([2, 0, 2, 1])) == 0.75
    with pytest.raises(BadInputError, match="labels"):
        top1_accuracy(REF, np.array([2, 0]))


def test_a_noisy_reference_floor_loosens_the_bounds_by_the_floor_factor():
    """Random MobileNetV2's float64-vs-float32 floor: cosine 0.9976, p99.9 8.8 steps."""
    floor = _metrics(cosine=0.9976, p999_err_steps=8.8, top1_agreement_decisive=0.99)
    loose = floor_adjusted(Thresholds(), floor)
    assert loose.min_cosine == pytest.approx(1 - FLOOR_FACTOR * 0.0024)
    assert loose.max_p999_err_steps == pytest.approx(FLOOR_FACTOR * 8.8)
    assert loose.min_top1_agreement == pytest.approx(1 - FLOOR_FACTOR * 0.01)
    engine = _metrics(cosine=0.9968, p999_err_steps=10.2)  # measured on OpenVINO
    check(engine, loose, "int8_vs_fakequant")
    with pytest.raises(CheckFailedError, match="cosine"):
        check(engine, Thresholds(), "int8_vs_fakequant")
    with pytest.raises(CheckFailedError, match="p999_err_steps"):
        check(_metrics(p999_err_steps=2.5 * 8.8), loose, "int8_vs_fakequant")


def test_a_quiet_floor_never_tightens_the_bounds():
    strict = Thresholds(min_top1_agreement=0.99, min_cosine=0.998, max_p999_err_steps=4.0)
    assert floor_adjusted(strict, _metrics()) == strict  # a perfect floor: compare(REF, REF)
    unchecked = Thresholds(None, None, None)
    assert floor_adjusted(unchecked, _metrics(cosine=0.5, p999_err_steps=99)) == unchecked


def test_the_decisive_margin_grows_with_the_error_the_thresholds_allow():
    """A flip across a 20-step margin is decisive while each logit may move 4 steps; where the
    model's own float noise loosened that to 12 steps, both logits may move 12, so it is not."""
    from qat_deploy.deploy.verify.closeness import decisive_margin

    ref = np.array([[0.0, 2.0, 0.0]])
    flip = np.array([[2.0, 0.0, 0.0]])
    strict, loose = Thresholds(), Thresholds(max_p999_err_steps=12.0)
    assert decisive_margin(strict) == 8.0 and decisive_margin(loose) == 24.0
    assert compare(flip, ref, 0.1, decisive_margin(strict))["top1_agreement_decisive"] == 0.0
    assert compare(flip, ref, 0.1, decisive_margin(loose))["top1_agreement_decisive"] == 1.0
