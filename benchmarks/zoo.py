"""The third-party test zoo (models/thirdparty.py) through the real pipeline, on every target.

Each model x target runs ``deploy.app.pipeline.build`` in its own subprocess with a timeout, so one
crash, hang or out-of-memory does not end the run; TensorRT builds with TensorRT-RTX on a CPU
(the adapter's fallback) and reports no latency there. Per run it keeps: the exit code, the
one-line error, the lint violation count, whether placement fell back ("placement_mode" ==
"fallback"), int8 compute layers / total, the int8 speedup and the int8-vs-fp32 cosine.
Results merge by (model, target) into docs/zoo_results.json, so runs per model accumulate;
docs/zoo.md is re-rendered from all of them. Heavy models run last.

    python -m benchmarks.zoo --model tv_mobilenet_v3_small --target onnxruntime \
        --threads 2 --out out/zoo
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

from qat_deploy.deploy.common.environment import environment
from qat_deploy.models.thirdparty import HEAVY, ZOO

TARGETS = ("tensorrt", "openvino", "onnxruntime")
DOCS = Path(__file__).resolve().parents[1] / "docs"
RESULTS = DOCS / "zoo_results.json"
TABLE = DOCS / "zoo.md"
ERROR_FILE = "error.txt"
TIMEOUT_EXIT = "timeout"


def worker(model: str, target: str, out: Path, args: argparse.Namespace) -> int:
    """One build in this process; the exit code is the pipeline's (1 for a crash)."""
    from qat_deploy.deploy.app.pipeline import BuildOptions, build
    from qat_deploy.deploy.common.errors import DeployError, one_line

    options = BuildOptions(
        target=target,
        model=f"qat_deploy.models.thirdparty:{model}",
        out_dir=out,
        threads=args.threads,
        calib_batches=args.calib_batches,
        batch_size=args.batch_size,
        eval_samples=args.eval_samples,
        min_time_s=args.min_time_s,
    )
    started = time.perf_counter()

    def progress(stage: str) -> None:  # stage times in log.txt: where a slow build goes
        print(f"[{time.perf_counter() - started:7.1f} s] {stage} done", flush=True)

    try:
        build(options, progress)
    except DeployError as exc:
        (out / ERROR_FILE).write_text(one_line(exc))
        return exc.exit_code
    except Exception as exc:  # a crash is a result here, not the end of the run
        traceback.print_exc()
        (out / ERROR_FILE).write_text(f"{type(exc).__name__}: {one_line(exc)}")
        return 1
    return 0


def run_one(model: str, target: str, args: argparse.Namespace) -> dict:
    """Build in a subprocess and summarise what it left behind."""
    out = Path(args.out) / model / target
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("report.json", ERROR_FILE):
        (out / stale).unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "benchmarks.zoo", "--worker", model, target, *_shared(args)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    started = time.perf_counter()
    log = out / "log.txt"
    with log.open("w") as sink:
        try:
            exit_code: int | str = subprocess.run(
                cmd, stdout=sink, stderr=subprocess.STDOUT, timeout=args.timeout, env=env
            ).returncode
        except subprocess.TimeoutExpired:
            exit_code = TIMEOUT_EXIT
    seconds = round(time.perf_counter() - started, 1)
    return summarise(model, target, exit_code, seconds, out, args.timeout)


def run_repeated(model: str, target: str, args: argparse.Namespace) -> dict:
    """run_one `args.repeat` times: the last run's row, with the median speedup of all runs
    that measured one and each run's value ("speedup_runs"). Separate builds, because on a
    shared machine one build's paired ratio wanders by 10% or more between runs."""
    rows = [run_one(model, target, args) for _ in range(args.repeat)]
    row = rows[-1]
    if args.repeat > 1:
        measured = [r["speedup"] for r in rows if r["speedup"] is not None]
        row["speedup_runs"] = [r["speedup"] for r in rows]
        row["speedup"] = statistics.median(measured) if measured else None
    return row


def summarise(
    model: str, target: str, exit_code: int | str, seconds: float, out: Path, timeout: float
) -> dict:
    """The row for one build from its exit code, error.txt and report.json."""
    report = _read_json(out / "report.json") or {}
    error = (out / ERROR_FILE).read_text().strip() if (out / ERROR_FILE).exists() else ""
    if exit_code == TIMEOUT_EXIT:
        error = f"timed out after {timeout:g} s"
    elif exit_code != 0 and not error:
        error = _last_line(out / "log.txt") or f"exit {exit_code} with no report"
    kernels = report.get("kernels") or {}
    int8, floats = kernels.get("int8"), kernels.get("float")
    accuracy = report.get("accuracy")
    cosine = None
    if accuracy and accuracy["measured"]:
        cosine = accuracy["int8_vs_fp32"]["cosine"]
    speedup, latency = report.get("speedup"), report.get("latency_ms")
    return {
        "model": model,
        "family": ZOO[model][1],
        "heavy": model in HEAVY,
        "target": target,
        "exit_code": exit_code,
        "error": error,
        "stages": list((report.get("stages") or {}).keys()),
        "lint_violations": len(report["lint"]) if isinstance(report.get("lint"), list) else None,
        "placement_mode": report.get("placement_mode"),
        "fallback": report.get("placement_mode") == "fallback",
        "int8_layers": int8,
        "compute_layers": None if int8 is None else int8 + (floats or 0),
        "float_by_rule": len(kernels.get("float_by_rule") or []),
        "speedup": speedup["value"] if speedup and speedup["measured"] else None,
        "latency": latency["reason"] if latency and not latency["measured"] else None,
        "cosine_int8_vs_fp32": cosine,
        "seconds": seconds,
    }


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _last_line(path: Path) -> str:
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines()]
    lines = [line for line in lines if line]
    return lines[-1][:300] if lines else ""


def _shared(args: argparse.Namespace) -> list[str]:
    """The options a worker needs, as command-line arguments."""
    return [
        "--out",
        str(Path(args.out) / "{model}" / "{target}"),
        "--threads",
        str(args.threads),
        "--calib-batches",
        str(args.calib_batches),
        "--batch-size",
        str(args.batch_size),
        "--eval-samples",
        str(args.eval_samples),
        "--min-time-s",
        str(args.min_time_s),
    ]


def merge(rows: list[dict], run: dict, path: Path = RESULTS) -> dict:
    """Fold new rows into the results file by (model, target); every row keeps its run."""
    data = _read_json(path) or {"results": []}
    by_key = {(r["model"], r["target"]): r for r in data["results"]}
    for row in rows:
        by_key[(row["model"], row["target"])] = {**row, **run}
    order = list(ZOO)
    data["results"] = sorted(
        by_key.values(),
        key=lambda r: (order.index(r["model"]) if r["model"] in order else 99, r["target"]),
    )
    path.write_text(json.dumps(data, indent=2) + "\n")
    return data


def _speedup(row: dict) -> float | None:
    """Rows of report schema 1 (before 2026-12-04 19:40 UTC) hold fp32 p50 / int8 p50 as
    speedup_p50; later ones the paired ratio (deploy.engines.timing.paired_ratio) as speedup."""
    return row["speedup"] if "speedup" in row else row.get("speedup_p50")


def _speedup_cell(row: dict) -> str:
    """The speedup, and for repeated builds "(lowest-highest, N runs)"."""
    runs = [v for v in row.get("speedup_runs") or [] if v is not None]
    text = _cell(_speedup(row), "{:.2f}")
    return text + (f" ({min(runs):.2f}-{max(runs):.2f}, {len(runs)} runs)" if runs else "")


def _cell(value: object, fmt: str = "{}") -> str:
    return "—" if value is None else fmt.format(value)


def render(data: dict, path: Path = TABLE) -> str:
    """docs/zoo.md: one row per model x target, then the runs that produced them."""
    lines = [
        "# Third-party test zoo",
        "",
        "Real architectures nobody on the team wrote (models/thirdparty.py), random weights",
        "except minilm_l6 (pretrained all-MiniLM-L6-v2), through `deploy build` on each target.",
        "Generated by `python -m benchmarks.zoo`; raw rows in `zoo_results.json`.",
        "TensorRT builds with TensorRT-RTX ahead of time on a CPU: no latency or accuracy there.",
        "int8 = int8 compute layers / all compute layers the backend reports (and how many of",
        "the float ones the target's rules keep float on purpose, deploy.lint.float_by_rule:",
        "onnxruntime's attention MatMuls, the CPU backends' ConvTranspose);",
        "speedup = int8 over fp32, timed interleaved: the paired ratio of block medians (rows",
        "before 2026-12-04 19:40 UTC: fp32 p50 / int8 p50); built with --repeat N: the median",
        "of N separate builds, their range and N in brackets;",
        "cosine = int8 engine vs fp32 engine on held-out synthetic inputs.",
        "",
        "| model | family | target | exit | lint | mode | int8 | speedup | cosine | s | error |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["results"]:
        int8 = f"{r['int8_layers']}/{r['compute_layers']}" if r["int8_layers"] is not None else "—"
        if r.get("float_by_rule"):
            int8 += f" (+{r['float_by_rule']} float by rule)"
        error = r["error"].replace("|", "\\|")
        if len(error) > 160:
            error = error[:157] + "..."
        name = r["model"] + (" (heavy)" if r.get("heavy") else "")
        lines.append(
            f"| {name} | {r['family']} | {r['target']} | {r['exit_code']} "
            f"| {_cell(r['lint_violations'])} | {_cell(r['placement_mode'])} | {int8} "
            f"| {_speedup_cell(r)} | {_cell(r['cosine_int8_vs_fp32'], '{:.4f}')} "
            f"| {r['seconds']:.0f} | {error} |"
        )
    runs = sorted({(r["date"], r["cpu"], r["command"]) for r in data["results"]})
    lines += ["", "## Runs", ""]
    for date, cpu, command in runs:
        lines += [f"- {date}, {cpu}:", f"  `{command}`"]
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def _cpu() -> str:
    """The CPU's name, its count and whether it has int8 dot products: two "AMD EPYC" hosts
    (Zen 1 without VNNI, Zen 4 with it) give int8 speedups of 0.5x and 1.6x on one model."""
    env = environment()
    isa = [flag for flag in ("avx512_vnni", "avx_vnni", "amx_int8") if env["isa"].get(flag)]
    return f"{env['cpu']}, {env['logical_cpus']} CPUs, {' + '.join(isa) or 'no VNNI'}"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", dest="models", choices=list(ZOO))
    parser.add_argument("--target", action="append", dest="targets", choices=TARGETS)
    parser.add_argument("--light", action="store_true", help="skip the heavy models")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="out/zoo", help="build folders go here")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per build")
    parser.add_argument("--calib-batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-samples", type=int, default=64)
    parser.add_argument("--min-time-s", type=float, default=0.5)
    parser.add_argument(
        "--repeat", type=int, default=1, help="builds per model x target; speedup = their median"
    )
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--table", type=Path, default=TABLE)
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "TARGET"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.worker:
        model, target = args.worker
        out = Path(args.out.format(model=model, target=target))
        return worker(model, target, out, args)
    models = args.models or [m for m in ZOO if not (args.light and m in HEAVY)]
    models = sorted(dict.fromkeys(models), key=lambda m: m in HEAVY)  # heavy last, else as given
    targets = args.targets or list(TARGETS)
    run = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "cpu": _cpu(),
        "command": "python -m benchmarks.zoo " + shlex.join(sys.argv[1:] if argv is None else argv),
    }
    for model in models:
        rows = []
        for target in targets:
            row = run_repeated(model, target, args)
            rows.append(row)
            print(
                f"{model:28s} {target:12s} exit={row['exit_code']!s:7s} "
                f"lint={_cell(row['lint_violations'])} int8={_cell(row['int8_layers'])}/"
                f"{_cell(row['compute_layers'])} speedup={_cell(row['speedup'], '{:.2f}')} "
                f"cos={_cell(row['cosine_int8_vs_fp32'], '{:.4f}')} {row['seconds']:.0f}s "
                f"{row['error'][:120]}",
                flush=True,
            )
        render(merge(rows, run, args.results), args.table)  # after every model: partial runs
    return 0


if __name__ == "__main__":
    sys.exit(main())
