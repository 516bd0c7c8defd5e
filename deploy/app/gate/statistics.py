"""Statistics of the gate: the tolerance, the paired bootstrap interval of a latency ratio,
and the verdict it leads to."""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from qat_deploy.deploy.common.errors import BadInputError

DEFAULT_TOLERANCE = 0.10
RESAMPLES = 2000
CONFIDENCE = 0.95


def parse_tolerance(text: str) -> float:
    """ "10%" or "0.1" -> 0.1. A bare number >= 1 is refused: "10" could mean 10% or 1000%."""
    raw = str(text).strip()
    number = raw[:-1].strip() if raw.endswith("%") else raw
    hint = "expected a percentage such as 10% or a fraction such as 0.1"
    try:
        value = float(number)
    except ValueError:
        raise BadInputError(f"bad tolerance '{text}'; {hint}") from None
    if raw.endswith("%"):
        value /= 100
    elif value >= 1:
        raise BadInputError(f"ambiguous tolerance '{text}'; write it as {value:g}% or a fraction")
    if not 0 <= value <= 1:  # NaN fails too
        raise BadInputError(f"bad tolerance '{text}'; expected between 0% and 100%")
    return value


# ---- statistics ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RatioCI:
    """A latency ratio with its bootstrap confidence interval."""

    value: float
    low: float
    high: float
    confidence: float
    blocks: int


def bootstrap_ratio(
    candidate: np.ndarray,
    reference: np.ndarray,
    *,
    resamples: int = RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> tuple[RatioCI, np.ndarray]:
    """Median of the per-pair ratios of block medians, with a CI from resampling the pairs.

    The two blocks of a pair ran a few milliseconds apart, so a slower stretch of the machine
    (another job, a busy SMT sibling) scales both and cancels in their ratio; a ratio of the
    two overall medians could instead take each median from a different stretch. Returns the
    CI and the resampled ratios."""
    candidate, reference = np.asarray(candidate, float), np.asarray(reference, float)
    if candidate.shape != reference.shape or candidate.ndim != 1 or len(candidate) < 2:
        raise BadInputError(
            f"need paired block medians, at least 2 each; got {candidate.shape} and "
            f"{reference.shape}"
        )
    ratios = candidate / reference
    index = np.random.default_rng(seed).integers(0, len(ratios), (resamples, len(ratios)))
    samples = np.median(ratios[index], axis=1)
    low, high = np.quantile(samples, [(1 - confidence) / 2, (1 + confidence) / 2])
    return RatioCI(
        float(np.median(ratios)), float(low), float(high), confidence, len(ratios)
    ), samples


@dataclass(frozen=True)
class Verdict:
    measured: RatioCI  # candidate / reference, this run
    baseline: RatioCI  # the same ratio, as recorded
    change: RatioCI  # measured / baseline: > 1 means slower than the baseline
    tolerance: float
    #: candidate / pinned candidate (the int8 file the baseline measured), this run; 1 means
    #: unchanged. None when the baseline pins no candidate.
    pinned: RatioCI | None = None
    #: the candidate is the pinned file byte for byte, so `pinned` is exactly 1, not timed
    same_as_pinned: bool = False

    @property
    def slower_than_baseline(self) -> bool:
        return self.change.low > 1 + self.tolerance

    @property
    def slower_than_pinned(self) -> bool:
        return self.pinned is not None and self.pinned.low > 1 + self.tolerance

    @property
    def regression(self) -> bool:
        """The pinned comparison decides where there is one (see the module docstring)."""
        return self.slower_than_pinned if self.pinned is not None else self.slower_than_baseline


def decide(
    candidate_blocks: np.ndarray,
    reference_blocks: np.ndarray,
    baseline: RatioCI,
    tolerance: float,
    *,
    pinned_blocks: np.ndarray | None = None,
    same_as_pinned: bool = False,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> Verdict:
    """The gate's decision from per-block medians of one interleaved run. With pinned_blocks
    (the pinned int8 candidate, timed in the same rounds) candidate / pinned is judged too:
    its expected value is exactly 1, so it needs no recorded ratio and carries no drift of the
    int8/fp32 ratio (see the module docstring). same_as_pinned (the candidate is the pinned
    file) makes that comparison exactly 1 without timing."""
    measured, samples = bootstrap_ratio(
        candidate_blocks, reference_blocks, resamples=resamples, seed=seed
    )
    z = NormalDist().inv_cdf(0.5 + baseline.confidence / 2)
    sigma = (math.log(baseline.high) - math.log(baseline.low)) / (2 * z)
    draws = baseline.value * np.exp(np.random.default_rng([seed, 1]).normal(0, sigma, resamples))
    low, high = np.quantile(samples / draws, [(1 - CONFIDENCE) / 2, (1 + CONFIDENCE) / 2])
    change = RatioCI(
        measured.value / baseline.value, float(low), float(high), CONFIDENCE, measured.blocks
    )
    pinned = None
    if same_as_pinned:
        pinned = RatioCI(1.0, 1.0, 1.0, CONFIDENCE, measured.blocks)
    elif pinned_blocks is not None:
        pinned, _ = bootstrap_ratio(candidate_blocks, pinned_blocks, resamples=resamples, seed=seed)
    return Verdict(measured, baseline, change, tolerance, pinned, same_as_pinned)
