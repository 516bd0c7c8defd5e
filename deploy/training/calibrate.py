"""calibrate(): run data through a prepared model with observers on and fake-quant off (PTQ),
then freeze the ranges and switch fake quantization on. A batch is a tensor, a tuple of
positional tensors, or a dict of keyword tensors (multi-input models).

Calibration data is checked first: a NaN, an all-zero batch or a wrong shape would otherwise
give silently wrong scales.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch
from rich.progress import Progress

from qat_deploy.deploy.common.errors import BadInputError
from qat_deploy.deploy.frontend.prepare import PreparedModel


def as_inputs(batch) -> tuple[torch.Tensor, ...]:
    """A batch as a tuple of model inputs: a tensor, an array, or a tuple/list of them.
    For (inputs, labels) pairs pass only the inputs."""
    items = batch if isinstance(batch, tuple | list) else (batch,)
    return tuple(_tensor(b) for b in items)


def _tensor(x) -> torch.Tensor:
    return x if torch.is_tensor(x) else torch.as_tensor(np.asarray(x))


def call_model(model, batch):
    """Run one batch: a dict of named inputs as keyword arguments (multi-input models such as
    transformers taking input_ids and attention_mask), anything else positionally."""
    if isinstance(batch, Mapping):
        return model(**{name: _tensor(x) for name, x in batch.items()})
    return model(*as_inputs(batch))


def first_tensor(output) -> torch.Tensor:
    """A model's first tensor output: models returning tuples, dicts or a Hugging Face
    ModelOutput (an OrderedDict) are compared and trained on their first tensor (the logits)."""
    found = _first(output)
    if found is None:
        raise BadInputError(f"the model returned {type(output).__name__}, which holds no tensor")
    return found


def _first(output) -> torch.Tensor | None:
    if torch.is_tensor(output):
        return output
    if isinstance(output, Mapping):
        output = list(output.values())
    if isinstance(output, tuple | list):
        return next((t for t in map(_first, output) if t is not None), None)
    return None


def _positional(batch, names: list[str]) -> tuple[torch.Tensor, ...]:
    """A batch as inputs in the captured graph's order: by name when the names match, else
    in the batch's own order."""
    if not isinstance(batch, Mapping):
        return as_inputs(batch)
    if set(batch) == set(names):
        return tuple(_tensor(batch[n]) for n in names)
    return tuple(_tensor(x) for x in batch.values())


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
        fq.defer_qparams = True
    model.eval()
    used = 0
    try:
        with torch.no_grad(), Progress(disable=not progress, transient=True) as bar:
            task = bar.add_task("calibrating", total=max_batches)
            for batch in batches:
                if max_batches is not None and used >= max_batches:
                    break
                inputs = _positional(batch, model.plan.input_names)
                check_batch(inputs, used, model.plan.input_shapes)
                call_model(model, batch)
                used += 1
                bar.advance(task)
    finally:
        for fq in quantizers:
            fq.defer_qparams = False
    if used == 0:
        raise BadInputError("no calibration batches: the calibration data is empty")
    for fq in quantizers:
        if fq.observer.has_data:  # a quantizer the data never reached keeps its qparams
            fq.update_qparams()
        fq.enable_observer(False).enable_fake_quant(True)
    return used
