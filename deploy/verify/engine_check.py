"""engine -> verdict: does an int8 engine compute its fake-quant model?

`deploy build` applies this check before it ships an engine, and the vendor benchmark applies
it to our rows, so that neither ships nor times an engine its runtime compiled wrong. A bound
against fp32 cannot see that: OpenVINO 2026.4 folded EdgeNeXt's positional-encoding branch 77%
wrong and the engine still read cosine 0.995 to fp32. The engine is compared with the fake-quant
model on the same inputs. Where the end-to-end bounds fail, it is accepted only if it matches its
QDQ model quantizer by quantizer (layer_debug.Faithfulness) and that file holds the model's
grids and weights (provenance): a deep model amplifies rounding flips at near-ties, while a
wrong kernel shows at one layer.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from qat_deploy.deploy.common.errors import CheckFailedError
from qat_deploy.deploy.data import input_pairs
from qat_deploy.deploy.frontend.prepare import PreparedModel
from qat_deploy.deploy.training.calibrate import call_model, first_tensor
from qat_deploy.deploy.verify import closeness, provenance
from qat_deploy.deploy.verify.layer_debug import Faithfulness, LayerDebug
from qat_deploy.models import ModelSpec

FAKEQUANT = "int8_vs_fakequant"
FP32 = "int8_vs_fp32"


class EngineAmplificationWarning(UserWarning):
    """The engine passed the per-layer check after failing the end-to-end one."""


def model_outputs(
    model: nn.Module, spec: ModelSpec, arrays: Mapping[str, np.ndarray], dtype: torch.dtype
) -> np.ndarray:
    """The model's first output on all samples in chunks of 64, floating inputs cast to `dtype`
    (token ids and masks stay integers)."""

    def cast(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(dtype) if tensor.is_floating_point() else tensor

    outputs, count = [], len(next(iter(arrays.values())))
    with torch.no_grad():
        for start in range(0, count, 64):
            by_name = {k: cast(torch.from_numpy(a[start : start + 64])) for k, a in arrays.items()}
            batch = by_name if spec.by_keyword else next(iter(by_name.values()))
            outputs.append(first_tensor(call_model(model, batch)))
    return torch.cat(outputs).to(torch.float32).numpy()


def engine_outputs(runner, arrays: Mapping[str, np.ndarray], batch: int) -> np.ndarray:
    """The engine's first output on all whole batches, inputs matched to the engine's names."""
    pairs = input_pairs(list(runner.get_input_metadata().keys()), arrays)
    count, outputs = len(next(iter(arrays.values()))), []
    for start in range(0, count - batch + 1, batch):
        feed = {e: arrays[a][start : start + batch] for e, a in pairs}
        outputs.append(next(iter(runner.infer(feed, check_inputs=False).values())))
    return np.concatenate(outputs)


def layer_feeds(
    qdq_path: Path, arrays: Mapping[str, np.ndarray], batch: int, samples: int
) -> list[dict[str, np.ndarray]]:
    """The first `samples` samples (at least one batch), in batches keyed by the QDQ model's
    input names: what layer_debug.analyse runs quantizer by quantizer."""
    names = [i.name for i in onnx.load(str(qdq_path), load_external_data=False).graph.input]
    pairs = input_pairs(names, arrays)
    count = len(next(iter(arrays.values())))
    n = max(batch, min(samples, (count // batch) * batch))
    return [{e: arrays[a][i : i + batch] for e, a in pairs} for i in range(0, n, batch)]


@dataclass(frozen=True)
class References:
    """What an engine is held to on one set of inputs, computed once per model."""

    float_out: np.ndarray
    fake_quant: np.ndarray
    #: the fake-quant model in float64 against itself in float32: the noise floor
    floor: Mapping[str, float]
    #: the fake-quant output's 8-bit step, the unit of the error bounds
    step: float


def references(
    model: nn.Module, prepared: PreparedModel, spec: ModelSpec, arrays: Mapping[str, np.ndarray]
) -> References:
    fake_quant = model_outputs(prepared, spec, arrays, torch.float32)
    step = closeness.range_step(fake_quant)
    in_float64 = model_outputs(prepared.in_float64(), spec, arrays, torch.float64)
    return References(
        float_out=model_outputs(model, spec, arrays, torch.float32),
        fake_quant=fake_quant,
        floor=closeness.compare(in_float64, fake_quant, step),
        step=step,
    )


def compare_engine(
    engine_out: np.ndarray, refs: References, bounds: closeness.Thresholds
) -> tuple[dict, dict[str, closeness.Thresholds]]:
    """The engine's metrics against the fake-quant model and fp32 (plus the floor and the
    thresholds that apply: `bounds` loosened to the model's own float64 floor)."""
    thresholds = {
        FAKEQUANT: closeness.floor_adjusted(bounds, refs.floor),
        FP32: closeness.DEFAULT_THRESHOLDS[FP32],
    }
    margin = closeness.decisive_margin(thresholds[FAKEQUANT])
    results = {
        FAKEQUANT: closeness.compare(engine_out, refs.fake_quant, refs.step, margin),
        FP32: closeness.compare(engine_out, refs.float_out, closeness.range_step(refs.float_out)),
        "reference_floor": dict(refs.floor),
        "thresholds": {k: dataclasses.asdict(v) for k, v in thresholds.items()},
    }
    return results, thresholds


def require_faithful(
    results: dict,
    bound: closeness.Thresholds,
    per_layer: Callable[[], Faithfulness | None],
) -> None:
    """Raise CheckFailedError unless the engine computes its fake-quant model: within `bound`
    end to end, or else (asking `per_layer` only then) quantizer by quantizer, which adds its
    verdict to `results` and warns EngineAmplificationWarning."""
    try:
        closeness.check(results[FAKEQUANT], bound, FAKEQUANT)
    except CheckFailedError as exc:
        faithful_per_layer(results, exc, per_layer())


def faithful_per_layer(results: dict, failure: CheckFailedError, verdict) -> None:
    """The end-to-end check failed: accept the engine only where it computes its QDQ model
    quantizer by quantizer, so the gap is the model amplifying rounding flips (random-weight
    MixNet-S: 30 output steps from 1-step flips in 0.026% of codes); otherwise fail naming the
    layer where the engine differs."""
    if verdict is None:
        raise failure
    results[f"{FAKEQUANT}_per_layer"] = verdict.to_dict()
    where = (
        f"{verdict.quantizers} quantizers recomputed from the engine's own upstream codes: "
        f"at most {verdict.worst_max_steps:g} step(s) apart (at {verdict.worst_layer}), "
        f"in at most {verdict.worst_mismatch:.3%} of codes"
    )
    if verdict.foreign:
        raise CheckFailedError(
            f"{failure}; the exported QDQ file quantizes {', '.join(verdict.foreign[:3])} on a "
            "scale or zero point the fake-quant model does not use"
        ) from failure
    if verdict.foreign_weights:
        raise CheckFailedError(
            f"{failure}; the exported QDQ file holds int8 weights "
            f"({', '.join(verdict.foreign_weights[:3])}) that no weight quantizer of the "
            "fake-quant model computes"
        ) from failure
    if not verdict.faithful:
        raise CheckFailedError(
            f"{failure}; the engine computes a layer differently: {where}"
        ) from failure
    warnings.warn(
        f"{failure}, but the engine matches its model layer by layer ({where}): the model "
        "amplifies rounding flips at near-ties; accepted",
        EngineAmplificationWarning,
        stacklevel=1,
    )


def per_layer_verdict(
    layers: LayerDebug, qdq_path: Path, prepared: PreparedModel
) -> Faithfulness | None:
    """The engine against its QDQ model quantizer by quantizer (`layers`: layer_debug.analyse of
    `qdq_path`), with what in the file the fake-quant model does not compute: activation grids
    it does not use, int8 weights none of its weight quantizers produce."""
    verdict = layers.faithfulness()
    if verdict is None:
        return None
    model = onnx.load(str(qdq_path))
    return dataclasses.replace(
        verdict,
        foreign=provenance.foreign_grids(model, prepared),
        foreign_weights=provenance.foreign_weights(model, prepared),
    )
