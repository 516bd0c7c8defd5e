"""The console script: exit codes and one-line errors, run as a user would run it."""

from __future__ import annotations

import subprocess
import sys

from qat_deploy.deploy.common import errors


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qat_deploy.deploy.app.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_selfcheck_passes_against_onnxruntime():
    proc = run_cli("selfcheck")
    assert proc.returncode == errors.OK, proc.stderr
    assert "MISMATCH" not in proc.stdout and proc.stdout.count("ok") >= 4


def test_unknown_command_is_one_line_usage_error():
    proc = run_cli("frobnicate")
    assert proc.returncode == errors.BAD_INPUT
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "frobnicate" in proc.stderr


def test_the_summary_ends_with_next_commands_that_work(tmp_path):
    out = tmp_path / "onnxruntime"
    proc = run_cli("build", "--target", "onnxruntime", "--export-only", "--out", str(out))
    assert proc.returncode == errors.OK, proc.stderr
    lines = proc.stdout.rstrip().split("next:\n", 1)[1].splitlines()
    commands = [line.strip().split("   #")[0].split() for line in lines]
    assert {c[3] for c in commands if c[:2] == ["deploy", "build"]} >= {"openvino", "tensorrt"}
    (lint,) = (c for c in commands if c[:2] == ["deploy", "lint"])
    proc = run_cli(*lint[1:])  # the suggested lint runs on the file this build wrote
    assert proc.returncode == errors.OK, proc.stdout + proc.stderr
