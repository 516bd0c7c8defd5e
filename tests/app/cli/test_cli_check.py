"""`deploy check` as CI runs it: exit codes, one-line errors, the JUnit file, a real pass.

Bad inputs are refused before anything is exported or timed, so those cases run through the
CLI's main() in this process. The real pass measures mnist_cnn on onnxruntime briefly; it asserts
the outcome of the gate, never a speed.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from unittest import mock

from qat_deploy.deploy.app.cli import main
from qat_deploy.deploy.common import errors
from qat_deploy.deploy.common.environment import environment
from tests.app.gate.test_gate import baseline_doc, tiny_onnx, write_doc

REPO = Path(__file__).resolve().parents[3]
COMMITTED = REPO / "ci" / "baselines" / "mnist_cnn-onnxruntime.json"


def run_check(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`deploy check ARGS` as a process: what CI runs (the real pass, and code on PYTHONPATH)."""
    return subprocess.run(
        [sys.executable, "-m", "qat_deploy.deploy.app.cli", "check", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env=env,
    )


def check_in_process(*args: str | Path) -> subprocess.CompletedProcess:
    """The same command through deploy.app.cli.main in this process: refusals that happen before
    any work, without an interpreter start-up (several seconds each on a 2-core machine)."""
    argv = ["deploy", "check", *map(str, args)]
    out, err = io.StringIO(), io.StringIO()
    with (
        mock.patch.object(sys, "argv", argv),
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
    ):
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def assert_one_line_error(proc: subprocess.CompletedProcess, code: int, *words: str) -> None:
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for word in words:
        assert word in lines[0]


def test_missing_baseline(tmp_path):
    proc = check_in_process("--baseline", tmp_path / "absent.json")
    assert_one_line_error(proc, errors.BAD_INPUT, "baseline not found", "absent.json")


def test_corrupt_baseline_json(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"schema": 1, "model": "mnist_cnn", "ratio": {')
    assert_one_line_error(
        check_in_process("--baseline", path), errors.BAD_INPUT, "corrupt baseline"
    )


def test_baseline_with_a_wrong_field(tmp_path):
    path = write_doc(tmp_path / "b.json", baseline_doc(threads=0))
    assert_one_line_error(check_in_process("--baseline", path), errors.BAD_INPUT, "'threads' is 0")


def test_bad_tolerance(tmp_path):
    baseline = shutil.copy(COMMITTED, tmp_path / "b.json")
    proc = check_in_process("--baseline", baseline, "--tolerance", "ten%")
    assert_one_line_error(proc, errors.BAD_INPUT, "bad tolerance 'ten%'")


def test_unknown_model_in_baseline_writes_a_junit_error(tmp_path):
    path = write_doc(tmp_path / "b.json", baseline_doc(model="resnet19"))
    report = tmp_path / "reports" / "gate.xml"
    proc = check_in_process("--baseline", path, "--junit", report)
    assert_one_line_error(proc, errors.BAD_INPUT, "unknown model 'resnet19'")
    case = ET.parse(report).getroot().find("testsuite/testcase")
    assert case.get("name") == "b" and "resnet19" in case.find("error").get("message")


def test_model_code_named_by_a_baseline_is_refused_not_run(tmp_path):
    """A baseline from a CI artifact naming `module:factory` must not run that module."""
    marker = tmp_path / "ran"
    (tmp_path / "payload.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    path = write_doc(tmp_path / "b.json", baseline_doc(model="payload:make"))
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    proc = run_check("--baseline", path, env=env)
    assert_one_line_error(
        proc, errors.BAD_INPUT, "'payload:make'", "--model payload:make", "--trust-baseline-model"
    )
    assert not marker.exists()
    proc = run_check("--baseline", path, "--model", "mnist_cnn", env=env)
    assert_one_line_error(proc, errors.BAD_INPUT, "--model mnist_cnn is not the model")
    assert not marker.exists()


def test_update_of_a_read_only_baseline_is_refused(tmp_path):
    baseline = shutil.copy(COMMITTED, tmp_path / "b.json")
    os.chmod(baseline, 0o444)
    proc = check_in_process("--baseline", baseline, "--update-baseline")
    assert_one_line_error(proc, errors.BAD_INPUT, str(baseline), "read-only")
    assert Path(baseline).read_bytes() == COMMITTED.read_bytes()
    assert stat.S_IMODE(os.stat(baseline).st_mode) == 0o444


def test_unknown_target_in_baseline(tmp_path):
    path = write_doc(tmp_path / "b.json", baseline_doc(target="tensorflow"))
    assert_one_line_error(check_in_process("--baseline", path), errors.BAD_INPUT, "unknown target")


def test_tensorrt_latency_is_backend_unavailable_here(tmp_path):
    """TensorRT builds here (TensorRT-RTX, or fails as not installed) but cannot be timed."""
    path = write_doc(tmp_path / "b.json", baseline_doc(target="tensorrt"))
    model = tiny_onnx(tmp_path / "fp32.onnx")
    report = tmp_path / "gate.xml"
    proc = check_in_process(
        "--baseline", path, "--candidate", model, "--reference", model, "--junit", report
    )
    assert_one_line_error(proc, errors.BACKEND_UNAVAILABLE, "tensorrt")
    assert ET.parse(report).getroot().find("testsuite").get("skipped") == "1"


def test_real_update_then_pass_on_mnist_cnn_onnxruntime(tmp_path):
    """The whole default path twice: export from the repo, build, time, bootstrap."""
    path = tmp_path / "mnist.json"
    update = run_check(
        "--baseline", path, "--update-baseline", "--model", "mnist_cnn",
        "--target", "onnxruntime", "--min-time", "0.5",
    )  # fmt: skip
    assert update.returncode == errors.OK, update.stderr
    assert "baseline updated" in update.stdout
    saved = json.loads(path.read_text())
    assert saved["model"] == "mnist_cnn" and saved["ratio"]["low"] <= saved["ratio"]["high"]
    pinned = tmp_path / saved["pinned_candidate"]["path"]
    assert pinned.name == "mnist.candidate.onnx" and pinned.is_file()
    assert saved["environment"]["cpu_id"] == environment()["cpu_id"]
    report = tmp_path / "gate.xml"
    check = run_check("--baseline", path, "--min-time", "0.5", "--junit", report)
    assert check.returncode == errors.OK, check.stdout + check.stderr
    # the repo's export is deterministic, so the candidate is the pinned file: not timed
    assert ": pass" in check.stdout and "vs pinned candidate: the same file" in check.stdout
    suite = ET.parse(report).getroot().find("testsuite")
    assert suite.get("failures") == "0" and suite.get("errors") == "0"
