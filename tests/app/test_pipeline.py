"""`deploy build` end to end on the embedded default model, for every target."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch

from qat_deploy.deploy.app.pipeline import BuildOptions, build
from qat_deploy.deploy.common import errors
from tests.report_schema import read_report

#: minmax: the calibration choice (auto, the default) has its own tests (tests/training/
#: test_choice.py, the default builds below); elsewhere it would only triple calibration time
FAST = {"eval_samples": 200, "min_time_s": 0.2, "calibration": "minmax"}


@pytest.mark.parametrize("target", ["onnxruntime", "openvino"])
def test_default_build_writes_artifacts_and_a_complete_report(target, tmp_path):
    report = build(BuildOptions(target=target, out_dir=tmp_path, **{**FAST, "calibration": "auto"}))
    names = {p.name for p in tmp_path.iterdir()}
    assert {"model.fp32.onnx", "model.qdq.onnx", "report.json"} <= names
    on_disk = read_report(tmp_path)
    assert on_disk["status"] == "ok" and on_disk["target"] == target
    assert on_disk["calibration"] == on_disk["calibration_choice"]["observer"]  # auto, default
    # single-input models keep input_shape/input_dtype and name their input after forward(x)
    assert on_disk["model"]["name"] == "digits_resnet"
    assert on_disk["model"]["input_shape"] == [1, 1, 64, 64]
    assert on_disk["model"]["inputs"] == [
        {"name": "x", "shape": [1, 1, 64, 64], "dtype": "float32"}
    ]
    assert on_disk["latency_ms"]["measured"] and on_disk["accuracy"]["measured"]
    for precision in ("fp32", "int8"):
        assert set(on_disk["latency_ms"][precision]) >= {"p50", "p90", "p99", "mean", "runs"}
    # the paired ratio lies within the spread of the two engines' own latencies
    fp32, int8 = on_disk["latency_ms"]["fp32"], on_disk["latency_ms"]["int8"]
    assert fp32["p50"] / int8["p99"] <= on_disk["speedup"]["value"] <= fp32["p99"] / int8["p50"]
    # 7 convolutions (3x3 and 1x1 shortcuts) and the classifier
    assert on_disk["kernels"]["int8"] == 8 and on_disk["kernels"]["fallback_layers"] == []
    for label in ("int8_vs_fakequant", "int8_vs_fp32", "reference_floor"):
        assert set(on_disk["accuracy"][label]) >= {
            "top1_agreement",
            "max_err_steps",
            "p999_err_steps",
            "cosine",
            "samples",
        }
    assert on_disk["accuracy"]["int8_vs_fakequant"]["top1_agreement"] >= 0.999
    # the trained digits net is numerically quiet: its float64 floor leaves the bounds strict
    assert on_disk["accuracy"]["thresholds"]["int8_vs_fakequant"] == {
        "min_top1_agreement": 0.999,
        "min_cosine": 0.999,
        "max_p999_err_steps": 4.0,
    }
    top1 = on_disk["accuracy"]["top1"]
    one_sample = 1 / 200 + 1e-12  # FAST's eval_samples; 0.995 - 0.99 is 0.005000000000000004
    assert top1["fp32"] >= 0.97 and abs(top1["int8"] - top1["fakequant"]) <= one_sample
    assert abs(top1["int8"] - top1["fp32"]) <= one_sample  # the main job keeps the accuracy
    assert on_disk["environment"]["isa"]["avx512f"] in (True, False)
    assert "onnxruntime" in on_disk["environment"]["versions"]
    assert report["data"]["labels"] is True


def test_export_only_stops_after_the_linted_qdq_model(tmp_path):
    report = build(BuildOptions(target="tensorrt", out_dir=tmp_path, export_only=True))
    assert report["status"] == "ok" and report["lint"] == []
    assert "build" not in report["stages"]
    assert not any(p.suffix == ".plan" for p in tmp_path.iterdir())


def test_tensorrt_builds_ahead_of_time_and_says_latency_is_not_measured(tmp_path):
    pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT-RTX not installed")
    report = build(BuildOptions(target="tensorrt", out_dir=tmp_path, **FAST))
    assert (tmp_path / "engine.tensorrt.plan").stat().st_size > 0
    assert report["kernels"]["int8"] == 8
    for key in ("latency_ms", "accuracy", "speedup"):
        assert report[key]["measured"] is False and "GPU" in report[key]["reason"]
    assert "RTX" in report["engine"]["builder"]
    assert report["fakequant_vs_fp32"]["cosine"] >= 0.9  # what could be checked, was


def test_tensorrt_without_a_gpu_still_fails_a_model_quantization_ruins(tmp_path):
    """The engine cannot run, but its fake-quant model can: far from fp32, the build fails
    (exit 4) instead of shipping an engine nobody checked."""
    pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT-RTX not installed")
    options = BuildOptions(
        target="tensorrt",
        model="tests.app.test_pipeline:outlier_sensitive_model",
        data=_outlier_data(tmp_path / "spiky.npz"),
        out_dir=tmp_path / "out",
        **FAST,
    )
    with pytest.raises(errors.CheckFailedError) as failure:
        build(options)
    assert failure.value.exit_code == errors.CHECK_FAILED
    assert "fakequant_vs_fp32" in str(failure.value) and "not run" in str(failure.value)
    report = read_report(tmp_path / "out")
    assert report["fakequant_vs_fp32"]["cosine"] < 0.9 and report["exit_code"] == 4


def test_missing_backend_exits_3_before_any_work(tmp_path, monkeypatch):
    from qat_deploy.backends.tensorrt import adapter

    monkeypatch.setattr(
        type(adapter.ADAPTER), "unavailable_reason", lambda self: "no tensorrt here (test)"
    )
    with pytest.raises(errors.BackendUnavailableError) as info:
        build(BuildOptions(target="tensorrt", out_dir=tmp_path))
    assert info.value.exit_code == errors.BACKEND_UNAVAILABLE
    assert not list(tmp_path.glob("*.onnx"))
    report = read_report(tmp_path)
    assert report["status"].startswith("failed") and report["exit_code"] == 3
    assert "no tensorrt here (test)" in report["status"] and report["stages"] == {}


def test_an_interrupted_build_leaves_no_temp_file_of_its_own(tmp_path, monkeypatch):
    """Whatever path leaves an atomic write's temp file behind (CI twice saw onnxruntime's
    engine temp left after a SIGINT), the unwinding run removes it before its last report."""
    import os
    import signal

    from qat_deploy.backends.onnxruntime import adapter
    from qat_deploy.deploy.app.output_dir import report_problems

    def interrupted_build(self, onnx_path, out_dir, **options):
        (out_dir / f".engine.onnxruntime.onnx.{os.getpid()}.0123abcd.tmp").write_bytes(b"x")
        raise errors.Interrupted(signal.SIGINT)

    monkeypatch.setattr(type(adapter.ADAPTER), "_build", interrupted_build)
    with pytest.raises(errors.Interrupted):
        build(BuildOptions(target="onnxruntime", out_dir=tmp_path, **FAST))
    assert read_report(tmp_path)["status"] == "interrupted by SIGINT"
    assert not list(tmp_path.rglob("*.tmp")) and report_problems(tmp_path) == []


def test_wrong_scales_fail_the_accuracy_check(tmp_path, monkeypatch):
    """An engine whose activation scales are off by 10x must not pass as int8-equivalent."""
    import qat_deploy.deploy.recipe as recipe
    from qat_deploy.deploy.quant.fake_quant import FakeQuantize

    real_export = recipe.export

    def export_with_wrong_scales(prepared, path, example, **options):
        saved = {}
        for m in prepared.modules():
            if isinstance(m, FakeQuantize) and not m.spec.per_channel:
                saved[m] = m.scale.clone()
                m.scale.mul_(10)
        try:
            return real_export(prepared, path, example, **options)
        finally:
            for m, scale in saved.items():
                m.scale.copy_(scale)

    monkeypatch.setattr(recipe, "export", export_with_wrong_scales)
    # the engine computes its (wrong) file faithfully: the per-layer check must not save it
    with pytest.raises(errors.CheckFailedError, match="int8_vs_fakequant.*does not use"):
        build(BuildOptions(target="onnxruntime", out_dir=tmp_path, **FAST))
    report = read_report(tmp_path)
    metrics = report["accuracy"]["int8_vs_fakequant"]
    assert metrics["p999_err_steps"] > 4 or metrics["cosine"] < 0.999
    assert report["status"].startswith("failed") and report["exit_code"] == 4


def outlier_sensitive_model():
    """A model a min-max quantizer ruins when its input has rare huge values: the input
    quantizer's step becomes larger than the ordinary values."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 32), torch.nn.ReLU())
    return model.append(torch.nn.Linear(32, 10)).eval(), (1, 256)


def _outlier_data(path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 256)).astype(np.float32)
    x[::100, 3] = 2000.0  # one value in 25600 is a spike
    np.savez(path, x=x)
    return path


def test_quantization_loss_fails_with_a_hint_and_a_clipping_calibration_fixes_it(tmp_path):
    """When the engine matches its fake-quant model but not the float model, the message says
    so and names the calibration choices that clip outliers; one of them then passes."""
    data = _outlier_data(tmp_path / "spiky.npz")
    model = "tests.app.test_pipeline:outlier_sensitive_model"
    common = {"target": "onnxruntime", "model": model, "data": data, "calib_batches": 8, **FAST}
    with pytest.raises(errors.CheckFailedError) as failure:
        build(BuildOptions(out_dir=tmp_path / "minmax", **common))
    message = str(failure.value)
    assert "int8_vs_fp32" in message and "--calibration percentile or mse" in message
    report = read_report(tmp_path / "minmax")
    assert report["accuracy"]["int8_vs_fakequant"]["cosine"] >= 0.999  # the engine is right
    # auto tried minmax and mse on held-out calibration samples: the hint names the others
    with pytest.raises(errors.CheckFailedError) as failure:
        build(BuildOptions(out_dir=tmp_path / "auto", **{**common, "calibration": "auto"}))
    assert "--calibration percentile or entropy" in str(failure.value)
    assert set(read_report(tmp_path / "auto")["calibration_choice"]["cosine"]) == {"minmax", "mse"}
    report = build(
        BuildOptions(out_dir=tmp_path / "pct", **{**common, "calibration": "percentile"})
    )
    assert report["status"] == "ok" and report["calibration"] == "percentile"
    assert report["accuracy"]["int8_vs_fp32"]["cosine"] >= 0.9


def test_a_layer_kept_float_builds_float_on_purpose_and_passes_the_checks(tmp_path):
    report = build(
        BuildOptions(target="onnxruntime", out_dir=tmp_path, keep_float=("fc", "layer2.*"), **FAST)
    )
    assert report["status"] == "ok"
    assert report["kept_float"] == ["fc", "layer2.conv1", "layer2.conv2", "layer2.shortcut.0"]
    kernels = report["kernels"]
    # the digits net has 8 compute layers: the 4 kept ones run float on purpose, every other
    # one int8, and the accuracy check held the engine to its mixed fake-quant model
    assert kernels["int8"] == 4 and len(kernels["float_by_rule"]) == 4
    assert kernels["planned_int8"] == 4
    assert kernels["int8_fraction_of_quantized"] == 1.0 and report["accuracy"]["measured"]


def test_qat_without_labels_distills_toward_the_float_model(tmp_path):
    """Unlabelled data: --qat-epochs fine-tunes toward the fp32 model's outputs, its loss
    falls, and the int8 engine ends closer to fp32 on held-out data than without QAT."""
    from qat_deploy.deploy.data import default_dataset
    from qat_deploy.models import get_model_spec

    spec = get_model_spec("mnist_cnn")
    rows = default_dataset(spec, 400, split="calib").arrays(spec.inputs)
    data = tmp_path / "unlabelled.npz"
    np.savez(data, x=next(iter(rows.values())))
    common = {"target": "onnxruntime", "model": "mnist_cnn", "data": data, **FAST}
    ptq = build(BuildOptions(out_dir=tmp_path / "ptq", **common))
    qat = build(BuildOptions(out_dir=tmp_path / "qat", qat_epochs=3, **common))
    assert "qat" not in ptq and read_report(tmp_path / "qat")["qat"]["loss"] == "distill"
    losses = qat["qat"]["loss_per_epoch"]
    assert len(losses) == 3 and losses[-1] < losses[0]
    error = {
        name: 1 - report["accuracy"]["int8_vs_fp32"]["cosine"]
        for name, report in (("ptq", ptq), ("qat", qat))
    }
    assert error["qat"] < error["ptq"], error


def test_tune_latency_ships_the_placement_it_reports(tmp_path):
    """--tune-latency: the search is in the report (schema-checked), the layers it keeps
    float are the ones the shipped model keeps float, lint accepts them, and the timing
    cache is written where asked."""
    cache = tmp_path / "cache.json"
    options = BuildOptions(
        target="onnxruntime",
        model="mnist_cnn",
        out_dir=tmp_path / "out",
        tune_latency=True,
        tune_budget_s=30,
        tune_cache=cache,
        **FAST,
    )
    build(options)
    report = read_report(tmp_path / "out")
    tuning = report["latency_tuning"]
    assert report["stages"]["tune"] == "done" and report["lint"] == []
    assert tuning["regions"] >= 2 and tuning["comparisons"] >= 1
    assert sorted(report["kept_float"]) == sorted(tuning["float_layers"])
    kernels = report["kernels"]
    assert kernels["int8"] == tuning["regions"] - len(tuning["float_layers"])
    assert tuning["cache"]["path"] == str(cache)
    # every timing missing from the cache is written to it, unless it stayed contended
    written = len(json.loads(cache.read_text())["entries"]) if cache.is_file() else 0
    assert written == tuning["cache"]["misses"] - tuning["contended"]


def _build_with_first_layer_float(tmp_path, monkeypatch) -> dict:
    """A tuned mnist_cnn build whose search (stubbed) chose the first layer float: what the
    final timing of the re-prepared placement then decides is in the returned report."""
    from qat_deploy.deploy import recipe
    from qat_deploy.deploy.tune.regions import regions
    from qat_deploy.deploy.tune.search import TuneResult

    def first_layer_float(untuned, rules, timer, budget_s):
        names = [r.layer for r in regions(untuned, rules)]
        return TuneResult(len(names), names[:1], 0.5, 0.0, 0.03, budget_s)

    monkeypatch.setattr(recipe, "search", first_layer_float)
    options = BuildOptions(
        target="onnxruntime",
        model="mnist_cnn",
        out_dir=tmp_path / "out",
        tune_latency=True,
        tune_cache=tmp_path / "cache.json",
        **FAST,
    )
    build(options)
    return read_report(tmp_path / "out")


def test_a_tuned_placement_timed_on_a_busy_cpu_is_not_shipped(tmp_path, monkeypatch):
    """The search's choice (here: the first layer float) must hold in a final timing against
    the untuned model; when other processes keep the CPU busy through that timing, the
    untuned placement ships and the report says why."""
    from qat_deploy.deploy import recipe
    from qat_deploy.deploy.tune.search import EngineTimer
    from tests.tune.watch import ScriptedWatch

    busy = functools.partial(EngineTimer, watch=ScriptedWatch(10**6), retry_pause_s=0.0)
    monkeypatch.setattr(recipe, "EngineTimer", busy)
    report = _build_with_first_layer_float(tmp_path, monkeypatch)
    tuning = report["latency_tuning"]
    assert tuning["reverted"]["contended"] and tuning["contended"] == 1
    assert tuning["reverted"]["float_layers"] and tuning["float_layers"] == []
    assert report["kept_float"] == [] and report["kernels"]["int8"] == tuning["regions"]
    assert not (tmp_path / "cache.json").exists()


def test_a_tuned_placement_whose_gain_vanishes_with_roles_swapped_is_not_shipped(
    tmp_path, monkeypatch
):
    """One timing of a few tenths of a second can be off by 10% on a shared machine: the final
    timing of the re-prepared placement must agree with a second one, roles swapped. Here each
    engine times 0.8x the other whichever is measured first, so the gain is noise."""
    from qat_deploy.deploy.tune.search import EngineTimer

    asked = []

    def first_one_always_faster(self, candidate, reference):
        asked.append((candidate, reference))
        return 0.8

    monkeypatch.setattr(EngineTimer, "ratio", first_one_always_faster)
    tuning = _build_with_first_layer_float(tmp_path, monkeypatch)["latency_tuning"]
    assert len(asked) == 2 and asked[1] == asked[0][::-1]
    assert tuning["reverted"] == {
        "float_layers": tuning["reverted"]["float_layers"],
        "time_ratio": pytest.approx(1.0),
        "contended": False,
    }
    assert tuning["reverted"]["float_layers"] and tuning["float_layers"] == []


def test_tune_latency_without_a_runnable_engine_says_why(tmp_path):
    pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT-RTX not installed")
    from qat_deploy.backends.tensorrt.gpu import probe_gpu

    if probe_gpu().missing is None:
        pytest.skip("a GPU is here: TensorRT engines can be timed")
    options = BuildOptions(
        target="tensorrt",
        model="mnist_cnn",
        out_dir=tmp_path,
        tune_latency=True,
        tune_cache=tmp_path / "cache.json",
        **FAST,
    )
    with pytest.raises(errors.BackendUnavailableError, match="--tune-latency times engines"):
        build(options)
    assert read_report(tmp_path)["exit_code"] == errors.BACKEND_UNAVAILABLE
