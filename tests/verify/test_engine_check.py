"""The engine-vs-fake-quant verdict that deploy build and the vendor benchmark share."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from qat_deploy.deploy.common import errors
from qat_deploy.deploy.verify import engine_check
from qat_deploy.deploy.verify.closeness import Thresholds
from qat_deploy.deploy.verify.engine_check import (
    EngineAmplificationWarning,
    References,
    compare_engine,
    faithful_per_layer,
    require_faithful,
)
from qat_deploy.deploy.verify.layer_debug import Faithfulness
from qat_deploy.models import ModelSpec
from qat_deploy.models.inputs import InputSpec


def _failure() -> errors.CheckFailedError:
    return errors.CheckFailedError("int8_vs_fakequant: accuracy check failed: cosine 0.98")


@pytest.mark.parametrize(
    ("steps", "mismatch", "foreign", "accepted"),
    [
        (1.0, 0.0003, (), True),
        (3.0, 0.0003, (), False),
        (1.0, 0.2, (), False),
        (1.0, 0.0, ("relu",), False),
    ],
)
def test_an_engine_failing_end_to_end_passes_only_when_every_layer_matches(
    steps, mismatch, foreign, accepted
):
    """Amplified rounding flips (each quantizer at most one step off, rarely) are accepted with
    a warning and the verdict in the results; a layer off by more, often, or a file quantizing
    on a grid the model has not keep the check failing."""
    verdict = Faithfulness(40, "block.3", steps, mismatch, foreign)
    results = {"int8_vs_fakequant": {}}
    if accepted:
        with pytest.warns(EngineAmplificationWarning, match="block.3"):
            faithful_per_layer(results, _failure(), verdict)
    else:
        with pytest.raises(errors.CheckFailedError, match="relu" if foreign else "block.3"):
            faithful_per_layer(results, _failure(), verdict)
    assert results["int8_vs_fakequant_per_layer"]["faithful"] is accepted


def test_a_file_holding_weights_the_model_does_not_compute_fails_naming_them():
    """Each quantizer matches, but against a file whose weights are not the model's: the
    engine computes the file, not the model."""
    verdict = Faithfulness(40, "block.3", 1.0, 0.0, foreign_weights=("conv1.weight_q",))
    results = {"int8_vs_fakequant": {}}
    with pytest.raises(errors.CheckFailedError, match="int8 weights \\(conv1.weight_q\\)"):
        faithful_per_layer(results, _failure(), verdict)
    assert results["int8_vs_fakequant_per_layer"]["faithful"] is False


def test_an_engine_that_cannot_report_its_layers_keeps_the_end_to_end_failure():
    failure = _failure()
    with pytest.raises(errors.CheckFailedError) as raised:
        faithful_per_layer({}, failure, None)
    assert raised.value is failure


def _references(fake_quant: np.ndarray) -> References:
    """A floor of exact float64 agreement, so the default bounds apply unloosened."""
    floor = {"cosine": 1.0, "top1_agreement": 1.0, "p999_err_steps": 0.0}
    return References(fake_quant, fake_quant, floor, step=float(np.ptp(fake_quant)) / 255)


def test_an_engine_within_the_bounds_never_asks_for_the_per_layer_run():
    fake_quant = np.random.default_rng(0).normal(size=(16, 10))
    engine = fake_quant + 0.5 * (np.ptp(fake_quant) / 255)  # half a step off everywhere
    results, thresholds = compare_engine(engine, _references(fake_quant), Thresholds())

    def per_layer():
        raise AssertionError("asked for the per-layer run")

    require_faithful(results, thresholds["int8_vs_fakequant"], per_layer)
    assert "int8_vs_fakequant_per_layer" not in results


def test_an_engine_off_by_many_steps_fails_naming_the_layer_the_per_layer_run_finds():
    rng = np.random.default_rng(1)
    fake_quant = rng.normal(size=(16, 10))
    engine = fake_quant + rng.normal(size=fake_quant.shape) * 20 * (np.ptp(fake_quant) / 255)
    results, thresholds = compare_engine(engine, _references(fake_quant), Thresholds())
    wrong = Faithfulness(40, "layer_norm_5", 60.0, 0.9, ())
    with pytest.raises(errors.CheckFailedError, match="p999_err_steps.*layer_norm_5"):
        require_faithful(results, thresholds["int8_vs_fakequant"], lambda: wrong)
    assert results["int8_vs_fakequant_per_layer"]["faithful"] is False


def test_the_floor_loosens_the_bounds_for_a_model_that_drifts_from_itself_in_float64():
    fake_quant = np.random.default_rng(2).normal(size=(16, 10))
    noisy = References(
        fake_quant,
        fake_quant,
        {"cosine": 0.99, "top1_agreement": 0.9, "p999_err_steps": 9.0},
        step=float(np.ptp(fake_quant)) / 255,
    )
    _, thresholds = compare_engine(fake_quant, noisy, Thresholds())
    bound = thresholds["int8_vs_fakequant"]
    assert bound.min_cosine == pytest.approx(0.98)
    assert bound.max_p999_err_steps == pytest.approx(18.0)


class _TwoInputs(nn.Module):
    def forward(self, input_ids: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return input_ids.to(scale.dtype) * scale


def test_model_outputs_cast_floating_inputs_only_and_cover_every_sample():
    """Token ids stay integers; the float input takes the dtype asked for (float64 is the
    floor's); chunks of 64 are stitched back in order."""
    inputs = (InputSpec("input_ids", (1, 3), "int64"), InputSpec("scale", (1, 3), "float32"))
    spec = ModelSpec("two", _TwoInputs, inputs=inputs, by_keyword=True)
    ids = np.arange(100 * 3, dtype=np.int64).reshape(100, 3)
    scale = np.full((100, 3), 1 / 3, np.float32)
    out = engine_check.model_outputs(
        _TwoInputs(), spec, {"input_ids": ids, "scale": scale}, torch.float64
    )
    assert out.shape == (100, 3)
    np.testing.assert_allclose(out, ids / 3, rtol=1e-7)
