"""Choosing among calibration variants (activation observer, SmoothQuant strength) by how
close each one's fake-quant output comes to the float model's.

Each candidate is set up on a copy of the prepared model, calibrated on the first half of the
calibration batches and scored (mean output cosine vs float) on the other half: a choice
scored on the samples it was fitted to favours ranges fitted to few samples' maxima (random
LeViT smoothing: 0.9951 vs 0.9946 there, 0.973 vs 0.994 held out). The first candidate is
the default, and another wins only by a clear margin (CLEAR_GAIN).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping

import numpy as np
import torch
from torch import nn

from qat_deploy.deploy.frontend.prepare import OBSERVERS, PreparedModel
from qat_deploy.deploy.training.calibrate import calibrate, call_model, first_tensor
from qat_deploy.deploy.verify.closeness import mean_cosine

#: a candidate must leave at most this fraction of the default's output error (1 - cosine) on
#: held-out calibration samples: smaller gains were noise of a few samples (random LeViT: 4%
#: less error on 16 samples, 2x more on 32 others); outlier-laden MiniLM smoothing: 83% less
CLEAR_GAIN = 0.75

#: sets a candidate up on a copy of the prepared model, given the batches it calibrates on
Setup = Callable[[PreparedModel, list], None]


@torch.no_grad()
def choose(
    prepared: PreparedModel, model: nn.Module, batches: list, candidates: Mapping[str, Setup]
) -> tuple[str, dict[str, float]]:
    """The name of the candidate whose fake-quant output comes closest to `model`'s, with
    every candidate's held-out mean cosine; the first candidate unless another clearly wins."""
    half = len(batches) // 2
    fit, held_out = (batches[:half], batches[half:]) if half else (batches, batches)
    reference = outputs(model, held_out)
    scores = {}
    for name, setup in candidates.items():
        trial = copy.deepcopy(prepared)
        setup(trial, fit)
        calibrate(trial, fit, progress=False)
        scores[name] = mean_cosine(reference, outputs(trial, held_out))
    default = next(iter(candidates))
    best = max(scores, key=scores.__getitem__)
    if 1.0 - scores[best] > CLEAR_GAIN * (1.0 - scores[default]):
        return default, scores  # within noise of the default
    return best, scores


def outputs(model: nn.Module, batches: list) -> np.ndarray:
    """The model's first output tensor over `batches`, stacked, in float64."""
    model.eval()
    return torch.cat([first_tensor(call_model(model, b)) for b in batches]).double().numpy()


def choose_observer(
    prepared: PreparedModel, model: nn.Module, batches: list
) -> tuple[str, dict[str, float]]:
    """choose() among the target's activation observers (BackendRules.auto_observers)."""

    def observed_by(name: str) -> Setup:
        return lambda trial, fit: use_observer(trial, name)

    names = prepared.rules.auto_observers
    return choose(prepared, model, batches, {name: observed_by(name) for name in names})


def use_observer(prepared: PreparedModel, name: str) -> None:
    """Observe activations with OBSERVERS[name] from the next calibration on."""
    for quantizer in prepared.activation_quantizers():
        quantizer.reset_observer(OBSERVERS[name])
