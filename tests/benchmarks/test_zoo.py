"""benchmarks/zoo.py's aggregation of repeated builds (the builds themselves are the zoo run)."""

from __future__ import annotations

import itertools

from benchmarks import zoo


def test_repeated_builds_report_the_median_speedup_and_every_run(monkeypatch, tmp_path):
    speedups = itertools.chain([1.3, None, 0.9, 1.1])
    monkeypatch.setattr(
        zoo, "run_one", lambda model, target, args: {"speedup": next(speedups), "seconds": 1.0}
    )
    args = zoo.parse(["--repeat", "4", "--out", str(tmp_path)])
    row = zoo.run_repeated("tv_mobilenet_v3_small", "onnxruntime", args)
    assert row["speedup"] == 1.1  # the median of the three measured, not of the last run
    assert row["speedup_runs"] == [1.3, None, 0.9, 1.1]
    assert zoo._speedup_cell(row) == "1.10 (0.90-1.30, 3 runs)"


def test_one_build_keeps_its_own_speedup(monkeypatch, tmp_path):
    monkeypatch.setattr(zoo, "run_one", lambda model, target, args: {"speedup": 0.97})
    row = zoo.run_repeated("tv_mobilenet_v3_small", "onnxruntime", zoo.parse([]))
    assert row == {"speedup": 0.97} and zoo._speedup_cell(row) == "0.97"
