"""The build summary says why int8 lost to fp32 when it did, and nothing when it did not; what
auto calibration chose and why; what was checked where the engine could not run."""

from __future__ import annotations

import pytest
from rich.console import Console

from qat_deploy.deploy.app.cli.build import summary_table

AVX2_ONLY = {"avx2": True, "avx512f": False, "avx512_vnni": False, "avx_vnni": False}
VNNI = {**AVX2_ONLY, "avx512f": True, "avx512_vnni": True}


def _rendered(speedup: float, isa: dict, **extra) -> str:
    latency = {"p50": 1.0, "p99": 2.0}
    report = {
        "model": {"name": "m"},
        "target": "onnxruntime",
        "latency_ms": {"measured": True, "fp32": latency, "int8": latency},
        "speedup": {"measured": True, "value": speedup},
        "environment": {"isa": isa},
        "status": "ok",
        **extra,
    }
    console = Console(record=True, width=300)
    console.print(summary_table(report))
    return console.export_text()


def _untouched_tuning(regions: int) -> dict:
    """report.json's latency_tuning of a search that kept every layer int8."""
    return {
        "float_layers": [],
        "time_ratio": 1.0,
        "reverted": None,
        "threshold": 0.03,
        "regions": regions,
        "taken": [],
        "exhausted": False,
        "contended": 0,
        "retimed": 0,
        "comparisons": 2 * regions,
        "seconds": 30.0,
        "cache": {"hits": 0, "misses": 1},
    }


def test_int8_slower_on_a_cpu_without_vnni_names_the_instructions_and_the_remedy():
    text = _rendered(0.89, AVX2_ONLY)
    assert "int8 slower because" in text
    assert "no int8 dot-product instructions" in text and "--tune-latency" in text


def test_int8_slower_on_a_vnni_cpu_does_not_blame_the_cpu():
    text = _rendered(0.89, VNNI)
    assert "int8 slower because" in text and "--tune-latency" in text
    assert "dot-product" not in text


@pytest.mark.parametrize("isa", [AVX2_ONLY, VNNI])
def test_no_reason_when_int8_is_faster(isa):
    assert "int8 slower because" not in _rendered(1.7, isa)


def test_after_tuning_the_summary_says_fp32_is_the_faster_engine_instead_of_tuning_again():
    text = _rendered(0.91, AVX2_ONLY, latency_tuning=_untouched_tuning(regions=8))
    assert "fp32 is the faster engine" in text and "--tune-latency" not in text


def test_a_tuning_with_nothing_to_move_says_so_rather_than_all_zero_layers_int8():
    text = _rendered(0.46, AVX2_ONLY, latency_tuning=_untouched_tuning(regions=0))
    assert "no quantized weighted layer to move" in text and "all 0 layers" not in text


def test_a_placement_reverted_on_a_busy_cpu_says_so_rather_than_quoting_its_ratio():
    reverted = {"float_layers": ["conv1"], "time_ratio": 0.7, "contended": True}
    tuning = {**_untouched_tuning(regions=8), "reverted": reverted, "contended": 1, "retimed": 2}
    text = _rendered(1.2, VNNI, latency_tuning=tuning)
    assert "other processes took the CPU" in text and "1 timed on a busy CPU" in text
    assert "2 timing(s) retaken" in text
    assert "0.70x" not in text


def test_auto_calibration_shows_the_observer_and_the_scores_it_was_chosen_by():
    choice = {"observer": "mse", "cosine": {"minmax": 0.806, "mse": 0.913}}
    text = _rendered(1.3, AVX2_ONLY, calibration="mse", calibration_choice=choice)
    assert "mse (auto; held-out fake-quant cosine vs fp32: minmax 0.8060, mse 0.9130)" in text
    assert "auto" not in _rendered(1.3, AVX2_ONLY, calibration="minmax")


def test_a_build_whose_engine_could_not_run_shows_the_fake_quant_check():
    check = {"cosine": 0.95, "top1_agreement": 0.99, "samples": 64}
    text = _rendered(1.3, AVX2_ONLY, fakequant_vs_fp32=check)
    assert "fake-quant vs fp32" in text and "cosine 0.95000" in text and "could not run" in text
