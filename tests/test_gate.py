"""The latency gate's logic without timing anything: decisions on synthetic block medians,
tolerance parsing, baseline validation, atomic baseline updates and the JUnit report.

No assertion here depends on how fast this machine is.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from deploy import gate
from deploy.errors import BackendUnavailableError, BadInputError
from deploy.gate import (
    CheckRequest,
    RatioCI,
    Reference,
    block_medians,
    bootstrap_ratio,
    decide,
    failed_result,
    junit_xml,
    load_baseline,
    parse_tolerance,
    run_check,
    write_junit,
)

REPO = Path(__file__).resolve().parents[1]
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
    state = {"ratio": 1.2, "calls": 0}

    def measure(baseline, candidate, reference, timing, tmp):
        state["calls"] += 1
        state["files"] = (candidate, reference)
        return synthetic_blocks(state["ratio"], noise=0.01), {"candidate": 0.12, "reference": 0.1}

    def export(name, target, out_dir, *, input_shape, precisions):
        out_dir.mkdir(parents=True, exist_ok=True)
        return {
            p: tiny_onnx(out_dir / f"{p}.onnx", qdq=p == "int8", shape=input_shape)
            for p in precisions
        }

    monkeypatch.setattr(gate, "_measure", measure)
    monkeypatch.setattr(gate, "export_model", export)
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
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.json"]  # no temp files left


def test_failed_update_leaves_the_old_baseline(tmp_path, fake_measure, monkeypatch):
    path = write_doc(tmp_path / "b.json", baseline_doc())
    before = path.read_bytes()

    def broken(*args):
        raise BackendUnavailableError("engine vanished")

    monkeypatch.setattr(gate, "_measure", broken)
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
    with pytest.raises(BadInputError, match="--model, --threads only apply"):
        run_check(CheckRequest(path, model="resnet18", threads=4))


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
    assert fake_measure["files"][0] == qdq


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
    assert fake_measure["files"][1] == tmp_path / "b.reference.onnx"
    tiny_onnx(tmp_path / "b.reference.onnx", qdq=False)  # someone replaced the artifact
    with pytest.raises(BadInputError, match="not the one the baseline pinned"):
        run_check(CheckRequest(path))


def test_failed_pinning_writes_nothing(tmp_path, fake_measure, monkeypatch):
    def broken(*args):
        raise BackendUnavailableError("engine vanished")

    monkeypatch.setattr(gate, "_measure", broken)
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
