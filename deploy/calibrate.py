"""calibrate(): run data through a prepared model with observers on and fake-quant off (PTQ),
then freeze the ranges and switch fake quantization on.

Calibration data is checked first: a NaN, an all-zero batch or a wrong shape would otherwise
give silently wrong scales.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from rich.progress import Progress

from deploy.errors import BadInputError
from deploy.prepare import PreparedModel


def as_inputs(batch) -> tuple[torch.Tensor, ...]:
    """A batch as a tuple of model inputs: a tensor, an array, or a tuple/list of them.
    For (inputs, labels) pairs pass only the inputs."""
    items = batch if isinstance(batch, tuple | list) else (batch,)
    return tuple(torch.as_tensor(np.asarray(b)) if not torch.is_tensor(b) else b for b in items)


def check_batch(inputs: tuple[torch.Tensor, ...], index: int, expected: list[tuple[int, ...]]):
    """Refuse batches that would silently corrupt calibration."""
    if len(inputs) != len(expected):
        raise BadInputError(
            f"calibration batch {index} has {len(inputs)} inputs; the model takes {len(expected)}"
        )
    for x, shape in zip(inputs, expected, strict=True):
        if x.numel() == 0:
            raise BadInputError(f"calibration batch {index} is empty")
        if tuple(x.shape[1:]) != tuple(shape[1:]):
            raise BadInputError(
                f"calibration batch {index} has shape {tuple(x.shape)}; the model expects "
                f"(N, {', '.join(map(str, shape[1:]))})"
            )
        if x.is_floating_point():
            if not bool(torch.isfinite(x).all()):
                raise BadInputError(f"calibration batch {index} contains NaN or Inf values")
            if not bool(x.any()):
                raise BadInputError(f"calibration batch {index} is all zeros")


def calibrate(
    model: PreparedModel, batches: Iterable, *, max_batches: int | None = None, progress=True
) -> int:
    """Observe activation and weight ranges on `batches`; returns how many were used."""
    quantizers = model.quantizers()
    for fq in quantizers:
        fq.enable_observer(True).enable_fake_quant(False)
    model.eval()
    used = 0
    with torch.no_grad(), Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("calibrating", total=max_batches)
        for batch in batches:
            if max_batches is not None and used >= max_batches:
                break
            inputs = as_inputs(batch)
            check_batch(inputs, used, model.plan.input_shapes)
            model(*inputs)
            used += 1
            bar.advance(task)
    if used == 0:
        raise BadInputError("no calibration batches: the calibration data is empty")
    for fq in quantizers:
        fq.enable_observer(False).enable_fake_quant(True)
    return used
