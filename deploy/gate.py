"""The CI latency regression gate behind `deploy check`.

Why it measures this way: CI machines are shared and noisy, and a latency measured last week on
another machine says little about one measured now. So the gate never compares absolute times.
It times the candidate engine and a reference engine in the same run, interleaved in blocks
(deploy.timing: re-warm before each block, alternating order), and compares their ratio
(candidate p50 / reference p50) with the ratio the baseline recorded. Load and clock drift hit
the two engines of a block pair alike and cancel in the ratio.

Why it decides this way: the ratios of paired per-block medians are resampled (a seeded
bootstrap), which gives a confidence interval for the measured ratio without assuming a latency
distribution; the baseline's own interval is folded in by a log-normal draw per resample. The
gate fails only when the lower bound of measured / baseline exceeds 1 + tolerance: a slowdown
beyond the tolerance that noise cannot explain. The tolerance is what absorbs what a same-run
ratio cannot cancel: on this project's shared 2-vCPU machine the int8/fp32 ratio of mnist_cnn
moved between about 1.22 and 1.31 as neighbours' load changed, because int8 and fp32 kernels
do not slow down alike when the machine is contended.

Why a pinned candidate too: that drift is between runs, so no interval from one run (thousands
of block pairs, a fraction of a percent wide) can see it, and recording its spread over several
update runs would only widen the interval. With the ratio 5% low on the day, a real 12%
slowdown reads 1.12 x 0.95 = +6.4% and passes at 10% tolerance, while an unchanged candidate on
a 5% high day reads +5%: no threshold on that one number separates them at 10%. What separates
them is a comparison that carries no ratio across days. --update-baseline copies the int8
candidate it measured beside the baseline (NAME.candidate.onnx, checked by sha256), and a check
times three engines interleaved: pinned, candidate, reference. candidate / pinned is 1 for an
unchanged candidate by construction, whatever the machine does, because both are the same
engine; for a changed one, contention can only move the part that differs, a fraction of the
slowdown rather than of the whole latency. Measured here (mnist_cnn, onnxruntime, 6 runs in a
few minutes): identical engines 0.987 .. 1.006, int8/fp32 1.339 .. 1.378 over the same runs.
That comparison catches what the code changes in the exported graph at the tolerance, and it
decides wherever a candidate is pinned: it fails only when its lower 97.5% bound exceeds
1 + tolerance. The int8/fp32 change is still measured and reported, and beyond the tolerance
it is a note, not a failure: under load that ratio moved +15% between an update and a check
seconds apart (the pinned comparison read +0.2% in the same run), so failing on it would make
the gate fail on neighbours' jobs. It is what sees a change that slows every int8 engine alike
(build options, a runtime upgrade), and the note names that. Baselines without a pinned
candidate are still decided by the int8/fp32 change.

The baseline JSON schema is documented in ci/README.md.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from statistics import NormalDist
from typing import TYPE_CHECKING

import numpy as np

from deploy.artifacts import atomic_path, write_atomic
from deploy.bench import export_model, has_qdq, onnx_input_shapes, time_engines
from deploy.engine import get_adapter
from deploy.environment import cpu_difference, environment
from deploy.errors import (
    BackendUnavailableError,
    BadInputError,
    DeployError,
    EnvironmentFaultError,
)
from deploy.output_dir import sha256
from deploy.timing import TimingConfig, block_medians

if TYPE_CHECKING:
    from models import ModelSpec

SCHEMA = 1
DEFAULT_TOLERANCE = 0.10
DEFAULT_THREADS = 2
RESAMPLES = 2000
CONFIDENCE = 0.95
MIN_BLOCKS = 30
#: Short blocks with a robust per-block median: a burst from another job spoils one block of
#: one engine, not the comparison.
GATE_TIMING = TimingConfig(warmup=20, block=10, min_runs=10 * MIN_BLOCKS, min_time_s=2.0, rewarm=2)
REFERENCE_KINDS = ("fp32", "artifact")


# ---- tolerance -------------------------------------------------------------------------------


def parse_tolerance(text: str) -> float:
    """ "10%" or "0.1" -> 0.1. A bare number >= 1 is refused: "10" could mean 10% or 1000%."""
    raw = str(text).strip()
    number = raw[:-1].strip() if raw.endswith("%") else raw
    hint = "expected a percentage such as 10% or a fraction such as 0.1"
    try:
        value = float(number)
    except ValueError:
        raise BadInputError(f"bad tolerance '{text}'; {hint}") from None
    if raw.endswith("%"):
        value /= 100
    elif value >= 1:
        raise BadInputError(f"ambiguous tolerance '{text}'; write it as {value:g}% or a fraction")
    if not 0 <= value <= 1:  # NaN fails too
        raise BadInputError(f"bad tolerance '{text}'; expected between 0% and 100%")
    return value


# ---- statistics ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RatioCI:
    """A latency ratio with its bootstrap confidence interval."""

    value: float
    low: float
    high: float
    confidence: float
    blocks: int


def bootstrap_ratio(
    candidate: np.ndarray,
    reference: np.ndarray,
    *,
    resamples: int = RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> tuple[RatioCI, np.ndarray]:
    """Median of the per-pair ratios of block medians, with a CI from resampling the pairs.

    The two blocks of a pair ran a few milliseconds apart, so a slower stretch of the machine
    (another job, a busy SMT sibling) scales both and cancels in their ratio; a ratio of the
    two overall medians could instead take each median from a different stretch. Returns the
    CI and the resampled ratios."""
    candidate, reference = np.asarray(candidate, float), np.asarray(reference, float)
    if candidate.shape != reference.shape or candidate.ndim != 1 or len(candidate) < 2:
        raise BadInputError(
            f"need paired block medians, at least 2 each; got {candidate.shape} and "
            f"{reference.shape}"
        )
    ratios = candidate / reference
    index = np.random.default_rng(seed).integers(0, len(ratios), (resamples, len(ratios)))
    samples = np.median(ratios[index], axis=1)
    low, high = np.quantile(samples, [(1 - confidence) / 2, (1 + confidence) / 2])
    return RatioCI(
        float(np.median(ratios)), float(low), float(high), confidence, len(ratios)
    ), samples


@dataclass(frozen=True)
class Verdict:
    measured: RatioCI  # candidate / reference, this run
    baseline: RatioCI  # the same ratio, as recorded
    change: RatioCI  # measured / baseline: > 1 means slower than the baseline
    tolerance: float
    #: candidate / pinned candidate (the int8 file the baseline measured), this run; 1 means
    #: unchanged. None when the baseline pins no candidate.
    pinned: RatioCI | None = None

    @property
    def slower_than_baseline(self) -> bool:
        return self.change.low > 1 + self.tolerance

    @property
    def slower_than_pinned(self) -> bool:
        return self.pinned is not None and self.pinned.low > 1 + self.tolerance

    @property
    def regression(self) -> bool:
        """The pinned comparison decides where there is one (see the module docstring)."""
        return self.slower_than_pinned if self.pinned is not None else self.slower_than_baseline


def decide(
    candidate_blocks: np.ndarray,
    reference_blocks: np.ndarray,
    baseline: RatioCI,
    tolerance: float,
    *,
    pinned_blocks: np.ndarray | None = None,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> Verdict:
    """The gate's decision from per-block medians of one interleaved run. With pinned_blocks
    (the pinned int8 candidate, timed in the same rounds) candidate / pinned is judged too:
    its expected value is exactly 1, so it needs no recorded ratio and carries no drift of the
    int8/fp32 ratio (see the module docstring)."""
    measured, samples = bootstrap_ratio(
        candidate_blocks, reference_blocks, resamples=resamples, seed=seed
    )
    z = NormalDist().inv_cdf(0.5 + baseline.confidence / 2)
    sigma = (math.log(baseline.high) - math.log(baseline.low)) / (2 * z)
    draws = baseline.value * np.exp(np.random.default_rng([seed, 1]).normal(0, sigma, resamples))
    low, high = np.quantile(samples / draws, [(1 - CONFIDENCE) / 2, (1 + CONFIDENCE) / 2])
    change = RatioCI(
        measured.value / baseline.value, float(low), float(high), CONFIDENCE, measured.blocks
    )
    pinned = None
    if pinned_blocks is not None:
        pinned, _ = bootstrap_ratio(candidate_blocks, pinned_blocks, resamples=resamples, seed=seed)
    return Verdict(measured, baseline, change, tolerance, pinned)


# ---- baseline file ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Reference:
    """What the candidate is divided by: the fp32 model (exported from the repo, or --reference
    FILE), or a pinned ONNX artifact stored beside the baseline and checked by its sha256."""

    kind: str  # one of REFERENCE_KINDS
    path: str | None = None  # artifact only: relative to the baseline file's directory
    sha256: str | None = None


@dataclass(frozen=True)
class Pinned:
    """The int8 candidate the baseline measured, copied beside it (a bare file name in the
    baseline's directory) and checked by its sha256."""

    path: str
    sha256: str


@dataclass(frozen=True)
class Baseline:
    model: str
    target: str
    input_shape: tuple[int, ...]
    threads: int
    reference: Reference
    ratio: RatioCI
    tolerance: float
    measured_at: str
    environment: dict
    candidate: dict  # {"source": "repo"} or {"source": "onnx", "path": ...}
    pinned_candidate: Pinned | None = None  # absent in baselines made before it existed
    p50_ms: dict[str, float] = field(default_factory=dict)  # informational
    timing: dict = field(default_factory=dict)  # informational
    schema: int = SCHEMA

    def to_json(self) -> str:
        doc = {"schema": self.schema, **asdict(self)}
        doc["reference"] = {k: v for k, v in doc["reference"].items() if v is not None}
        if doc["pinned_candidate"] is None:
            del doc["pinned_candidate"]
        return json.dumps(doc, indent=2) + "\n"


def load_baseline(path: Path) -> Baseline:
    """Read and validate a baseline: any problem is one line naming the file and the field."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"baseline not found: {path} (create it with --update-baseline)")
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInputError(f"cannot read baseline {path}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise BadInputError(f"corrupt baseline {path}: not JSON ({exc})") from exc
    return _parse_baseline(doc, path)


def _parse_baseline(doc: object, path: Path) -> Baseline:
    check = _Fields(doc, f"corrupt baseline {path}")
    schema = check.get("schema", _is_int, "an integer")
    if schema != SCHEMA:
        raise BadInputError(f"baseline {path} has schema {schema}; this gate reads {SCHEMA}")
    ratio = _Fields(check.get("ratio", _is_dict, "an object"), f"{check.where}: ratio")
    value, low, high = (
        ratio.get(k, _is_positive, "a number > 0") for k in ("value", "low", "high")
    )
    if not low <= value <= high:
        raise BadInputError(f"{check.where}: ratio value {value} is not within [{low}, {high}]")
    reference = _Fields(check.get("reference", _is_dict, "an object"), f"{check.where}: reference")
    kind = reference.get("kind", lambda v: v in REFERENCE_KINDS, " or ".join(REFERENCE_KINDS))
    ref = Reference(kind)
    if kind == "artifact":
        ref = Reference(
            kind,
            reference.get("path", _is_str, "a path"),
            reference.get("sha256", _is_str, "a hex digest"),
        )
    return Baseline(
        model=check.get("model", _is_str, "a model name"),
        target=check.get("target", _is_str, "a target name"),
        input_shape=tuple(check.get("input_shape", _is_shape, "a list of positive integers")),
        threads=check.get("threads", _is_count, "a positive integer"),
        reference=ref,
        ratio=RatioCI(
            value,
            low,
            high,
            confidence=ratio.get("confidence", lambda v: _is_positive(v) and v < 1, "in (0, 1)"),
            blocks=ratio.get("blocks", _is_count, "a positive integer"),
        ),
        tolerance=check.get("tolerance", lambda v: _is_number(v) and 0 <= v <= 1, "in [0, 1]"),
        measured_at=check.get("measured_at", _is_str, "a timestamp"),
        environment=check.get("environment", _is_dict, "an object"),
        candidate=check.get("candidate", _is_dict, "an object"),
        pinned_candidate=_parse_pinned(check),
        p50_ms=check.optional("p50_ms", {}),
        timing=check.optional("timing", {}),
    )


def _parse_pinned(check: _Fields) -> Pinned | None:
    if check.optional("pinned_candidate", None) is None:
        return None
    pin = _Fields(check.doc["pinned_candidate"], f"{check.where}: pinned_candidate")
    return Pinned(
        pin.get("path", _is_file_name, "a file name, no folders"),
        pin.get("sha256", _is_str, "a hex digest"),
    )


class _Fields:
    """Typed access to a JSON object's fields, failing with the field's name."""

    def __init__(self, doc: object, where: str) -> None:
        if not isinstance(doc, dict):
            raise BadInputError(f"{where}: expected a JSON object")
        self.doc, self.where = doc, where

    def get(self, key: str, valid, expected: str):
        if key not in self.doc:
            raise BadInputError(f"{self.where}: missing '{key}'")
        if not valid(self.doc[key]):
            raise BadInputError(f"{self.where}: '{key}' is {self.doc[key]!r}; expected {expected}")
        return self.doc[key]

    def optional(self, key: str, default):
        return self.doc.get(key, default)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_positive(v: object) -> bool:
    return _is_number(v) and v > 0


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_count(v: object) -> bool:
    return _is_int(v) and v >= 1


def _is_str(v: object) -> bool:
    return isinstance(v, str) and bool(v)


def _is_file_name(v: object) -> bool:
    return _is_str(v) and Path(v).name == v and v != ".."


def _is_dict(v: object) -> bool:
    return isinstance(v, dict)


def _is_shape(v: object) -> bool:
    return isinstance(v, list) and bool(v) and all(_is_count(d) for d in v)


# ---- running a check -------------------------------------------------------------------------


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


@dataclass
class CheckResult:
    name: str
    status: str  # "passed", "regression", "updated", "skipped" (cannot time here), "error"
    message: str
    seconds: float = 0.0
    target: str | None = None
    properties: dict[str, str] = field(default_factory=dict)


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
        blocks, p50 = _measure(baseline, files, timing, Path(tmp), int_high)
        if request.update:
            updated = _write_update(request, baseline, record, files, blocks, p50, timing)
    name = request.baseline.stem
    if request.update:
        message = (
            f"{name}: baseline updated, {_what(updated)} ratio {_ci(updated.ratio)} "
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
        seed=request.seed,
    )
    return _result(name, baseline, verdict, p50, time.perf_counter() - started)


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
    from models import get_model_spec

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


# ---- reporting -------------------------------------------------------------------------------


def _what(baseline: Baseline) -> str:
    against = "fp32" if baseline.reference.kind == "fp32" else "pinned reference"
    return f"{baseline.model} on {baseline.target} ({baseline.threads} threads), int8/{against}"


def _ci(r: RatioCI) -> str:
    return f"{r.value:.3f} [{r.low:.3f}, {r.high:.3f}]"


def _pct(ratio: float) -> str:
    return f"{(ratio - 1) * 100:+.1f}%"


def _result(
    name: str, baseline: Baseline, verdict: Verdict, p50: Mapping[str, float], seconds: float
) -> CheckResult:
    change, tol, pinned = verdict.change, verdict.tolerance, verdict.pinned
    summary = (
        f"{name}: {_what(baseline)} ratio {_ci(verdict.measured)} vs baseline "
        f"{_ci(verdict.baseline)}: change {_pct(change.value)} "
        f"({change.confidence:.0%} CI {_pct(change.low)} .. {_pct(change.high)})"
    )
    if pinned is not None:
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
