"""Layer sensitivity: the ranking finds a layer made bad on purpose, the metric is SQNR as
defined, and `deploy sensitivity` caches its result per model and settings."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from deploy import errors
from deploy.calibrate import calibrate
from deploy.prepare import prepare
from deploy.sensitivity import analyse, layer_groups, sqnr_db
from tests.frontend.blocks import Bottleneck, randomize_bn

IMG = torch.randn(4, 8, 8, 8, generator=torch.Generator().manual_seed(0))


def calibrated(target: str):
    model = randomize_bn(Bottleneck()).eval()
    prepared = prepare(model, target, IMG)
    calibrate(prepared, [IMG], progress=False)
    return model, prepared


def test_sqnr_is_signal_over_error_power_in_db():
    ref = torch.tensor([2.0, 0.0])
    assert sqnr_db(ref, torch.tensor([1.0, 0.0])) == pytest.approx(10 * math.log10(4 / 1))
    assert sqnr_db(ref, ref.clone()) == math.inf


@pytest.mark.parametrize("target", ["onnxruntime", "openvino", "tensorrt"])
def test_a_layer_quantized_badly_on_purpose_ranks_first(target):
    model, prepared = calibrated(target)
    groups = layer_groups(prepared)
    assert set(groups) == {"conv1", "conv2", "conv3", "downsample.0"}
    # 128x the calibrated weight scale on conv2: its weights round to -1, 0 or 1 steps
    weight_quant = groups["conv2"][0]
    with torch.no_grad():
        weight_quant.scale.mul_(128)
    result = analyse(prepared, model, [IMG])
    assert result.layers[0].layer == "conv2"
    worst = result.layers[0]
    # with it alone float, the rest is closer to fp32 than with every layer quantized
    assert worst.alone_float_sqnr_db > result.all_quantized_sqnr_db


def test_the_analysis_leaves_the_quantizers_as_it_found_them():
    model, prepared = calibrated("openvino")
    before = prepared(IMG)
    analyse(prepared, model, [IMG])
    torch.testing.assert_close(prepared(IMG), before, rtol=0, atol=0)


def test_no_batches_is_bad_input():
    model, prepared = calibrated("onnxruntime")
    with pytest.raises(errors.BadInputError, match="at least one batch"):
        analyse(prepared, model, [])


def test_the_cli_ranks_then_answers_from_its_cache(tmp_path):
    def run():
        return subprocess.run(
            [sys.executable, "-m", "deploy.cli", "sensitivity", "--target", "onnxruntime"]
            + ["--model", "mnist_cnn", "--samples", "64", "--out", str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=300,
        )

    first = run()
    assert first.returncode == errors.OK, first.stderr
    result = json.loads((tmp_path / "sensitivity.json").read_text())
    assert {row["layer"] for row in result["layers"]} == {"conv1", "conv2", "fc"}
    assert result["samples"] == 64 and "written to" in first.stdout
    second = run()
    assert second.returncode == errors.OK and "cached in" in second.stdout
    assert json.loads((tmp_path / "sensitivity.json").read_text()) == result
    # other settings are another result, never the cached one
    other = subprocess.run(
        [sys.executable, "-m", "deploy.cli", "sensitivity", "--target", "onnxruntime"]
        + ["--model", "mnist_cnn", "--samples", "32", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert other.returncode == errors.OK and "written to" in other.stdout
