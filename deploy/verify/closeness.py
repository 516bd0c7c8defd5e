"""Accuracy of an engine against a reference (fake-quant PyTorch, fp32), on the same inputs.

Backend-independent: everything here takes numpy arrays, batch first. Errors are measured in
output quantization steps, because "0.03 off" means nothing without the scale: an int8 engine
that matches its fake-quant model is off by at most a step or two, whatever the logit range.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from qat_deploy.deploy.common.errors import BadInputError, CheckFailedError

log = logging.getLogger(__name__)

METRICS = (
    "top1_agreement",
    "max_err_steps",
    "p999_err_steps",
    "cosine",
    "samples",
    "top1_agreement_decisive",
    "decisive_samples",
    "decisive_margin_steps",
)
#: A flip of the arg-max counts as a disagreement only where the reference's top-1 / top-2
#: margin exceeds this many output steps: twice the per-logit error an int8 engine is allowed
#: (Thresholds.max_p999_err_steps), since both logits may move. Below it, the two classes are
#: tied within int8 resolution (common for random-weight models with 1000 classes).
DECISIVE_MARGIN_STEPS = 8.0


def range_step(reference: np.ndarray) -> float:
    """An 8-bit step for an unquantized output: its observed range over 255 levels."""
    reference = np.asarray(reference, dtype=np.float64)
    step = float(reference.max() - reference.min()) / 255
    if not step > 0:
        raise BadInputError(
            "reference output is constant: cannot derive a quantization step; pass one"
        )
    return step


def compare(
    engine_outputs: np.ndarray,
    reference_outputs: np.ndarray,
    step: float | None,
    decisive_margin_steps: float = DECISIVE_MARGIN_STEPS,
) -> dict[str, float]:
    """Agreement metrics of engine vs reference outputs (N x ... x classes, batch first).

    step: the output quantization step (the scale of the last activation quantizer when the
    output is quantized). None derives one from the reference's range and logs that it did.
    decisive_margin_steps: the top-1 / top-2 margin, in steps, above which an arg-max flip
    counts (twice the per-logit error allowed; see decisive_margin).
    """
    engine = np.asarray(engine_outputs, dtype=np.float64)
    reference = np.asarray(reference_outputs, dtype=np.float64)
    _check_pair(engine, reference)
    if step is None:
        step = range_step(reference)
        log.warning(
            "no output quantization step given: using (max - min) / 255 of the reference "
            "output = %.6g",
            step,
        )
    if isinstance(step, bool) or not isinstance(step, numbers.Real) or not 0 < step < math.inf:
        raise BadInputError(f"bad output quantization step {step!r}; expected a positive number")
    step = float(step)
    err_steps = np.abs(engine - reference) / step
    agree = engine.argmax(-1) == reference.argmax(-1)
    top2 = np.sort(reference, axis=-1)[..., -2:]
    decisive = (top2[..., 1] - top2[..., 0]) / step > decisive_margin_steps
    return {
        "top1_agreement": float(np.mean(agree)),
        "top1_agreement_decisive": float(np.mean(agree[decisive])) if decisive.any() else 1.0,
        "decisive_samples": int(decisive.sum()),
        "decisive_margin_steps": float(decisive_margin_steps),
        "max_err_steps": float(err_steps.max()),
        "p999_err_steps": float(np.percentile(err_steps, 99.9)),
        "cosine": mean_cosine(engine, reference),
        "samples": len(engine),
    }


def _check_pair(engine: np.ndarray, reference: np.ndarray) -> None:
    if engine.shape != reference.shape:
        raise BadInputError(
            f"engine output shape {engine.shape} does not match reference shape {reference.shape}"
        )
    if engine.ndim < 2 or engine.size == 0:
        raise BadInputError(
            f"outputs must be batch first with a class/feature axis, got shape {engine.shape}"
        )
    if not np.isfinite(reference).all():
        raise BadInputError("reference output contains NaN or Inf")


def sqnr_db(reference: np.ndarray, approximation: np.ndarray) -> float:
    """10 log10(signal power / error power) in float64; inf when they are equal."""
    reference = np.asarray(reference, np.float64)
    signal = float(np.square(reference).sum())
    noise = float(np.square(reference - np.asarray(approximation, np.float64)).sum())
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(signal / noise) if signal > 0 else -math.inf


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Per-sample cosine (each sample flattened), averaged; two zero vectors agree (1), one
    zero vector does not (0)."""
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    dots = np.einsum("ij,ij->i", a, b)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    both_zero = ~a.any(axis=1) & ~b.any(axis=1)
    cos = np.divide(dots, norms, out=np.where(both_zero, 1.0, 0.0), where=norms != 0)
    return float(cos.mean())  # NaN outputs give NaN norms, hence a NaN mean: a failed check


@dataclass(frozen=True)
class Thresholds:
    """Bounds a comparison must meet; None leaves a metric reported but unchecked.

    The defaults are for an int8 engine against its own fake-quant model, which computes the
    same quantized function: every argmax should agree and errors stay within a few steps.
    """

    min_top1_agreement: float | None = 0.999
    min_cosine: float | None = 0.999
    max_p999_err_steps: float | None = 4.0


#: An engine may drift from its fake-quant model up to this many times as far as that same
#: model drifts from itself when evaluated in float64 instead of float32. Both drifts are
#: rounding flips at near-ties (accumulation order, bias and requantization rounding) that a
#: deep network amplifies; on random MobileNetV2 the float64 floor alone is cosine 0.9976 and
#: 9 output steps at p99.9, so fixed int8 bounds would fail every correct engine.
FLOOR_FACTOR = 2.0


def floor_adjusted(
    thresholds: Thresholds, floor: Mapping[str, float], factor: float = FLOOR_FACTOR
) -> Thresholds:
    """`thresholds`, loosened where `factor` x the reference floor (compare() of the float64
    against the float32 fake-quant outputs) needs more room; never tightened."""

    def looser_min(bound: float | None, floor_value: float) -> float | None:
        return None if bound is None else min(bound, 1 - factor * (1 - floor_value))

    max_steps = thresholds.max_p999_err_steps
    return Thresholds(
        min_top1_agreement=looser_min(
            thresholds.min_top1_agreement,
            floor.get("top1_agreement_decisive", floor["top1_agreement"]),
        ),
        min_cosine=looser_min(thresholds.min_cosine, floor["cosine"]),
        max_p999_err_steps=None
        if max_steps is None
        else max(max_steps, factor * floor["p999_err_steps"]),
    )


def decisive_margin(thresholds: Thresholds) -> float:
    """A flip is decisive beyond twice the per-logit error the thresholds allow (both logits
    may move by it): 8 steps by default, more where the model's float floor loosened them."""
    bound = thresholds.max_p999_err_steps
    return DECISIVE_MARGIN_STEPS if bound is None else max(DECISIVE_MARGIN_STEPS, 2 * bound)


#: Per comparison label. Against fp32 the quantization error itself is expected, so only
#: gross breakage (a low cosine) fails; agreement is reported, since it depends on the model.
DEFAULT_THRESHOLDS: Mapping[str, Thresholds] = {
    "int8_vs_fakequant": Thresholds(),
    "int8_vs_fp32": Thresholds(min_top1_agreement=None, min_cosine=0.9, max_p999_err_steps=None),
}


def check(metrics: Mapping[str, float], thresholds: Thresholds, label: str) -> None:
    """Raise CheckFailedError naming every violated bound (NaN metrics violate all bounds)."""
    agreement = (
        "top1_agreement_decisive" if "top1_agreement_decisive" in metrics else ("top1_agreement")
    )
    bounds = (
        (agreement, thresholds.min_top1_agreement, ">="),
        ("cosine", thresholds.min_cosine, ">="),
        ("p999_err_steps", thresholds.max_p999_err_steps, "<="),
    )
    failures = []
    for metric, bound, op in bounds:
        if bound is None:
            continue
        value = metrics[metric]
        ok = value >= bound if op == ">=" else value <= bound
        if not ok:
            failures.append(f"{metric} {value:.6g} (required {op} {bound:g})")
    if failures:
        raise CheckFailedError(
            f"{label}: accuracy check failed: {'; '.join(failures)} over {metrics['samples']} "
            "samples"
        )


def top1_accuracy(outputs: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of samples whose argmax over the last axis equals the label."""
    outputs, labels = np.asarray(outputs), np.asarray(labels)
    if outputs.ndim != 2 or not len(outputs) or labels.shape != (len(outputs),):
        raise BadInputError(
            f"top-1 accuracy needs N x classes outputs and N labels, got {outputs.shape} "
            f"and {labels.shape}"
        )
    return float(np.mean(outputs.argmax(-1) == labels))
