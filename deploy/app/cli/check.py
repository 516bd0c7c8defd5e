"""`deploy check`: the CI latency regression gate (see deploy.app.gate and ci/README.md)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from qat_deploy.deploy.app.cli.app import app, console
from qat_deploy.deploy.common import errors


@app.command("check")
def check_command(
    baseline: Annotated[
        Path, typer.Option("--baseline", help="Baseline JSON, e.g. ci/baselines/NAME.json.")
    ],
    tolerance: Annotated[
        str | None,
        typer.Option("--tolerance", help="Allowed slowdown, e.g. 10%. Default: the baseline's."),
    ] = None,
    junit: Annotated[
        Path | None, typer.Option("--junit", help="Write a JUnit XML report here.")
    ] = None,
    update_baseline: Annotated[
        bool, typer.Option("--update-baseline", help="Measure and rewrite the baseline.")
    ] = False,
    candidate: Annotated[
        Path | None,
        typer.Option("--candidate", help="Candidate ONNX. Default: built from the repo's code."),
    ] = None,
    reference: Annotated[
        Path | None,
        typer.Option("--reference", help="Reference ONNX. Default: the baseline's reference."),
    ] = None,
    pin_reference: Annotated[
        bool,
        typer.Option("--pin-reference", help="With --update-baseline: pin --reference FILE."),
    ] = False,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            help="The model: with --update-baseline, the one to measure; with a check, must be "
            "the baseline's, and lets its package.module:factory code be imported.",
        ),
    ] = None,
    target: Annotated[
        str | None, typer.Option("--target", help="With --update-baseline: the target.")
    ] = None,
    threads: Annotated[
        int | None, typer.Option("--threads", help="With --update-baseline: thread count.")
    ] = None,
    min_time: Annotated[
        float, typer.Option("--min-time", help="Seconds of timed runs per engine, at least.")
    ] = 2.0,
    trust_baseline_model: Annotated[
        bool,
        typer.Option(
            "--trust-baseline-model",
            help="Import the package.module:factory the baseline names (a baseline is data: "
            "without this or --model, such code is never imported).",
        ),
    ] = False,
) -> None:
    """Fail (exit 5) when the candidate is significantly slower than the baseline allows.

    Candidate and reference (the fp32 model, or a pinned artifact) are timed interleaved in
    the same run; their p50 ratio is compared with the baseline's by a bootstrap confidence
    interval. The int8 candidate the baseline measured, pinned beside it, is timed in the same
    run too, and the candidate must not be significantly slower than it beyond the tolerance.

    A baseline is data: a model it names as package.module:factory is imported only with
    --model (the same reference) or --trust-baseline-model; built-in zoo names always work.
    --update-baseline refuses a read-only baseline (or folder) before measuring.

    Exit codes: 0 pass, 5 regression, 2 bad input, 3 backend cannot be timed here.
    """
    from qat_deploy.deploy.app.gate import CheckRequest, failed_result, run_check, write_junit

    request = CheckRequest(
        baseline=baseline,
        tolerance=tolerance,
        candidate=candidate,
        reference=reference,
        update=update_baseline,
        pin_reference=pin_reference,
        model=model,
        target=target,
        threads=threads,
        min_time_s=min_time,
        trust_model=trust_baseline_model,
    )
    started = time.perf_counter()
    try:
        result = run_check(request)
    except errors.DeployError as exc:
        if junit is not None:
            write_junit(junit, failed_result(baseline, exc, time.perf_counter() - started))
        raise
    if junit is not None:
        write_junit(junit, result)
    if result.status == "regression":
        raise errors.LatencyRegressionError(result.message)
    console.print(result.message, markup=False, highlight=False, soft_wrap=True)
