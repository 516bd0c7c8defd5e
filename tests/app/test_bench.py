"""`deploy bench`: the three outputs and their keys, and honest "not measured" rows.

One real matrix (mnist_cnn on onnxruntime and tensorrt, briefly timed) is measured once for the
module; TensorRT cannot be timed on a machine without an NVIDIA GPU, so its rows must carry a
reason instead of numbers. No assertion depends on how fast this machine is.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from qat_deploy.deploy.app import bench
from qat_deploy.deploy.app.bench import BENCH_TIMING, BenchRequest, run_bench, write_reports
from qat_deploy.deploy.common.errors import BackendUnavailableError, BadInputError
from tests.app.gate.test_gate import tiny_onnx

QUICK = replace(BENCH_TIMING, warmup=2, block=5, min_runs=10, min_time_s=0.05)
LATENCY_KEYS = {"p50", "p90", "p99", "mean", "runs"}


@pytest.fixture(scope="module")
def bench_out(tmp_path_factory) -> tuple[Path, BenchRequest]:
    out = tmp_path_factory.mktemp("bench")
    request = BenchRequest(models=("mnist_cnn",), targets=("onnxruntime", "tensorrt"), timing=QUICK)
    write_reports(run_bench(request, out), request, out)
    return out, request


def test_writes_json_markdown_and_png(bench_out):
    out, _ = bench_out
    assert sorted(p.name for p in out.iterdir()) == ["bench.json", "bench.md", "bench.png", "onnx"]
    assert (out / "bench.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert not list(out.glob(".*.tmp"))
    onnx_files = sorted(p.name for p in (out / "onnx" / "mnist_cnn" / "batch1").iterdir())
    assert onnx_files == [
        "model.fp32.onnx",
        "model.onnxruntime.qdq.onnx",
        "model.tensorrt.qdq.onnx",
    ]


def test_json_rows_cover_the_matrix_with_the_expected_keys(bench_out):
    out, request = bench_out
    doc = json.loads((out / "bench.json").read_text())
    assert {"schema", "created_at", "environment", "timing", "results"} <= set(doc)
    assert {"cpu", "isa", "versions"} <= set(doc["environment"])
    assert doc["timing"]["min_time_s"] == request.timing.min_time_s
    rows = {(r["target"], r["precision"]): r for r in doc["results"]}
    assert set(rows) == {(t, p) for t in ("onnxruntime", "tensorrt") for p in ("int8", "fp32")}
    for row in doc["results"]:
        assert {"model", "batch", "threads", "input_shape", "onnx", "latency_ms"} <= set(row)
        assert row["batch"] == 1 and row["threads"] == 2 and row["input_shape"] == [1, 1, 16, 16]
    int8, fp32 = rows["onnxruntime", "int8"], rows["onnxruntime", "fp32"]
    assert set(int8["latency_ms"]) == {"measured", *LATENCY_KEYS}
    assert int8["latency_ms"]["measured"] is True and int8["latency_ms"]["runs"] >= 10
    assert int8["throughput_sps"] == pytest.approx(1e3 / int8["latency_ms"]["p50"])
    # the paired ratio lies within the spread of the two engines' own latencies
    lat8, lat32 = int8["latency_ms"], fp32["latency_ms"]
    assert int8["speedup"]["measured"] is True
    assert lat32["p50"] / lat8["p99"] <= int8["speedup"]["value"] <= lat32["p99"] / lat8["p50"]
    assert fp32["speedup"] is None
    assert int8["int8_layers"].split("/")[0].isdigit()


def test_unmeasurable_target_is_not_measured_never_a_number(bench_out):
    out, _ = bench_out
    doc = json.loads((out / "bench.json").read_text())
    for row in (r for r in doc["results"] if r["target"] == "tensorrt"):
        assert row["latency_ms"]["measured"] is False and "GPU" in row["latency_ms"]["reason"]
        assert set(row["latency_ms"]) == {"measured", "reason"}  # no number to misread
        assert row["throughput_sps"] is None
        assert row["speedup"] is None or row["speedup"]["measured"] is False
    table = (out / "bench.md").read_text()
    trt_lines = [line for line in table.splitlines() if "| tensorrt |" in line]
    assert len(trt_lines) == 2 and all("not measured: " in line for line in trt_lines)
    ort_lines = [line for line in table.splitlines() if "| onnxruntime |" in line]
    assert len(ort_lines) == 2 and not any("not measured" in line for line in ort_lines)


def test_backend_not_installed_is_a_not_measured_row(tmp_path, monkeypatch):
    """Existing ONNX files, and an adapter whose build says the backend is missing."""

    class Missing:
        def build(self, *args, **kwargs):
            raise BackendUnavailableError("openvino backend unavailable: not installed")

    monkeypatch.setattr(bench, "get_adapter", lambda target: Missing())
    request = BenchRequest(
        models=("tiny",),
        targets=("openvino",),
        precisions=("fp32",),
        onnx_files={"fp32": tiny_onnx(tmp_path / "t.onnx")},
    )
    (row,) = run_bench(request, tmp_path)
    assert row.precision == "fp32" and not row.latency_ms.measured
    assert row.latency_ms.reason.startswith("openvino backend unavailable")
    assert row.throughput_sps is None and row.input_shape == [1, 1, 16, 16]


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"batches": (0,)}, "bad batch size 0"),
        ({"threads": ()}, "thread count"),
        ({"precisions": ("int4",)}, "bad precision"),
        ({"targets": ()}, "no target"),
        ({"models": ("a", "b"), "onnx_files": {"fp32": Path("x.onnx")}}, "one --model"),
        ({"models": ("a",), "onnx_files": {"fp32": Path("x.onnx")}}, "for precision int8"),
    ],
)
def test_bad_requests_are_bad_input(changes, problem):
    with pytest.raises(BadInputError, match=problem):
        BenchRequest(**changes)


def test_unknown_target_fails_before_exporting(tmp_path):
    with pytest.raises(BadInputError, match="unknown target 'cuda'"):
        run_bench(BenchRequest(targets=("cuda",)), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_existing_onnx_must_have_the_requested_batch(tmp_path):
    request = BenchRequest(
        models=("tiny",),
        targets=("onnxruntime",),
        batches=(4,),
        precisions=("fp32",),
        onnx_files={"fp32": tiny_onnx(tmp_path / "t.onnx")},
    )
    with pytest.raises(BadInputError, match="batch size 1, not the requested 4"):
        run_bench(request, tmp_path)
