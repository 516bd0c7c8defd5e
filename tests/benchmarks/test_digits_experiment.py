"""The digits experiment's quick mode, run in-process: the structural facts the docs rest on.

Quick mode is 2 and 8 bits, one seed, one QAT epoch (~30 s). The deployment bound is the
issue's own: int8 engines within 0.2 points of the fake-quant model. On the 360-image test split
one image is 0.28 points, so this demands the same number of correct answers; it holds because
the export reproduces the fake-quant arithmetic (observed: identical predictions on all 360).
"""

from __future__ import annotations

import json

import pytest

from benchmarks.digits_experiment import ENGINES, QUICK, VARIANTS, run, write_json, write_markdown


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    results = run(QUICK, log=lambda _: None)
    return results, json.loads(write_json(results, out).read_text()), out


def test_fp32_baseline_is_a_real_classifier(quick):
    results, _, _ = quick
    assert min(results["fp32"]["per_seed"]) >= 0.97


@pytest.mark.parametrize("engine", ENGINES)
def test_deployed_int8_matches_the_fake_quant_model(quick, engine):
    results, _, _ = quick
    assert set(results["deployment"]) == set(QUICK.deploy)
    for variant, row in results["deployment"].items():
        deployed = row[engine]
        assert abs(deployed["accuracy"] - row["fake_quant"]) <= 0.002, (variant, row)
        assert deployed["int8_compute_layers"] == deployed["compute_layers"] == 3, deployed


@pytest.mark.parametrize("rules", ["tensorrt", "onnxruntime"])
def test_qat_recovers_what_ptq_loses_at_2_bits(quick, rules):
    results, _, _ = quick
    point = results["sweep"][rules]["2"]
    qat = point["qat"][point["qat_best"]]["mean"]
    assert qat - point["ptq_minmax"]["mean"] >= 0.20, point


def test_json_holds_every_requested_bit_width_and_variant(quick):
    _, written, _ = quick
    for rules in ("tensorrt", "onnxruntime"):
        assert sorted(map(int, written["sweep"][rules])) == sorted(QUICK.bits)
        for point in written["sweep"][rules].values():
            assert set(point["qat"]) == {v.name for v in VARIANTS}
            assert len(point["ptq_minmax"]["per_seed"]) == len(QUICK.seeds)
    assert written["environment"]["versions"]["torch"].startswith("2.13")


def test_markdown_report_names_the_command_and_every_rule_set(quick):
    results, _, out = quick
    text = write_markdown(
        results, out, "python -m benchmarks.digits_experiment --quick"
    ).read_text()
    assert "python -m benchmarks.digits_experiment --quick" in text
    assert "## tensorrt rule set" in text and "## onnxruntime rule set" in text
    assert text.count("\n| 2 |") == 2  # one 2-bit row per rule set


def test_plot_is_written(quick):
    pytest.importorskip("matplotlib")  # not a project dependency; the CI venv may lack it
    from benchmarks.digits_experiment import plot

    results, _, out = quick
    path = plot(results, out)
    assert path.stat().st_size > 10_000
