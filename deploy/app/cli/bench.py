"""`deploy bench`: fp32 vs int8 latency over a matrix, written as JSON, Markdown and PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from qat_deploy.deploy.app.cli.app import app, console, err_console

DEFAULT_OUT = Path("bench-results")


@app.command("bench")
def bench_command(
    models: Annotated[
        list[str] | None,
        typer.Option("--model", "-m", help="Zoo model (repeatable). Default: digits_resnet."),
    ] = None,
    targets: Annotated[
        list[str] | None,
        typer.Option(
            "--target", "-t", help="Backend (repeatable). Default: onnxruntime, openvino."
        ),
    ] = None,
    precisions: Annotated[
        list[str] | None,
        typer.Option("--precision", help="fp32 and/or int8 (repeatable). Default: both."),
    ] = None,
    batches: Annotated[
        list[int] | None, typer.Option("--batch", "-b", help="Batch size (repeatable). Default: 1.")
    ] = None,
    threads: Annotated[
        list[int] | None, typer.Option("--threads", help="Thread count (repeatable). Default: 2.")
    ] = None,
    min_time: Annotated[
        float, typer.Option("--min-time", help="Seconds of timed runs per engine, at least.")
    ] = 1.0,
    min_runs: Annotated[
        int, typer.Option("--min-runs", help="Timed runs per engine, at least.")
    ] = 50,
    qdq: Annotated[
        Path | None, typer.Option("--qdq", help="Existing int8 QDQ ONNX instead of exporting.")
    ] = None,
    fp32: Annotated[
        Path | None, typer.Option("--fp32", help="Existing fp32 ONNX instead of exporting.")
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory.")] = DEFAULT_OUT,
) -> None:
    """Time fp32 and int8 engines in interleaved blocks; write bench.json, bench.md, bench.png.

    Targets that cannot be timed here (TensorRT without a GPU) are built and reported as
    "not measured: <reason>". With --qdq/--fp32 the files are timed as given (static shapes)
    and --model only labels them.
    """
    from dataclasses import replace

    from qat_deploy.deploy.app import bench
    from qat_deploy.deploy.app.output_dir import owned
    from qat_deploy.deploy.engines.adapter import PRECISIONS

    onnx_files = {p: f for p, f in (("int8", qdq), ("fp32", fp32)) if f is not None}
    request = bench.BenchRequest(
        models=tuple(models or (["model"] if onnx_files else bench.DEFAULT_MODELS)),
        targets=tuple(targets or bench.DEFAULT_TARGETS),
        precisions=tuple(precisions or list(onnx_files) or PRECISIONS),
        batches=tuple(batches or [1]),
        threads=tuple(threads or [2]),
        timing=replace(bench.BENCH_TIMING, min_time_s=min_time, min_runs=min_runs),
        onnx_files=onnx_files,
    )
    bench.require_matplotlib()
    with owned(out):  # a file, an unwritable folder or another run there fails before timing
        rows = bench.run_bench(
            request, out, progress=lambda m: err_console.print(m, markup=False, highlight=False)
        )
        paths = bench.write_reports(rows, request, out)
    _print_table(rows)
    console.print("wrote " + ", ".join(str(p) for p in paths), markup=False, soft_wrap=True)


def _print_table(rows) -> None:
    """p50, throughput and speedup per row; "not measured" reasons are long, so footnotes."""
    from qat_deploy.deploy.app.bench import speedup_cell

    table = Table(title="deploy bench (p50 ms; throughput = batch / p50)")
    for col in ("model", "target", "batch", "threads", "precision", "p50 ms", "samples/s"):
        table.add_column(col)
    table.add_column("int8 speedup")
    reasons: dict[str, int] = {}
    for r in rows:
        latency = r.latency_ms
        if not latency.measured:
            reasons.setdefault(f"not measured: {latency.reason}", len(reasons) + 1)
        table.add_row(
            r.model,
            r.target,
            str(r.batch),
            str(r.threads),
            r.precision,
            f"{latency.values['p50']:.3f}"
            if latency.measured
            else f"not measured [{reasons[f'not measured: {latency.reason}']}]",
            f"{r.throughput_sps:.1f}" if latency.measured else "-",
            speedup_cell(r),
        )
    console.print(table)
    for reason, n in reasons.items():
        console.print(f"[{n}] {reason}", markup=False, highlight=False, soft_wrap=True)
