"""What a check says: the one-line message, the result record, and JUnit XML for CI."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from qat_deploy.deploy.app.gate.baseline import Baseline
from qat_deploy.deploy.app.gate.statistics import RatioCI, Verdict
from qat_deploy.deploy.common.artifacts import write_atomic
from qat_deploy.deploy.common.environment import cpu_difference, environment
from qat_deploy.deploy.common.errors import (
    BackendUnavailableError,
    BadInputError,
    DeployError,
)


@dataclass
class CheckResult:
    name: str
    status: str  # "passed", "regression", "updated", "skipped" (cannot time here), "error"
    message: str
    seconds: float = 0.0
    target: str | None = None
    properties: dict[str, str] = field(default_factory=dict)


def describe(baseline: Baseline) -> str:
    against = "fp32" if baseline.reference.kind == "fp32" else "pinned reference"
    return f"{baseline.model} on {baseline.target} ({baseline.threads} threads), int8/{against}"


def format_ci(r: RatioCI) -> str:
    return f"{r.value:.3f} [{r.low:.3f}, {r.high:.3f}]"


def _pct(ratio: float) -> str:
    return f"{(ratio - 1) * 100:+.1f}%"


def check_result(
    name: str, baseline: Baseline, verdict: Verdict, p50: Mapping[str, float], seconds: float
) -> CheckResult:
    change, tol, pinned = verdict.change, verdict.tolerance, verdict.pinned
    summary = (
        f"{name}: {describe(baseline)} ratio {format_ci(verdict.measured)} vs baseline "
        f"{format_ci(verdict.baseline)}: change {_pct(change.value)} "
        f"({change.confidence:.0%} CI {_pct(change.low)} .. {_pct(change.high)})"
    )
    if verdict.same_as_pinned:
        summary += "; vs pinned candidate: the same file, unchanged by construction (not timed)"
    elif pinned is not None:
        summary += (
            f"; vs pinned candidate: {_pct(pinned.value)} "
            f"({pinned.confidence:.0%} CI {_pct(pinned.low)} .. {_pct(pinned.high)})"
        )
    summary += f"; tolerance {tol:.0%}"
    if baseline.pinned_candidate is None:
        summary += "; note: the baseline pins no candidate, re-measure it to compare with one"
    difference = cpu_difference(baseline.environment, environment())
    if difference:
        summary += f"; note: baseline measured on a different CPU ({difference})"
    if pinned is not None and verdict.slower_than_baseline and not verdict.regression:
        summary += (
            "; note: the int8/fp32 ratio moved beyond the tolerance while the candidate matches "
            "its pinned build: machine load, or a change that slows every int8 engine alike "
            "(a runtime upgrade); re-measure the baseline if it persists"
        )
    status = "regression" if verdict.regression else "passed"
    verb = "pass"
    if verdict.regression:
        against = "the pinned candidate" if pinned is not None else "the baseline ratio"
        verb = f"REGRESSION, significant slowdown beyond tolerance vs {against}"
    properties = {
        "model": baseline.model,
        "target": baseline.target,
        "ratio": f"{verdict.measured.value:.4f}",
        "ratio_ci": f"{verdict.measured.low:.4f}..{verdict.measured.high:.4f}",
        "baseline_ratio": f"{verdict.baseline.value:.4f}",
        "change": f"{change.value:.4f}",
        "change_ci": f"{change.low:.4f}..{change.high:.4f}",
        "tolerance": f"{tol:.4f}",
        "block_pairs": str(verdict.measured.blocks),
        **{f"{role}_p50_ms": f"{ms:.4f}" for role, ms in p50.items()},
    }
    if pinned is not None:
        properties["pinned_change"] = f"{pinned.value:.4f}"
        properties["pinned_change_ci"] = f"{pinned.low:.4f}..{pinned.high:.4f}"
        properties["pinned_same_file"] = str(verdict.same_as_pinned).lower()
    return CheckResult(name, status, f"{summary}: {verb}", seconds, baseline.target, properties)


def failed_result(baseline: Path, exc: DeployError, seconds: float) -> CheckResult:
    """A check that could not run: skipped when this machine cannot time the target (a CI
    report should not show that as a failure of the code), an error otherwise."""
    status = "skipped" if isinstance(exc, BackendUnavailableError) else "error"
    return CheckResult(Path(baseline).stem, status, str(exc).splitlines()[0], seconds)


def junit_xml(result: CheckResult) -> bytes:
    """One <testcase> per check; <failure> on a regression, <error>/<skipped> if not run."""
    import xml.etree.ElementTree as ET

    counts = {s: str(int(result.status == s)) for s in ("regression", "error", "skipped")}
    suite = ET.Element(
        "testsuite",
        name="deploy-check",
        tests="1",
        failures=counts["regression"],
        errors=counts["error"],
        skipped=counts["skipped"],
        time=f"{result.seconds:.3f}",
        timestamp=time.strftime("%Y-%m-%dT%H:%M:%S"),
    )
    case = ET.SubElement(
        suite,
        "testcase",
        classname=f"latency.{result.target}" if result.target else "latency",
        name=result.name,
        time=f"{result.seconds:.3f}",
    )
    if result.properties:
        props = ET.SubElement(case, "properties")
        for key, value in result.properties.items():
            ET.SubElement(props, "property", name=key, value=value)
    tag = {"regression": "failure", "error": "error", "skipped": "skipped"}.get(result.status)
    if tag is not None:
        ET.SubElement(case, tag, message=result.message, type=result.status)
    ET.SubElement(case, "system-out").text = result.message
    root = ET.Element("testsuites")
    root.append(suite)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def write_junit(path: Path, result: CheckResult) -> Path:
    try:
        return write_atomic(Path(path), junit_xml(result))
    except OSError as exc:
        raise BadInputError(f"cannot write JUnit report {path}: {exc.strerror or exc}") from exc
