"""Signals at random moments of `deploy build`: the folder must never describe a mix.

Runs one complete build, then N builds into the same folder, each hit by SIGINT, SIGTERM or
SIGKILL after a random delay (seeded) within the measured length of a build. After each it
checks what a CI job reading the folder would rely on:
- the exit code is the signal's documented one (130 / 143; -9 for SIGKILL), or 0 when the build
  finished first;
- report.json says `interrupted by ...`, `ok`, or `running` with this run's dead pid (SIGKILL:
  nothing can be written), or is the previous run's unchanged (hit before the build took the
  folder), and every artifact it lists matches its sha256 (deploy.app.output_dir.report_problems);
- temp files of a killed writer are gone once the next build has taken the folder.

    python -m benchmarks.interrupt_storm --runs 20 --seed 0

Writes docs/reliability.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qat_deploy.deploy.app.output_dir import report_problems

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "reliability.md"
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGKILL)
EXPECTED = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGKILL: -9}


def build(out: Path, target: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "deploy", "build", "--target", target, "--out", str(out)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def verdict(out: Path, signum: int, code: int, pid: int, before: bytes) -> tuple[str, list[str]]:
    """(report status, problems) of the folder after one injection. `before` is the report
    the previous run left."""
    report = json.loads((out / "report.json").read_text())
    status, name = report["status"], signal.Signals(signum).name
    problems = [p for p in report_problems(out) if not p.startswith("temp file left")]
    expected = (0, EXPECTED[signum])
    if report.get("pid") != pid:  # hit before it took the folder: the previous result stays
        if (out / "report.json").read_bytes() != before:
            problems.append("report.json changed but is not this run's")
        expected = (EXPECTED[signum], -signum)  # -signum: killed while Python imports deploy
    elif status == "ok":
        pass  # finished first; a signal during exit may still set the code
    elif status == "running":
        if signum != signal.SIGKILL:
            problems.append(f"{name} left status 'running'")
    elif status == f"interrupted by {name}":
        expected = (EXPECTED[signum],)
    else:
        problems.append(f"{name} left status '{status}'")
    if code not in expected:
        problems.append(f"exit {code}, expected {' or '.join(map(str, expected))}")
    return status, problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target", default="onnxruntime")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    rows, failures = [], 0
    with tempfile.TemporaryDirectory(prefix="storm-") as tmp:
        out = Path(tmp) / "out"
        started = time.monotonic()
        first = build(out, args.target)
        if first.wait() != 0:
            sys.exit(f"the undisturbed build failed: {first.stderr.read()[-500:]}")
        length = time.monotonic() - started
        debris: list[Path] = []
        for run in range(args.runs):
            signum, delay = rng.choice(SIGNALS), rng.uniform(0.2, length)
            before = (out / "report.json").read_bytes()
            proc = build(out, args.target)
            time.sleep(delay)
            if proc.poll() is None:
                proc.send_signal(signum)
            code = proc.wait(timeout=300)
            said = (proc.stderr.read().strip().splitlines() or [""])[-1]
            left_over = [p for p in debris if p.exists()]  # the build above took the folder
            status, problems = verdict(out, signum, code, proc.pid, before)
            if json.loads((out / "report.json").read_text()).get("pid") != proc.pid:
                status = f"(previous run's, unchanged) {status}"
            problems += [f"temp file of a dead run not removed: {p}" for p in left_over]
            debris = list(out.rglob(".*.tmp"))
            if problems:
                problems.append(f"it said: {said}")
            failures += bool(problems)
            rows.append((run, signal.Signals(signum).name, f"{delay:.2f}", code, status, problems))
            print(rows[-1], flush=True)
    _write(rows, failures, length, args)
    sys.exit(1 if failures else 0)


def _write(rows: list, failures: int, length: float, args: argparse.Namespace) -> None:
    lines = [
        "# Interrupted builds",
        "",
        f"`python -m benchmarks.interrupt_storm --runs {args.runs} --seed {args.seed} "
        f"--target {args.target}` on {time.strftime('%Y-%m-%d')} ({os.cpu_count()} CPUs): "
        f"an undisturbed build took {length:.1f} s; each run below is a build into the same "
        "folder hit by a signal after the given delay. "
        f"**{len(rows) - failures}/{len(rows)} left a consistent folder.**",
        "",
        "| run | signal | after s | exit | report status | problems |",
        "|---|---|---|---|---|---|",
    ]
    for run, name, delay, code, status, problems in rows:
        lines.append(
            f"| {run} | {name} | {delay} | {code} | {status[:60]} | {'; '.join(problems) or '-'} |"
        )
    DOC.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
