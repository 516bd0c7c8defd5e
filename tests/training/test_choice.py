"""Calibration choices on held-out calibration samples (deploy.training.choice): the default
stays unless another candidate clearly wins, and the recipe records what auto calibration
chose. That auto picks MSE where minmax fails (random timm RepVGG-A0 at 224x224) is measured
by benchmarks/zoo.py: the effect needs full-size activations, too slow for this suite."""

from __future__ import annotations

import functools

import pytest
import torch

from qat_deploy.deploy import recipe
from qat_deploy.deploy.frontend.prepare import prepare
from qat_deploy.deploy.quant.histogram_observers import PercentileObserver
from qat_deploy.deploy.quant.observers import MinMaxObserver
from qat_deploy.deploy.rules.backend import get_rules
from qat_deploy.deploy.training.choice import choose
from tests.frontend.blocks import BasicBlock, randomize_bn

IMG = torch.randn(2, 8, 8, 8)


def _batches(channels: int, n: int = 8) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(8, channels, 8, 8, generator=gen) for _ in range(n)]


def _observed_by(observer):
    def setup(trial, fit):
        for quantizer in trial.activation_quantizers():
            quantizer.reset_observer(observer)

    return setup


CRIPPLED = functools.partial(PercentileObserver, percentile=60.0)  # clips 40% of values


@pytest.mark.parametrize("order", ["default_first", "default_crippled"])
def test_the_default_stays_unless_another_candidate_clearly_wins(order):
    model = randomize_bn(BasicBlock()).eval()
    prepared = prepare(model, "openvino", IMG, reduce_range=False)
    good, bad = _observed_by(MinMaxObserver), _observed_by(CRIPPLED)
    candidates = {"minmax": good, "crippled": bad}
    if order == "default_crippled":
        candidates = {"crippled": bad, "minmax": good}
    chosen, scores = choose(prepared, model, _batches(8), candidates)
    assert scores["crippled"] < scores["minmax"] - 0.01
    assert chosen == "minmax"  # first: the default; second: a clear win over the default


def test_a_tie_keeps_the_default():
    model = randomize_bn(BasicBlock()).eval()
    prepared = prepare(model, "openvino", IMG, reduce_range=False)
    same = _observed_by(MinMaxObserver)
    chosen, scores = choose(prepared, model, _batches(8), {"first": same, "second": same})
    assert chosen == "first" and scores["first"] == scores["second"]


def test_the_recipe_records_what_auto_calibration_chose_and_a_named_observer_skips_it():
    auto = recipe.Recipe(target="onnxruntime", calib_batches=2, batch_size=8, eval_samples=8)
    loaded = recipe.load(auto)
    record = recipe.quantize(loaded, auto).plan.calibration
    observers = get_rules("onnxruntime").auto_observers
    assert record["observer"] == record["auto"]["observer"] in observers
    assert set(record["auto"]["cosine"]) == set(observers)
    named = recipe.quantize(loaded, recipe.Recipe(target="onnxruntime", calibration="minmax"))
    assert named.plan.calibration == {"observer": "minmax", "auto": None}
