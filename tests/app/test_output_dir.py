"""One build per output folder, and no debris of dead runs (deploy.app.output_dir)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from qat_deploy.deploy.app.output_dir import (
    LOCK_NAME,
    owned,
    remove_own_temps,
    remove_stale_temps,
    report_problems,
    sha256,
)
from qat_deploy.deploy.common.errors import EnvironmentFaultError


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_held_folder_is_refused_naming_the_holder(tmp_path):
    with owned(tmp_path), pytest.raises(EnvironmentFaultError, match=f"pid {os.getpid()}"):
        with owned(tmp_path):
            pass
    with owned(tmp_path):  # released on exit
        pass


def test_a_lock_of_a_killed_holder_is_taken_over(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from qat_deploy.deploy.app.output_dir import owned\n"
            f"with owned({str(tmp_path)!r}):\n    print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(EnvironmentFaultError, match=f"pid {holder.pid}"), owned(tmp_path):
        pass
    holder.kill()
    holder.wait()
    started = time.monotonic()
    with owned(tmp_path):
        assert (tmp_path / LOCK_NAME).read_text() == str(os.getpid())
    assert time.monotonic() - started < 5


def test_only_dead_writers_temp_files_are_removed(tmp_path):
    (tmp_path / "fp32").mkdir()
    dead = tmp_path / "fp32" / f".engine.onnx.{_dead_pid()}.0123abcd.tmp"
    mine = tmp_path / f".model.qdq.onnx.{os.getpid()}.89abcdef.tmp"
    user = tmp_path / ".notes.tmp"  # not ours: no writer pid
    for path in (dead, mine, user):
        path.write_bytes(b"x")
    assert remove_stale_temps(tmp_path) == [dead]
    assert not dead.exists() and mine.exists() and user.exists()


def test_a_run_removes_its_own_temp_files_only(tmp_path):
    (tmp_path / "fp32").mkdir()
    mine = tmp_path / "fp32" / f".engine.onnx.{os.getpid()}.0123abcd.tmp"
    dead = tmp_path / f".model.qdq.onnx.{_dead_pid()}.89abcdef.tmp"
    live = tmp_path / f".model.qdq.onnx.{os.getppid()}.89abcdef.tmp"  # another running writer
    user = tmp_path / ".notes.tmp"
    for path in (mine, dead, live, user):
        path.write_bytes(b"x")
    assert remove_own_temps(tmp_path) == [mine]
    assert not mine.exists() and dead.exists() and live.exists() and user.exists()


def test_report_problems_finds_a_swapped_artifact(tmp_path):
    model = tmp_path / "model.qdq.onnx"
    model.write_bytes(b"the model this run wrote")
    report = {
        "status": "ok",
        "exit_code": 0,
        "artifacts": {"qdq_onnx": {"path": str(model), "sha256": sha256(model)}},
    }
    (tmp_path / "report.json").write_text(json.dumps(report))
    assert report_problems(tmp_path) == []
    model.write_bytes(b"another run's model")
    assert report_problems(tmp_path) == [f"qdq_onnx: {model} differs from its recorded sha256"]
    model.unlink()
    assert report_problems(tmp_path) == [f"qdq_onnx: {model} is missing"]


def test_sha256_matches_hashlib_on_a_multi_chunk_file(tmp_path):
    import hashlib

    data = os.urandom(3 * (1 << 20) + 5)
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    assert sha256(path) == hashlib.sha256(data).hexdigest()
