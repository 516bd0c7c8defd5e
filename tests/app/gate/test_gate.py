"""The latency gate's logic, mostly without timing anything: decisions on synthetic block
medians, tolerance parsing, baseline validation, atomic baseline updates, model code named by a
baseline, CPU identity and the JUnit report. One test times tiny real engines.

No assertion here depends on how fast this machine is.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import stat
import sys
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qat_deploy.deploy.app import gate
from qat_deploy.deploy.app.gate import (
    CheckRequest,
    RatioCI,
    Reference,
    bootstrap_ratio,
    decide,
    failed_result,
    junit_xml,
    load_baseline,
    parse_tolerance,
    run_check,
    write_junit,
)
from qat_deploy.deploy.common.environment import cpu_difference, environment, parse_cpuinfo
from qat_deploy.deploy.common.errors import (
    BackendUnavailableError,
    BadInputError,
    EnvironmentFaultError,
)
from qat_deploy.deploy.engines.timing import block_medians

REPO = Path(__file__).resolve().parents[3]
SHAPE = (1, 1, 16, 16)


def tiny_onnx(path: Path, qdq: bool = False, shape: tuple[int, ...] = SHAPE) -> Path:
    """A one-Conv model (optionally with a Q/DQ pair on its input): a real ONNX file in
    milliseconds, for checks that read files but time nothing."""
    weight = numpy_helper.from_array(np.ones((4, shape[1], 3, 3), np.float32), "w")
    inits, nodes, conv_in = [weight], [], "input"
    if qdq:
        inits += [
            numpy_helper.from_array(np.array(0.05, np.float32), "s"),
            numpy_helper.from_array(np.array(128, np.uint8), "z"),
        ]
        nodes += [
            helper.make_node("QuantizeLinear", ["input", "s", "z"], ["q"]),
            helper.make_node("DequantizeLinear", ["q", "s", "z"], ["dq"]),
        ]
        conv_in = "dq"
    nodes.append(helper.make_node("Conv", [conv_in, "w"], ["output"], pads=[1, 1, 1, 1]))
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [shape[0], 4, *shape[2:]])],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def baseline_doc(**changes) -> dict:
    doc = {
        "schema": 1,
        "model": "mnist_cnn",
        "target": "onnxruntime",
        "input_shape": list(SHAPE),
        "threads": 2,
        "reference": {"kind": "fp32", "path": None, "sha256": None},
        "ratio": {"value": 1.2, "low": 1.19, "high": 1.21, "confidence": 0.95, "blocks": 300},
        "tolerance": 0.1,
        "measured_at": "2026-01-01T00:00:00Z",
        "environment": {"cpu": "test cpu"},
        "candidate": {"source": "repo"},
    }
    doc.update(changes)
    return doc


def write_doc(path: Path, doc: object) -> Path:
    path.write_text(json.dumps(doc))
    return path


# ---- decisions on synthetic block medians -----------------------------------------------------


def synthetic_blocks(
    ratio: float, n: int = 200, noise: float = 0.05, seed: int = 0, drift: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Paired block medians: the machine's speed (a common factor, drifting linearly by
    `drift` over the run) plus independent log-normal noise per block."""
    rng = np.random.default_rng(seed)
    machine = np.linspace(1.0, drift, n) * 0.1  # ms
    reference = machine * np.exp(rng.normal(0, noise, n))
    candidate = ratio * machine * np.exp(rng.normal(0, noise, n))
    return candidate, reference


BASE = RatioCI(1.2, 1.19, 1.21, 0.95, 300)


def test_clear_regression_fails():
    verdict = decide(*synthetic_blocks(1.2 * 1.5), BASE, 0.10)
    assert verdict.regression
    assert verdict.change.low > 1.10 and verdict.change.value == pytest.approx(1.5, rel=0.05)


def test_noise_only_passes_across_seeds():
    for seed in range(20):
        verdict = decide(*synthetic_blocks(1.2, noise=0.3, seed=seed), BASE, 0.10, seed=seed)
        assert not verdict.regression


def test_slowdown_within_tolerance_passes_even_when_significant():
    verdict = decide(*synthetic_blocks(1.2 * 1.05, noise=0.02), BASE, 0.10)
    assert verdict.change.low > 1.0  # a real 5% slowdown ...
    assert not verdict.regression  # ... but within the 10% tolerance


def test_slowdown_beyond_tolerance_but_not_significant_passes():
    verdict = decide(*synthetic_blocks(1.2 * 1.15, n=8, noise=0.4, seed=3), BASE, 0.10)
    assert verdict.change.low <= 1.10 < verdict.change.high
    assert not verdict.regression


def test_common_drift_cancels_in_the_paired_ratio():
    verdict = decide(*synthetic_blocks(1.2, drift=3.0, noise=0.02), BASE, 0.10)
    assert verdict.change.value == pytest.approx(1.0, abs=0.02)
    assert not verdict.regression


def test_baseline_uncertainty_widens_the_interval():
    blocks = synthetic_blocks(1.2, noise=0.05)
    narrow = decide(*blocks, BASE, 0.10).change
    wide = decide(*blocks, RatioCI(1.2, 1.0, 1.44, 0.95, 300), 0.10).change
    assert wide.high - wide.low > 2 * (narrow.high - narrow.low)


def test_decision_is_reproducible_with_a_seed():
    blocks = synthetic_blocks(1.3, noise=0.1)
    assert decide(*blocks, BASE, 0.1, seed=7) == decide(*blocks, BASE, 0.1, seed=7)


def test_bootstrap_needs_paired_blocks():
    with pytest.raises(BadInputError, match="paired"):
        bootstrap_ratio(np.ones(5), np.ones(4))
    with pytest.raises(BadInputError, match="at least 2"):
        bootstrap_ratio(np.ones(1), np.ones(1))


def test_bootstrap_interval_contains_the_estimate():
    ci, samples = bootstrap_ratio(*synthetic_blocks(1.4, noise=0.1), resamples=500)
    assert ci.low <= ci.value <= ci.high and len(samples) == 500 and ci.blocks == 200


def test_block_medians_drop_an_incomplete_block():
    medians = block_medians([1, 2, 3, 10, 20, 30, 99], block=3)
    assert medians.tolist() == [2.0, 20.0]


# ---- tolerance --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"), [("10%", 0.1), ("0.1", 0.1), (" 5 % ", 0.05), ("0%", 0.0), ("100%", 1.0)]
)
def test_tolerance_parses(text, value):
    assert parse_tolerance(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["ten%", "", "%", "-5%", "150%", "nan%", "inf", "1e400%"])
def test_bad_tolerance_is_bad_input(text):
    with pytest.raises(BadInputError, match="tolerance"):
        parse_tolerance(text)


def test_bare_number_above_one_is_ambiguous():
    with pytest.raises(BadInputError, match="ambiguous tolerance '10'.*10%"):
        parse_tolerance("10")


# ---- baseline files ---------------------------------------------------------------------------


def test_baseline_round_trips(tmp_path):
    path = write_doc(tmp_path / "b.json", baseline_doc())
    baseline = load_baseline(path)
    assert baseline.ratio == RatioCI(1.2, 1.19, 1.21, 0.95, 300)
    assert baseline.input_shape == SHAPE and baseline.reference == Reference("fp32")
    (tmp_path / "again.json").write_text(baseline.to_json())
    assert load_baseline(tmp_path / "again.json") == baseline


@pytest.mark.parametrize("name", ["mnist_cnn-onnxruntime", "mnist_cnn-openvino"])
def test_committed_baselines_are_valid(name):
    baseline = load_baseline(REPO / "ci" / "baselines" / f"{name}.json")
    assert baseline.model == "mnist_cnn" and baseline.ratio.blocks >= gate.MIN_BLOCKS


@pytest.mark.parametrize(
    ("doc", "problem"),
    [
        ([1, 2], "expected a JSON object"),
        (baseline_doc(schema=2), "schema 2"),
        ({k: v for k, v in baseline_doc().items() if k != "ratio"}, "missing 'ratio'"),
        (
            baseline_doc(
                ratio={"value": 1.2, "low": 1.3, "high": 1.4, "confidence": 0.95, "blocks": 3}
            ),
            "not within",
        ),
        (
            baseline_doc(ratio={"value": -1, "low": 1, "high": 1, "confidence": 0.95, "blocks": 3}),
            "'value' is -1",
        ),
        (baseline_doc(input_shape=[1, 0, 16]), "'input_shape'"),
        (baseline_doc(threads="two"), "'threads'"),
        (baseline_doc(tolerance=5), "'tolerance'"),
        (baseline_doc(reference={"kind": "yesterday"}), "'kind'"),
        (baseline_doc(reference={"kind": "artifact", "path": "r.onnx"}), "missing 'sha256'"),
        (baseline_doc(pinned_candidate={"path": "../c.onnx", "sha256": "ab"}), "'path'"),
        (baseline_doc(pinned_candidate={"path": "c.onnx"}), "missing 'sha256'"),
    ],
)
def test_corrupt_baseline_names_the_problem(tmp_path, doc, problem):
    path = write_doc(tmp_path / "b.json", doc)
    with pytest.raises(BadInputError, match=problem) as info:
        load_baseline(path)
    assert str(path) in str(info.value)


def test_truncated_baseline_is_not_json(tmp_path):
    path = tmp_path / "b.json"
    path.write_text(json.dumps(baseline_doc())[:40])
    with pytest.raises(BadInputError, match="corrupt baseline .* not JSON"):
        load_baseline(path)


def test_missing_baseline_says_how_to_create_it(tmp_path):
    with pytest.raises(BadInputError, match="not found.*--update-baseline"):
        load_baseline(tmp_path / "nope.json")


# ---- run_check without timing: updates, references, option checks ----------------------------


@pytest.fixture
def fake_measure(monkeypatch):
    """Replace the build-and-time step with synthetic block medians of a chosen ratio, and
    the repo export with tiny files, so run_check's bookkeeping is tested in milliseconds."""
    state = {"ratio": 1.2, "vs_pinned": 1.0, "calls": 0}

    def measure(baseline, files, timing, tmp, int_high=None):
        state["calls"] += 1
        state["files"] = dict(files)
        candidate, reference = synthetic_blocks(state["ratio"], noise=0.01)
        blocks = {"candidate": candidate, "reference": reference}
        if "pinned" in files:  # the same int8 engine as at update, unless vs_pinned says not
            noise = np.exp(np.random.default_rng(1).normal(0, 0.01, len(candidate)))
            blocks["pinned"] = candidate / state["vs_pinned"] * noise
        p50 = {role: float(np.median(b)) for role, b in blocks.items()}
        return {role: blocks[role] for role in files}, p50

    def export(name, target, out_dir, *, input_shape, precisions):
        out_dir.mkdir(parents=True, exist_ok=True)
        return {
            p: tiny_onnx(out_dir / f"{p}.onnx", qdq=p == "int8", shape=input_shape)
            for p in precisions
        }

    monkeypatch.setattr(gate.check, "_measure", measure)
    monkeypatch.setattr(gate.check, "export_model", export)
    return state


def test_update_creates_then_rewrites_atomically(tmp_path, fake_measure):
    path = tmp_path / "b.json"
    request = CheckRequest(path, update=True, model="mnist_cnn", target="onnxruntime")
    assert run_check(request).status == "updated"
    first = load_baseline(path)
    assert first.ratio.value == pytest.approx(1.2, rel=0.01) and first.threads == 2
    assert first.candidate == {"source": "repo"} and first.environment["cpu"]
    fake_measure["ratio"] = 1.5
    run_check(CheckRequest(path, update=True, tolerance="7%"))
    second = load_baseline(path)
    assert second.ratio.value == pytest.approx(1.5, rel=0.01) and second.tolerance == 0.07
    assert second.model == first.model and second.input_shape == first.input_shape
    # no temp files left; the measured candidate is pinned beside the baseline
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.candidate.onnx", "b.json"]


def test_failed_update_leaves_the_old_baseline(tmp_path, fake_measure, monkeypatch):
    path = write_doc(tmp_path / "b.json", baseline_doc())
    before = path.read_bytes()

    def broken(*args):
        raise BackendUnavailableError("engine vanished")

    monkeypatch.setattr(gate.check, "_measure", broken)
    with pytest.raises(BackendUnavailableError):
        run_check(CheckRequest(path, update=True))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.json"]


def test_check_passes_and_fails_on_the_measured_ratio(tmp_path, fake_measure):
    path = write_doc(tmp_path / "b.json", baseline_doc())
    assert run_check(CheckRequest(path)).status == "passed"
    fake_measure["ratio"] = 1.2 * 1.3
    result = run_check(CheckRequest(path))
    assert result.status == "regression" and "REGRESSION" in result.message
    assert run_check(CheckRequest(path, tolerance="50%")).status == "passed"


def test_update_of_a_missing_baseline_needs_model_and_target(tmp_path, fake_measure):
    with pytest.raises(BadInputError, match="give --model and --target"):
        run_check(CheckRequest(tmp_path / "new.json", update=True, model="mnist_cnn"))


def test_shaping_options_only_apply_with_update(tmp_path, fake_measure):
    path = write_doc(tmp_path / "b.json", baseline_doc())
    with pytest.raises(BadInputError, match="--target, --threads only apply"):
        run_check(CheckRequest(path, target="openvino", threads=4))
    with pytest.raises(BadInputError, match="--model resnet18 is not the model .*mnist_cnn"):
        run_check(CheckRequest(path, model="resnet18"))
    assert run_check(CheckRequest(path, model="mnist_cnn")).status == "passed"


def test_unknown_model_and_target_are_bad_input(tmp_path, fake_measure):
    with pytest.raises(BadInputError, match="unknown model 'mnist_cn'"):
        run_check(CheckRequest(write_doc(tmp_path / "m.json", baseline_doc(model="mnist_cn"))))
    with pytest.raises(BadInputError, match="unknown target 'onnxrt'"):
        run_check(CheckRequest(write_doc(tmp_path / "t.json", baseline_doc(target="onnxrt"))))
    assert fake_measure["calls"] == 0


def test_given_files_must_exist_and_match_the_input_shape(tmp_path, fake_measure):
    path = write_doc(tmp_path / "b.json", baseline_doc())
    with pytest.raises(BadInputError, match="candidate ONNX model not found"):
        run_check(CheckRequest(path, candidate=tmp_path / "missing.onnx"))
    wrong = tiny_onnx(tmp_path / "wrong.onnx", qdq=True, shape=(1, 1, 8, 8))
    with pytest.raises(BadInputError, match=r"takes input \[1, 1, 8, 8\]"):
        run_check(CheckRequest(path, candidate=wrong))
    qdq = tiny_onnx(tmp_path / "q.onnx", qdq=True)
    with pytest.raises(BadInputError, match="reference is the fp32 model"):
        run_check(CheckRequest(path, reference=qdq))
    assert run_check(CheckRequest(path, candidate=qdq)).status == "passed"
    assert fake_measure["files"]["candidate"] == qdq


def test_pinned_reference_is_copied_and_verified(tmp_path, fake_measure):
    path = tmp_path / "b.json"
    artifact = tiny_onnx(tmp_path / "release.onnx", qdq=True)
    run_check(
        CheckRequest(
            path,
            update=True,
            model="mnist_cnn",
            target="onnxruntime",
            reference=artifact,
            pin_reference=True,
        )
    )
    ref = load_baseline(path).reference
    assert ref.kind == "artifact" and ref.path == "b.reference.onnx" and len(ref.sha256) == 64
    assert run_check(CheckRequest(path)).status == "passed"
    assert fake_measure["files"]["reference"] == tmp_path / "b.reference.onnx"
    tiny_onnx(tmp_path / "b.reference.onnx", qdq=False)  # someone replaced the artifact
    with pytest.raises(BadInputError, match="not the one the baseline pinned"):
        run_check(CheckRequest(path))


def test_failed_pinning_writes_nothing(tmp_path, fake_measure, monkeypatch):
    def broken(*args):
        raise BackendUnavailableError("engine vanished")

    monkeypatch.setattr(gate.check, "_measure", broken)
    artifact = tiny_onnx(tmp_path / "release.onnx", qdq=True)
    request = CheckRequest(
        tmp_path / "b.json", update=True, model="mnist_cnn", target="onnxruntime",
        reference=artifact, pin_reference=True,
    )  # fmt: skip
    with pytest.raises(BackendUnavailableError):
        run_check(request)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["release.onnx"]


def test_bad_thread_count_on_update(tmp_path, fake_measure):
    with pytest.raises(BadInputError, match="bad thread count 0"):
        run_check(
            CheckRequest(
                tmp_path / "b.json", update=True, model="mnist_cnn", target="onnxruntime", threads=0
            )
        )


def test_pin_reference_needs_a_file(tmp_path, fake_measure):
    with pytest.raises(BadInputError, match="--pin-reference needs --reference"):
        run_check(
            CheckRequest(
                tmp_path / "b.json",
                update=True,
                model="mnist_cnn",
                target="onnxruntime",
                pin_reference=True,
            )
        )


# ---- JUnit ------------------------------------------------------------------------------------


def test_junit_regression_has_one_testcase_with_a_failure(tmp_path, fake_measure):
    fake_measure["ratio"] = 1.2 * 1.4
    result = run_check(CheckRequest(write_doc(tmp_path / "gate.json", baseline_doc())))
    root = ET.fromstring(junit_xml(result))
    suite = root.find("testsuite")
    assert suite.get("tests") == "1" and suite.get("failures") == "1"
    (case,) = suite.findall("testcase")
    assert case.get("name") == "gate" and case.get("classname") == "latency.onnxruntime"
    assert "REGRESSION" in case.find("failure").get("message")
    props = {p.get("name"): p.get("value") for p in case.iter("property")}
    assert float(props["change"]) == pytest.approx(1.4, rel=0.05) and props["tolerance"]


def test_junit_pass_error_and_skip(tmp_path, fake_measure):
    passed = run_check(CheckRequest(write_doc(tmp_path / "ok.json", baseline_doc())))
    case = ET.fromstring(junit_xml(passed)).find("testsuite/testcase")
    assert case.find("failure") is None and case.find("error") is None
    error = failed_result(tmp_path / "x.json", BadInputError("baseline not found"), 0.1)
    assert ET.fromstring(junit_xml(error)).find("testsuite/testcase/error") is not None
    skip = failed_result(tmp_path / "x.json", BackendUnavailableError("needs a GPU"), 0.1)
    suite = ET.fromstring(junit_xml(skip)).find("testsuite")
    assert suite.get("skipped") == "1" and suite.find("testcase/skipped") is not None


def test_junit_is_written_atomically_and_unwritable_paths_are_bad_input(tmp_path):
    result = failed_result(tmp_path / "x.json", BadInputError("nope"), 0.0)
    path = write_junit(tmp_path / "reports" / "gate.xml", result)
    assert ET.parse(path).getroot().tag == "testsuites"
    (tmp_path / "file").write_text("")
    with pytest.raises(BadInputError, match="cannot write JUnit report"):
        write_junit(tmp_path / "file" / "gate.xml", result)


def test_pinned_candidate_round_trips_and_old_baselines_have_none(tmp_path):
    assert load_baseline(write_doc(tmp_path / "old.json", baseline_doc())).pinned_candidate is None
    pin = {"path": "b.candidate.onnx", "sha256": "ab" * 32}
    baseline = load_baseline(write_doc(tmp_path / "b.json", baseline_doc(pinned_candidate=pin)))
    assert baseline.pinned_candidate == gate.Pinned("b.candidate.onnx", "ab" * 32)
    (tmp_path / "again.json").write_text(baseline.to_json())
    assert load_baseline(tmp_path / "again.json") == baseline


# ---- a slowdown hidden by drift of the int8/fp32 ratio (issue 16) -----------------------------


def drifting_run(
    slowdown: float, drift: float, n: int = 300, noise: float = 0.03, seed: int = 0
) -> dict[str, np.ndarray]:
    """Block medians of one interleaved run of the pinned int8 candidate, the candidate and the
    fp32 reference, on a day the machine's int8/fp32 ratio sits `drift` off the baseline's
    1.2: both int8 engines run the same kind of kernels, so both get the drift; the candidate
    also runs `slowdown` slower. Per round, a common load factor; per block, its own noise."""
    rng = np.random.default_rng(seed)
    machine = 0.1 * np.exp(rng.normal(0, 0.2, n))

    def engine(factor: float) -> np.ndarray:
        return factor * machine * np.exp(rng.normal(0, noise, n))

    return {
        "pinned": engine(1.2 * drift),
        "candidate": engine(1.2 * drift * slowdown),
        "reference": engine(1.0),
    }


@pytest.mark.parametrize("seed", range(5))
def test_a_12_percent_slowdown_is_caught_when_the_ratio_drifts_5_percent_favourably(seed):
    run = drifting_run(slowdown=1.12, drift=0.95, seed=seed)
    fp32_only = decide(run["candidate"], run["reference"], BASE, 0.10, seed=seed)
    assert fp32_only.change.value == pytest.approx(1.12 * 0.95, rel=0.01)
    assert not fp32_only.regression  # the gap: the int8/fp32 ratio alone reads +6.4%
    verdict = decide(
        run["candidate"], run["reference"], BASE, 0.10, pinned_blocks=run["pinned"], seed=seed
    )
    assert verdict.regression and verdict.slower_than_pinned
    assert not verdict.slower_than_baseline
    assert verdict.pinned.value == pytest.approx(1.12, rel=0.01)


@pytest.mark.parametrize("drift", [0.95, 1.05])
@pytest.mark.parametrize("seed", range(5))
def test_an_unchanged_candidate_passes_whichever_way_the_ratio_drifts(drift, seed):
    run = drifting_run(slowdown=1.0, drift=drift, seed=seed)
    verdict = decide(
        run["candidate"], run["reference"], BASE, 0.10, pinned_blocks=run["pinned"], seed=seed
    )
    assert not verdict.regression
    assert verdict.pinned.value == pytest.approx(1.0, abs=0.01)
    assert verdict.change.value == pytest.approx(drift, rel=0.01)


def test_a_slowdown_within_tolerance_of_the_pinned_candidate_passes():
    run = drifting_run(slowdown=1.05, drift=1.0, noise=0.01)
    verdict = decide(run["candidate"], run["reference"], BASE, 0.10, pinned_blocks=run["pinned"])
    assert verdict.pinned.low > 1.0 and not verdict.regression


def test_the_fp32_comparison_decides_only_without_a_pinned_candidate():
    """A change that slows every int8 engine alike (build options, runtime) leaves candidate /
    pinned at 1: only the int8/fp32 ratio sees it. With a pinned candidate that is a note (the
    same ratio moves this much under load); without one it is the gate."""
    run = drifting_run(slowdown=1.0, drift=1.3)
    pinned = decide(run["candidate"], run["reference"], BASE, 0.10, pinned_blocks=run["pinned"])
    assert pinned.slower_than_baseline and not pinned.slower_than_pinned
    assert not pinned.regression
    alone = decide(run["candidate"], run["reference"], BASE, 0.10)
    assert alone.regression and alone.slower_than_baseline


def renamed_copy(src: Path, dst: Path) -> Path:
    """`src` under another graph name: the same engine in different bytes."""
    model = onnx.load(str(src))
    model.graph.name = "renamed"
    onnx.save(model, str(dst))
    return dst


def test_update_pins_the_candidate_and_a_check_times_it(tmp_path, fake_measure):
    path = tmp_path / "b.json"
    # not the bytes the repo export (fake_measure's tiny_onnx) gives, so the check times both
    candidate = renamed_copy(tiny_onnx(tmp_path / "plain.qdq.onnx", qdq=True), tmp_path / "g.onnx")
    update = CheckRequest(path, update=True, model="mnist_cnn", target="onnxruntime")
    run_check(replace(update, candidate=candidate))
    pinned = tmp_path / "b.candidate.onnx"
    assert pinned.read_bytes() == candidate.read_bytes()
    assert (
        load_baseline(path).pinned_candidate.sha256
        == hashlib.sha256(candidate.read_bytes()).hexdigest()
    )
    result = run_check(CheckRequest(path))
    assert list(fake_measure["files"]) == ["pinned", "candidate", "reference"]
    assert fake_measure["files"]["pinned"] == pinned
    assert result.status == "passed" and "vs pinned candidate: " in result.message
    assert float(result.properties["pinned_change"]) == pytest.approx(1.0, abs=0.01)
    fake_measure["ratio"], fake_measure["vs_pinned"] = 1.2 * 1.12 * 0.95, 1.12
    result = run_check(CheckRequest(path))
    assert result.status == "regression" and "vs the pinned candidate" in result.message
    assert "the baseline ratio" not in result.message
    assert float(result.properties["change"]) < 1.10  # the int8/fp32 ratio alone passed


def test_a_candidate_that_is_the_pinned_file_is_not_timed_against_it(tmp_path, fake_measure):
    """Same bytes, same engine: candidate / pinned is 1 whatever a timing would have said, and
    the int8/fp32 change is still measured and decides nothing (a note beyond tolerance)."""
    path = tmp_path / "b.json"
    run_check(CheckRequest(path, update=True, model="mnist_cnn", target="onnxruntime"))
    fake_measure["ratio"], fake_measure["vs_pinned"] = 1.2 * 1.5, 1.5
    result = run_check(CheckRequest(path))
    assert list(fake_measure["files"]) == ["candidate", "reference"]
    assert result.status == "passed", result.message
    assert "vs pinned candidate: the same file" in result.message
    assert "int8/fp32 ratio moved beyond the tolerance" in result.message
    assert result.properties["pinned_same_file"] == "true"
    assert float(result.properties["pinned_change"]) == 1.0
    assert float(result.properties["change"]) == pytest.approx(1.5, rel=0.02)
    other = renamed_copy(tmp_path / "b.candidate.onnx", tmp_path / "other.onnx")
    result = run_check(CheckRequest(path, candidate=other))
    assert list(fake_measure["files"]) == ["pinned", "candidate", "reference"]
    assert result.status == "regression" and result.properties["pinned_same_file"] == "false"


def test_a_missing_or_changed_pinned_candidate_is_bad_input(tmp_path, fake_measure):
    path = tmp_path / "b.json"
    run_check(CheckRequest(path, update=True, model="mnist_cnn", target="onnxruntime"))
    pinned = tmp_path / "b.candidate.onnx"
    tiny_onnx(pinned, qdq=False)
    with pytest.raises(BadInputError, match="not the one the baseline pinned"):
        run_check(CheckRequest(path))
    pinned.unlink()
    with pytest.raises(BadInputError, match="pinned candidate .*b.candidate.onnx not found"):
        run_check(CheckRequest(path))
    assert fake_measure["calls"] == 1  # the update only


def slowed_copy(src: Path, dst: Path, convs: int) -> Path:
    """`src` with a chain of float 3x3 Convs appended to its output: genuinely slower."""
    model = onnx.load(str(src))
    graph = model.graph
    out = graph.output[0].name
    previous = f"{out}_0"
    for node in graph.node:
        node.output[:] = [previous if name == out else name for name in node.output]
    weight = np.full((4, 4, 3, 3), 0.01, np.float32)
    graph.initializer.append(numpy_helper.from_array(weight, "slow_w"))
    for i in range(convs):
        following = out if i == convs - 1 else f"{out}_{i + 1}"
        graph.node.append(helper.make_node("Conv", [previous, "slow_w"], [following], pads=[1] * 4))
        previous = following
    onnx.save(model, str(dst))
    return dst


def test_real_engines_slower_than_the_pinned_candidate_fail_despite_drift(tmp_path):
    """Tiny real onnxruntime engines. After the update, the recorded int8/fp32 ratio is
    multiplied by 5: as if the machine's ratio had drifted far in the favourable direction,
    so the fp32 comparison alone cannot see the slowed candidate (about 2x slower); the
    pinned comparison must."""
    plain = tiny_onnx(tmp_path / "plain.qdq.onnx", qdq=True)
    fp32 = tiny_onnx(tmp_path / "fp32.onnx")
    slowed = slowed_copy(plain, tmp_path / "slowed.qdq.onnx", convs=4)
    path = tmp_path / "b.json"
    files = {"candidate": plain, "reference": fp32, "min_time_s": 0.2}
    run_check(CheckRequest(path, update=True, model="mnist_cnn", target="onnxruntime", **files))
    doc = json.loads(path.read_text())
    doc["ratio"].update({k: doc["ratio"][k] * 5 for k in ("value", "low", "high")})
    write_doc(path, doc)
    unchanged = run_check(CheckRequest(path, **files))
    assert unchanged.status == "passed", unchanged.message
    assert float(unchanged.properties["pinned_change"]) == pytest.approx(1.0, abs=0.08)
    result = run_check(CheckRequest(path, **{**files, "candidate": slowed}))
    assert result.status == "regression", result.message
    assert "vs the pinned candidate" in result.message
    assert float(result.properties["change"]) < 1.1  # drift hid it from int8/fp32
    assert float(result.properties["pinned_change_ci"].split("..")[0]) > 1.1


# ---- a baseline is data: model code it names is imported only when trusted --------------------


@pytest.fixture
def probe_model(tmp_path, monkeypatch) -> tuple[str, Path]:
    """A `module:factory` reference to a fresh module that leaves a marker file when
    imported, so a test sees whether the gate ran code named by a baseline."""
    name = f"gate_probe_{secrets.token_hex(4)}"
    marker = tmp_path / "imported"
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / f"{name}.py").write_text(
        "import pathlib\n"
        "from torch import nn\n"
        f"pathlib.Path({str(marker)!r}).write_text('imported')\n"
        "def make():\n"
        "    return nn.Conv2d(1, 4, 3, padding=1), (1, 1, 16, 16)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path / "code"))
    yield f"{name}:make", marker
    sys.modules.pop(name, None)


@pytest.mark.parametrize("update", [False, True])
def test_code_named_by_a_baseline_is_not_imported(tmp_path, fake_measure, probe_model, update):
    ref, marker = probe_model
    path = write_doc(tmp_path / "b.json", baseline_doc(model=ref))
    with pytest.raises(BadInputError) as info:
        run_check(CheckRequest(path, update=update))
    message = str(info.value)
    assert len(message.splitlines()) == 1
    assert f"'{ref}'" in message and "--trust-baseline-model" in message
    assert f"--model {ref}" in message
    assert not marker.exists() and ref.split(":")[0] not in sys.modules
    assert fake_measure["calls"] == 0


@pytest.mark.parametrize("how", ["trust", "model"])
def test_code_named_by_a_baseline_runs_when_the_user_vouches(
    tmp_path, fake_measure, probe_model, how
):
    ref, marker = probe_model
    path = write_doc(tmp_path / "b.json", baseline_doc(model=ref))
    vouch = {"trust_model": True} if how == "trust" else {"model": ref}
    assert run_check(CheckRequest(path, **vouch)).status == "passed"
    assert marker.exists()


def test_update_with_the_model_on_the_command_line_may_import_it(
    tmp_path, fake_measure, probe_model
):
    ref, marker = probe_model
    path = tmp_path / "b.json"
    run_check(CheckRequest(path, update=True, model=ref, target="onnxruntime"))
    assert marker.exists() and load_baseline(path).model == ref


def test_a_check_on_given_files_needs_no_model_code(tmp_path, fake_measure, probe_model):
    ref, marker = probe_model
    path = write_doc(tmp_path / "b.json", baseline_doc(model=ref))
    candidate = tiny_onnx(tmp_path / "c.onnx", qdq=True)
    reference = tiny_onnx(tmp_path / "r.onnx")
    assert run_check(CheckRequest(path, candidate=candidate, reference=reference)).status == (
        "passed"
    )
    assert not marker.exists()
    with pytest.raises(BadInputError, match="exporting the fp32 reference would import"):
        run_check(CheckRequest(path, candidate=candidate))


# ---- --update-baseline and file permissions ---------------------------------------------------


@pytest.mark.parametrize("read_only", ["b.json", "b.candidate.onnx"])
def test_update_refuses_a_read_only_file_before_measuring(tmp_path, fake_measure, read_only):
    path = write_doc(tmp_path / "b.json", baseline_doc())
    tiny_onnx(tmp_path / "b.candidate.onnx", qdq=True)
    locked = tmp_path / read_only
    before = locked.read_bytes()
    locked.chmod(0o444)
    with pytest.raises(BadInputError, match="read-only") as info:
        run_check(CheckRequest(path, update=True))
    assert str(locked) in str(info.value) and len(str(info.value).splitlines()) == 1
    assert fake_measure["calls"] == 0
    assert locked.read_bytes() == before and stat.S_IMODE(locked.stat().st_mode) == 0o444


def test_update_refuses_a_read_only_folder_before_measuring(tmp_path, fake_measure):
    folder = tmp_path / "baselines"
    folder.mkdir()
    path = write_doc(folder / "b.json", baseline_doc())
    folder.chmod(0o555)
    try:
        with pytest.raises(EnvironmentFaultError, match=f"folder {folder} is read-only"):
            run_check(CheckRequest(path, update=True))
        with pytest.raises(EnvironmentFaultError, match=f"folder {folder} is read-only"):
            run_check(
                CheckRequest(folder / "new.json", update=True, model="mnist_cnn", target="openvino")
            )
    finally:
        folder.chmod(0o755)
    assert fake_measure["calls"] == 0 and sorted(p.name for p in folder.iterdir()) == ["b.json"]


def test_update_keeps_the_mode_of_the_files_it_rewrites(tmp_path, fake_measure):
    path = write_doc(tmp_path / "b.json", baseline_doc())
    path.chmod(0o640)
    run_check(CheckRequest(path, update=True))
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert load_baseline(path).measured_at != baseline_doc()["measured_at"]  # rewritten
    pinned = tmp_path / "b.candidate.onnx"
    pinned.chmod(0o600)
    run_check(CheckRequest(path, update=True))
    assert stat.S_IMODE(pinned.stat().st_mode) == 0o600 and os.access(path, os.R_OK)


# ---- CPU identity ------------------------------------------------------------------------------

X86_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Platinum 8480+ @ 2.00GHz
flags\t\t: fpu avx2 avx512f avx512_vnni amx_int8 amx_tile

processor\t: 1
vendor_id\t: GenuineIntel
model\t\t: 999
flags\t\t: fpu
"""
ARM_CPUINFO = """processor\t: 0
BogoMIPS\t: 2100.00
Features\t: fp asimd asimddp i8mm sve
CPU implementer\t: 0x41
CPU architecture: 8
CPU part\t: 0xd0c
"""


def test_cpuinfo_is_parsed_from_the_first_processor():
    x86 = parse_cpuinfo(X86_CPUINFO)
    assert x86["id"] == {"vendor": "GenuineIntel", "family": "6", "model": "143"}
    assert x86["name"] == "Intel(R) Xeon(R) Platinum 8480+ @ 2.00GHz"
    assert {"avx512_vnni", "amx_int8"} <= x86["flags"] and "fpu" in x86["flags"]
    arm = parse_cpuinfo(ARM_CPUINFO)
    assert arm["id"] == {"vendor": "0x41", "family": "8", "model": "0xd0c"}
    assert {"asimddp", "i8mm"} <= arm["flags"]


def env(cpu: str, ident: dict | None = None, **isa: bool) -> dict:
    doc = {"cpu": cpu, "isa": {"avx2": True, "avx512_vnni": True, "amx_int8": False, **isa}}
    if ident is not None:
        doc["cpu_id"] = ident
    return doc


SPR = {"vendor": "GenuineIntel", "family": "6", "model": "143"}


def test_the_same_cpu_under_another_name_is_not_a_difference():
    then = env("Intel(R) Xeon(R) Platinum 8480+ @ 2.00GHz", SPR)
    assert cpu_difference(then, env("Intel(R) Xeon(R) Processor", SPR)) is None
    old = env("Intel(R) Xeon(R) CPU @ 2.10GHz")  # recorded before cpu_id existed
    assert cpu_difference(old, env("Intel(R)  Xeon(R) CPU", SPR)) is None
    assert cpu_difference(old, env("Intel(R) Xeon(R) CPU @ 2.20 GHz", SPR)) is None


def test_a_different_isa_says_which_flags_differ():
    then = env("Xeon", SPR, amx_int8=False)
    assert cpu_difference(then, env("Xeon", SPR, amx_int8=True)) == "baseline CPU lacks amx_int8"
    here = env("Xeon", SPR, avx512_vnni=False, amx_int8=False)
    assert cpu_difference(env("Xeon", SPR), here) == "this CPU lacks avx512_vnni"
    # a flag only one record knows about says nothing
    assert cpu_difference({**then, "isa": {"fma": True}}, env("Xeon", SPR, amx_int8=False)) is None


def test_a_different_part_or_name_is_named():
    icx = {**SPR, "model": "106"}
    message = cpu_difference(env("Xeon", icx), env("Xeon", SPR))
    assert "model 106" in message and "model 143" in message
    message = cpu_difference(env("Intel(R) Xeon(R) CPU @ 2.10GHz"), env("AMD EPYC 7B13", SPR))
    assert "Intel(R) Xeon(R) CPU @ 2.10GHz" in message and "AMD EPYC 7B13" in message


def test_a_check_notes_a_cpu_only_when_it_differs(tmp_path, fake_measure):
    here = environment()
    renamed = {**here, "cpu": here["cpu"] + " @ 9.99GHz"}
    result = run_check(
        CheckRequest(write_doc(tmp_path / "a.json", baseline_doc(environment=renamed)))
    )
    assert "different CPU" not in result.message
    assert "note: the baseline pins no candidate" in result.message  # made before pinning
    flag, present = next(iter(here["isa"].items()))
    other = {**here, "isa": {**here["isa"], flag: not present}}
    result = run_check(
        CheckRequest(write_doc(tmp_path / "b.json", baseline_doc(environment=other)))
    )
    lacks = "baseline CPU lacks" if present else "this CPU lacks"
    assert f"note: baseline measured on a different CPU ({lacks} {flag})" in result.message
