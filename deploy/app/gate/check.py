"""Running a check: resolve the request against the baseline, export or take the engines,
time them interleaved, decide, and rewrite the baseline on --update-baseline."""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from qat_deploy.deploy.app.bench import export_model, has_qdq, onnx_input_shapes, time_engines
from qat_deploy.deploy.app.gate.baseline import Baseline, Pinned, Reference, load_baseline
from qat_deploy.deploy.app.gate.report import CheckResult, check_result, describe, format_ci
from qat_deploy.deploy.app.gate.statistics import (
    CONFIDENCE,
    DEFAULT_TOLERANCE,
    RatioCI,
    bootstrap_ratio,
    decide,
    parse_tolerance,
)
from qat_deploy.deploy.app.output_dir import sha256
from qat_deploy.deploy.common.artifacts import atomic_path
from qat_deploy.deploy.common.environment import environment
from qat_deploy.deploy.common.errors import (
    BackendUnavailableError,
    BadInputError,
    EnvironmentFaultError,
)
from qat_deploy.deploy.engines.adapter import get_adapter
from qat_deploy.deploy.engines.timing import TimingConfig, block_medians

if TYPE_CHECKING:
    from qat_deploy.models import ModelSpec

DEFAULT_THREADS = 2
MIN_BLOCKS = 30
#: Short blocks with a robust per-block median: a burst from another job spoils one block of
#: one engine, not the comparison.
GATE_TIMING = TimingConfig(warmup=20, block=10, min_runs=10 * MIN_BLOCKS, min_time_s=2.0, rewarm=2)


@dataclass(frozen=True)
class CheckRequest:
    """One `deploy check` invocation. target/threads/pin_reference shape a baseline and so only
    apply with update; model too, except that a check may repeat the baseline's model to vouch
    for its code (as trust_model does). model and target are required to create a baseline."""

    baseline: Path
    tolerance: str | None = None
    candidate: Path | None = None
    reference: Path | None = None
    update: bool = False
    pin_reference: bool = False
    model: str | None = None
    target: str | None = None
    threads: int | None = None
    min_time_s: float = GATE_TIMING.min_time_s
    seed: int = 0
    trust_model: bool = False  # import a package.module:factory the baseline names

    @property
    def pinned_candidate_path(self) -> Path:
        return self.baseline.parent / f"{self.baseline.stem}.candidate.onnx"

    @property
    def pinned_reference_path(self) -> Path:
        return self.baseline.parent / f"{self.baseline.stem}.reference.onnx"


def run_check(request: CheckRequest) -> CheckResult:
    """Measure candidate vs reference (and the pinned candidate) once; compare with the
    baseline, or rewrite it."""
    started = time.perf_counter()
    tolerance = parse_tolerance(request.tolerance) if request.tolerance is not None else None
    timing = replace(GATE_TIMING, min_time_s=request.min_time_s)
    baseline, spec = _baseline_for(request, tolerance)
    get_adapter(baseline.target).require_available()
    int_high = spec.vocab_size if spec is not None else None
    with tempfile.TemporaryDirectory(prefix="deploy-check-") as tmp:
        files, record = _onnx_files(request, baseline, Path(tmp))
        same_as_pinned = _same_as_pinned(files, baseline)
        if same_as_pinned:
            del files["pinned"]
        blocks, p50 = _measure(baseline, files, timing, Path(tmp), int_high)
        if request.update:
            updated = _write_update(request, baseline, record, files, blocks, p50, timing)
    name = request.baseline.stem
    if request.update:
        message = (
            f"{name}: baseline updated, {describe(updated)} ratio {format_ci(updated.ratio)} "
            f"({updated.ratio.blocks} block pairs), candidate pinned as "
            f"{request.pinned_candidate_path.name} -> {request.baseline}"
        )
        properties = {f"{role}_p50_ms": f"{ms:.4f}" for role, ms in p50.items()}
        return CheckResult(
            name, "updated", message, time.perf_counter() - started, baseline.target, properties
        )
    tol = tolerance if tolerance is not None else baseline.tolerance
    verdict = decide(
        blocks["candidate"],
        blocks["reference"],
        baseline.ratio,
        tol,
        pinned_blocks=blocks.get("pinned"),
        same_as_pinned=same_as_pinned,
        seed=request.seed,
    )
    return check_result(name, baseline, verdict, p50, time.perf_counter() - started)


def _write_update(
    request: CheckRequest,
    baseline: Baseline,
    record: Reference,
    files: Mapping[str, Path],
    blocks: Mapping[str, np.ndarray],
    p50: dict[str, float],
    timing: TimingConfig,
) -> Baseline:
    """Pinned files first, the baseline that names them last, each atomically and keeping the
    mode of the file it replaces."""
    measured, _ = bootstrap_ratio(blocks["candidate"], blocks["reference"], seed=request.seed)
    candidate = files["candidate"].read_bytes()
    pinned = Pinned(request.pinned_candidate_path.name, hashlib.sha256(candidate).hexdigest())
    updated = replace(
        baseline,
        reference=record,
        ratio=measured,
        measured_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        environment=environment(),
        candidate=_candidate_record(request.candidate),
        pinned_candidate=pinned,
        p50_ms=p50,
        timing=asdict(timing),
    )
    if request.pin_reference:  # beside the baseline, so all are committed together
        _write_keeping_mode(request.pinned_reference_path, files["reference"].read_bytes())
    _write_keeping_mode(request.pinned_candidate_path, candidate)
    _write_keeping_mode(request.baseline, updated.to_json().encode())
    return updated


def _baseline_for(
    request: CheckRequest, tolerance: float | None
) -> tuple[Baseline, ModelSpec | None]:
    """The baseline to compare with, or (update) the one to rewrite, with the request's
    overrides applied; the model, the target and (update) the files to write are checked
    before anything is built. Also the model's spec, or None where its code may not run."""
    shaping = {"--target": request.target, "--threads": request.threads}
    given = [flag for flag, value in shaping.items() if value is not None]
    if request.pin_reference:
        given.append("--pin-reference")
    if not request.update:
        if given:
            raise BadInputError(f"{', '.join(given)} only apply with --update-baseline")
        baseline = load_baseline(request.baseline)
        if request.model is not None and request.model != baseline.model:
            raise BadInputError(
                f"--model {request.model} is not the model of baseline {request.baseline} "
                f"({baseline.model})"
            )
        return baseline, _model_spec(request, baseline.model, baseline.reference)
    old = load_baseline(request.baseline) if request.baseline.exists() else None
    model = request.model or (old.model if old else None)
    target = request.target or (old.target if old else None)
    if model is None or target is None:
        raise BadInputError(
            f"baseline {request.baseline} does not exist: give --model and --target to create it"
        )
    same_model = old is not None and old.model == model
    threads = request.threads
    if threads is None:
        threads = old.threads if old else DEFAULT_THREADS
    if isinstance(threads, bool) or threads < 1:
        raise BadInputError(f"bad thread count {threads}; expected a positive integer")
    if tolerance is None:
        tolerance = old.tolerance if old else DEFAULT_TOLERANCE
    reference = _reference_for_update(request, old)
    spec = _model_spec(request, model, reference)
    writes = [request.baseline, request.pinned_candidate_path]
    if request.pin_reference:
        writes.append(request.pinned_reference_path)
    _require_writable(writes)
    baseline = Baseline(
        model=model,
        target=target,
        input_shape=old.input_shape if same_model else _new_input_shape(spec),
        threads=threads,
        reference=reference,
        ratio=RatioCI(1.0, 1.0, 1.0, CONFIDENCE, 1),  # replaced by the measurement
        tolerance=tolerance,
        measured_at="",
        environment={},
        candidate={},
    )
    return baseline, spec


def _new_input_shape(spec: ModelSpec | None) -> tuple[int, ...]:
    """A model other than the old baseline's came from --model, which vouches for its code,
    so its spec was resolved."""
    if spec is None:
        raise AssertionError("a model named by --model always has a spec")
    return tuple(spec.input_shape)


# ---- model code: a baseline is data ----------------------------------------------------------


def _is_code_reference(model: str) -> bool:
    """models.get_model_spec imports `package.module:factory`; a name without ':' only looks
    up the built-in registry, which imports nothing new."""
    return ":" in model


def _model_spec(request: CheckRequest, ref: str, reference: Reference) -> ModelSpec | None:
    """The spec of the baseline's model, resolving only what may run here. A baseline may come
    from a CI artifact or a pull request, and `package.module:factory` in it would run that
    module on load: it is imported only when the command line names the same model (--model)
    or trusts the baseline (--trust-baseline-model). Without that, a run that needs no export
    (given --candidate and reference files) goes ahead on files alone; any other is refused."""
    from qat_deploy.models import get_model_spec

    if not _is_code_reference(ref) or request.trust_model or request.model == ref:
        return get_model_spec(ref)
    needed = _exports_needed(request, reference)
    if needed:
        raise BadInputError(
            f"baseline {request.baseline} names model '{ref}', code that exporting the "
            f"{' and '.join(needed)} would import; a baseline is data, so pass --model {ref} "
            "or --trust-baseline-model if you trust that code"
        )
    return None


def _exports_needed(request: CheckRequest, reference: Reference) -> list[str]:
    """What _onnx_files will export from the model's code: what no file is given for."""
    needed = []
    if request.candidate is None:
        needed.append("int8 candidate")
    if reference.kind == "fp32" and request.reference is None:
        needed.append("fp32 reference")
    return needed


# ---- files -----------------------------------------------------------------------------------


def _require_writable(paths: Iterable[Path]) -> None:
    """Refuse before measuring. An atomic rename needs only the folder's permission, so it
    would replace a file someone made read-only (and reset its mode) without a word. A file or
    folder with no write bit counts as read-only even for root, whom os.access lets write."""
    for path in map(Path, paths):
        if path.exists() and not _writable(path, os.W_OK):
            raise BadInputError(
                f"--update-baseline would replace read-only {path}; make it writable first"
            )
        folder = path.parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if not _writable(folder, os.W_OK | os.X_OK):
            raise EnvironmentFaultError(
                f"--update-baseline cannot write {path}: folder {folder} is read-only"
            )


def _writable(path: Path, mode: int) -> bool:
    return os.access(path, mode) and bool(path.stat().st_mode & 0o222)


def _write_keeping_mode(path: Path, data: bytes) -> None:
    """Atomic write; a file it replaces keeps its permission bits (set before the rename)."""
    path = Path(path)
    mode = stat.S_IMODE(path.stat().st_mode) if path.exists() else None
    with atomic_path(path) as tmp:
        with open(tmp, "xb") as f:
            f.write(data)
        if mode is not None:
            os.chmod(tmp, mode)


def _reference_for_update(request: CheckRequest, old: Baseline | None) -> Reference:
    """--pin-reference FILE pins an artifact; an old pinned artifact stays pinned unless
    another --reference is given; otherwise the reference is the fp32 model."""
    if request.pin_reference:
        if request.reference is None:
            raise BadInputError("--pin-reference needs --reference FILE (the artifact to pin)")
        return Reference("artifact")
    if old is not None and old.reference.kind == "artifact" and request.reference is None:
        return old.reference
    return Reference("fp32")


def _onnx_files(
    request: CheckRequest, baseline: Baseline, tmp: Path
) -> tuple[dict[str, Path], Reference]:
    """role -> ONNX file, in timing order (pinned, candidate, reference: the candidate's
    blocks sit next to both others' in every round), and the reference as the baseline should
    record it. Given and pinned files are checked; missing ones are exported from the repo's
    current code (prepare, calibrate, export) for the baseline's model."""
    pinned = _pinned_candidate(request, baseline)
    candidate = _given(request.candidate, "candidate", baseline)
    reference, record = _resolve_reference(request, baseline)
    needed = []
    if candidate is None:
        needed.append("int8")
    if reference is None:
        needed.append("fp32")
    if needed:
        exported = export_model(
            baseline.model,
            baseline.target,
            tmp / "onnx",
            input_shape=baseline.input_shape,
            precisions=needed,
        )
        candidate = candidate or exported["int8"]
        reference = reference or exported["fp32"]
    files = {"pinned": pinned} if pinned is not None else {}
    return {**files, "candidate": candidate, "reference": reference}, record


def _pinned_candidate(request: CheckRequest, baseline: Baseline) -> Path | None:
    """The pinned int8 candidate a check times the candidate against (not when updating:
    the update pins a new one)."""
    pin = baseline.pinned_candidate
    if request.update or pin is None:
        return None
    path = request.baseline.parent / pin.path
    if not path.is_file():
        raise BadInputError(
            f"pinned candidate {path} not found (it is committed beside the baseline); "
            "re-measure with --update-baseline"
        )
    digest = sha256(path)
    if digest != pin.sha256:
        raise BadInputError(
            f"pinned candidate {path} is not the one the baseline pinned (sha256 {digest[:12]}"
            f" != {pin.sha256[:12]}); re-measure with --update-baseline"
        )
    return _given(path, "pinned candidate", baseline)


def _same_as_pinned(files: Mapping[str, Path], baseline: Baseline) -> bool:
    """Whether the candidate is the pinned file byte for byte: then it is the same engine, and
    timing the two against each other can only add noise, and on a loaded CI machine that
    noise once read +44% (95% CI +40% .. +46%) for such a pair and failed the gate."""
    pin = baseline.pinned_candidate
    return "pinned" in files and pin is not None and sha256(files["candidate"]) == pin.sha256


def _resolve_reference(request: CheckRequest, baseline: Baseline) -> tuple[Path | None, Reference]:
    """None for the path means: export the fp32 model from the repo."""
    ref = baseline.reference
    if ref.kind == "fp32":
        path = _given(request.reference, "reference", baseline)
        if path is not None and has_qdq(path):
            raise BadInputError(
                f"reference {path} has QuantizeLinear/DequantizeLinear nodes; this baseline's "
                "reference is the fp32 model (pin an int8 artifact with --pin-reference)"
            )
        return path, ref
    if request.pin_reference:  # copied beside the baseline once the measurement succeeded
        path = _given(request.reference, "reference", baseline)
        return path, Reference("artifact", request.pinned_reference_path.name, sha256(path))
    stored = request.baseline.parent / str(ref.path)
    path = _given(request.reference or stored, "reference", baseline)
    digest = sha256(path)
    if digest != ref.sha256:
        raise BadInputError(
            f"reference artifact {path} is not the one the baseline pinned (sha256 {digest[:12]}"
            f" != {str(ref.sha256)[:12]}); re-pin it with --update-baseline --pin-reference"
        )
    return path, ref


def _given(path: Path | None, role: str, baseline: Baseline) -> Path | None:
    """A user-supplied ONNX file, checked for existence and the baseline's input shape."""
    if path is None:
        return None
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"{role} ONNX model not found: {path}")
    shapes = list(onnx_input_shapes(path).values())
    if len(shapes) != 1 or list(shapes[0]) != list(baseline.input_shape):
        got = " and ".join(str(list(s)) for s in shapes) or "no inputs"
        raise BadInputError(
            f"{role} {path} takes input {got}; the baseline measures {list(baseline.input_shape)}"
        )
    return path


def _measure(
    baseline: Baseline,
    files: Mapping[str, Path],
    timing: TimingConfig,
    tmp: Path,
    int_high: int | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Build every engine with the target's adapter, time them interleaved in the order of
    `files`; block medians and p50 per role."""
    adapter = get_adapter(baseline.target)
    engines = {
        role: adapter.build(
            path,
            tmp / role,
            precision="int8" if has_qdq(path) else "fp32",
            threads=baseline.threads,
        )
        for role, path in files.items()
    }
    measured = time_engines(adapter, engines, timing, int_high)
    for m in measured.values():
        if m.latencies_ms is None:
            raise BackendUnavailableError(
                f"{baseline.target} latency not measured: {m.not_measured}"
            )
    latencies = {role: measured[role].latencies_ms for role in files}
    p50 = {role: float(np.median(ms)) for role, ms in latencies.items()}
    blocks = {role: block_medians(ms, timing.block) for role, ms in latencies.items()}
    return blocks, p50


def _candidate_record(candidate: Path | None) -> dict[str, str]:
    if candidate is None:
        return {"source": "repo"}
    return {"source": "onnx", "path": str(candidate)}
