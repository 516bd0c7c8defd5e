"""The report.json schema accepts what builds write (see the read_report calls across the
tests) and refuses what a reader must never see."""

from __future__ import annotations

import json

import pytest

from qat_deploy.deploy.app.pipeline import REPORT_SCHEMA_VERSION
from tests.report_schema import read_report

RUNNING = {
    "schema_version": REPORT_SCHEMA_VERSION,
    "target": "onnxruntime",
    "status": "running",
    "pid": 4242,
    "stages": {},
    "artifacts": {},
}


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"status": "ok"}, "exit_code"),  # "ok" without its exit code
        ({"status": "ok", "exit_code": 3}, "exit_code"),
        ({"status": "failed: lint", "exit_code": 0}, "exit_code"),
        ({"status": "done"}, "status"),
        ({"artifacts": {"qdq_onnx": {"path": "m.onnx", "sha256": "abc"}}}, "sha256"),
        ({"latency_ms": "slow"}, "latency_ms"),
        ({"latency_ms": {"measured": False, "reason": ""}}, "latency_ms"),  # no reason given
        # a figure not taken carries no number that could be read as one
        ({"speedup": {"measured": False, "reason": "no GPU", "value": 1.0}}, "speedup"),
        ({"speedup": {"measured": True, "value": 0}}, "speedup"),
        ({"stages": {"prepare": "done", "deploy": "done"}}, "stages"),
        ({"schema_version": 1}, "schema_version"),
    ],
)
def test_the_schema_refuses_reports_that_would_mislead(tmp_path, change, problem):
    (tmp_path / "report.json").write_text(json.dumps(RUNNING))
    assert read_report(tmp_path)["status"] == "running"
    (tmp_path / "report.json").write_text(json.dumps({**RUNNING, **change}))
    with pytest.raises(AssertionError, match=problem):
        read_report(tmp_path)
