"""`deploy bench`: fp32 and int8 engine latency over models x targets x batch sizes x threads.

Why it is built this way:
- The fp32 and int8 engines of one (model, target, batch, threads) group are timed together in
  interleaved blocks (deploy.engines.timing: re-warm before each block, rotating order), so
  drift on a shared machine hits both alike and the int8 speedup is a same-run ratio.
- Throughput is batch / p50 (one stream, back to back): the median resists the other jobs'
  bursts that inflate the mean on a shared machine.
- A target that cannot run here (TensorRT without a GPU) is still built, because the build is
  the part this machine can check, and its latency is "not measured: <reason>", never a number.
- Every output (JSON, Markdown, PNG) is rendered in memory first and written atomically at
  the end, so a failed or interrupted run leaves the previous results untouched.

The export and environment helpers are shared with the CI gate (deploy.app.gate).
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import onnx

from qat_deploy.deploy import recipe
from qat_deploy.deploy.common.artifacts import write_atomic
from qat_deploy.deploy.common.environment import environment
from qat_deploy.deploy.common.errors import (
    BackendUnavailableError,
    BadInputError,
    DeployError,
    one_line,
)
from qat_deploy.deploy.common.measured import Measured, NotMeasured, Result
from qat_deploy.deploy.engines.adapter import PRECISIONS, Adapter, BuiltEngine, get_adapter
from qat_deploy.deploy.engines.timing import (
    TimingConfig,
    paired_ratio,
    runner_call,
    summarize,
    time_interleaved,
)

DEFAULT_MODELS = (recipe.DEFAULT_MODEL,)
DEFAULT_TARGETS = ("onnxruntime", "openvino")
#: Quick by default: a bench is for comparing, the CI gate measures longer.
BENCH_TIMING = TimingConfig(warmup=10, block=10, min_runs=50, min_time_s=1.0, rewarm=2)


# ---- models to ONNX --------------------------------------------------------------------------


def export_model(
    name: str,
    target: str,
    out_dir: Path,
    *,
    input_shape: tuple[int, ...] | None = None,
    precisions: Iterable[str] = PRECISIONS,
) -> dict[str, Path]:
    """The ONNX files `deploy build --model NAME --target TARGET` ships, byte for byte: the
    same recipe (deploy.recipe) with its defaults. Returns precision -> path inside out_dir."""
    plan = recipe.Recipe(target=target, model=name, input_shape=input_shape)
    loaded = recipe.load(plan, evaluation=False)
    prepared = recipe.quantize(loaded, plan) if "int8" in precisions else None
    return recipe.export_onnx(
        loaded, prepared, out_dir, precisions, qdq_name=f"model.{target}.qdq.onnx"
    )


def onnx_input_shapes(path: Path) -> dict[str, tuple[int | str, ...]]:
    """Graph inputs (initializers excluded) -> shape, symbolic dims as their names."""
    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as exc:  # protobuf's DecodeError, OSError, onnx's own errors
        raise BadInputError(f"cannot read ONNX model {path}: {one_line(exc)}") from exc
    inits = {t.name for t in graph.initializer}
    return {
        i.name: tuple(d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim)
        for i in graph.input
        if i.name not in inits
    }


def has_qdq(path: Path) -> bool:
    """Whether the model is quantized: decides the precision an engine is built and named at."""
    graph = onnx.load(str(path), load_external_data=False).graph
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in graph.node)


# ---- measuring -------------------------------------------------------------------------------


@dataclass
class Measurement:
    """One engine's timing, or why it has none."""

    latencies_ms: list[float] | None = None
    not_measured: str | None = None  # why latencies_ms is None
    engine: BuiltEngine | None = None


def random_feed(runner, seed: int = 0, int_high: int | None = None) -> dict[str, np.ndarray]:
    """Inputs matching the runner's metadata. Latency does not depend on values, but token ids
    must be valid indices: integers are drawn below int_high (0 when it is unknown)."""
    rng = np.random.default_rng(seed)
    feed = {}
    for name, meta in runner.get_input_metadata(use_numpy_dtypes=False).items():
        if any(not isinstance(d, int) or d < 1 for d in meta.shape):
            raise BadInputError(f"input '{name}' has dynamic shape {meta.shape}; export it static")
        dtype = np.dtype(meta.dtype.numpy())
        if dtype.kind == "f":
            feed[name] = rng.standard_normal(meta.shape).astype(dtype)
        else:
            feed[name] = rng.integers(0, int_high or 1, size=meta.shape).astype(dtype)
    return feed


def build_engines(
    adapter: Adapter, onnx_files: Mapping[str, Path], work_dir: Path, threads: int
) -> dict[str, BuiltEngine]:
    """One engine per precision, each in its own directory (adapters name artifacts by
    backend, so two precisions in one directory would overwrite each other)."""
    return {
        precision: adapter.build(path, work_dir / precision, precision=precision, threads=threads)
        for precision, path in onnx_files.items()
    }


def time_engines(
    adapter: Adapter,
    engines: Mapping[str, BuiltEngine],
    timing: TimingConfig,
    int_high: int | None = None,
) -> dict[str, Measurement]:
    """Time every runnable engine together in interleaved blocks; the others get a reason."""
    results: dict[str, Measurement] = {}
    runners = {}
    for key, engine in engines.items():
        reason = engine.info.get("latency")  # an adapter's "not measured: <why>"
        if reason is None:
            try:
                runners[key] = adapter.runner(engine)
            except BackendUnavailableError as exc:
                reason = str(exc)
        else:
            reason = reason.removeprefix("not measured: ")
        results[key] = Measurement(not_measured=reason, engine=engine)
    if runners:
        with contextlib.ExitStack() as stack:
            for runner in runners.values():
                stack.enter_context(runner)
            fns = {
                key: runner_call(runner, random_feed(runner, int_high=int_high))
                for key, runner in runners.items()
            }
            for key, latencies in time_interleaved(fns, timing).items():
                results[key].latencies_ms = latencies
    return results


# ---- the matrix ------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchRequest:
    models: tuple[str, ...] = DEFAULT_MODELS
    targets: tuple[str, ...] = DEFAULT_TARGETS
    precisions: tuple[str, ...] = PRECISIONS
    batches: tuple[int, ...] = (1,)
    threads: tuple[int, ...] = (2,)
    timing: TimingConfig = BENCH_TIMING
    #: existing ONNX files (precision -> path) used instead of exporting; models[0] labels them
    onnx_files: Mapping[str, Path] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for label, values in (("model", self.models), ("target", self.targets)):
            if not values:
                raise BadInputError(f"no {label} given")
        for label, values in (("batch size", self.batches), ("thread count", self.threads)):
            if not values or any(isinstance(v, bool) or not isinstance(v, int) for v in values):
                raise BadInputError(f"bad {label} list {values!r}; expected positive integers")
            if any(v < 1 for v in values):
                raise BadInputError(f"bad {label} {min(values)}; expected a positive integer")
        unknown = sorted(set(self.precisions) - set(PRECISIONS))
        if unknown or not self.precisions:
            raise BadInputError(f"bad precision {unknown}; expected {', '.join(PRECISIONS)}")
        if self.onnx_files and len(self.models) != 1:
            raise BadInputError("existing ONNX files belong to one model: give one --model label")
        missing = [p for p in self.precisions if self.onnx_files and p not in self.onnx_files]
        if missing:
            raise BadInputError(f"no existing ONNX file given for precision {', '.join(missing)}")


@dataclass
class BenchRow:
    model: str
    target: str
    precision: str
    batch: int
    threads: int
    input_shape: list[int]
    onnx: str
    latency_ms: Result  # a TimingSummary, or why there is none
    throughput_sps: float | None = None  # batch / p50
    #: int8 rows beside an fp32 one: paired_ratio(fp32, int8) of the same run
    #: (deploy.engines.timing)
    speedup: Result | None = None
    int8_layers: str | None = None  # "int8/compute" layers by the backend's own report
    engine_info: dict[str, str] = field(default_factory=dict)

    @property
    def measured(self) -> bool:
        return self.latency_ms.measured

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["latency_ms"] = self.latency_ms.to_dict()
        out["speedup"] = self.speedup.to_dict() if self.speedup is not None else None
        return out


@dataclass(frozen=True)
class Group:
    """The engines timed together: one model, target, batch size and thread count."""

    model: str
    target: str
    batch: int
    threads: int
    files: Mapping[str, Path]  # precision -> ONNX
    input_shape: list[int]
    int_high: int | None  # token ids are drawn below this (int64 inputs)


def run_bench(request: BenchRequest, out_dir: Path, progress=None) -> list[BenchRow]:
    """Measure the whole matrix; ONNX files are exported into out_dir/onnx/, engines are built
    in a temporary directory and removed afterwards (they are large and machine-specific)."""
    say = progress or (lambda message: None)
    _check_names(request)
    rows: list[BenchRow] = []
    with tempfile.TemporaryDirectory(prefix="deploy-bench-") as tmp:
        for model in request.models:
            for batch in request.batches:
                fp32: dict[str, Path] = {}  # target-independent: exported once per batch size
                for target in request.targets:
                    say(f"{model}, batch {batch}, {target}: exporting")
                    files, shape, int_high = _onnx_for(request, model, target, batch, out_dir, fp32)
                    for threads in request.threads:
                        say(f"{model}, batch {batch}, {target}, {threads} threads: timing")
                        group = Group(model, target, batch, threads, files, shape, int_high)
                        rows += _measure_group(group, request.timing, Path(tmp))
    return rows


def _check_names(request: BenchRequest) -> None:
    """Unknown targets and models, missing files: fail before any minutes are spent."""
    from qat_deploy.models import get_model_spec

    for target in request.targets:
        get_adapter(target)
    for path in request.onnx_files.values():
        if not Path(path).is_file():
            raise BadInputError(f"ONNX model not found: {path}")
    if not request.onnx_files:
        for model in request.models:
            get_model_spec(model)


def _onnx_for(
    request: BenchRequest,
    model: str,
    target: str,
    batch: int,
    out_dir: Path,
    fp32: dict[str, Path],
) -> tuple[dict[str, Path], list[int], int | None]:
    """ONNX files for one group, their input shape, and the token-id bound for int inputs.
    `fp32` holds this run's fp32 export once made ({"fp32": path}); files left by earlier runs
    are not reused, they may come from older code."""
    if request.onnx_files:
        files = {p: Path(request.onnx_files[p]) for p in request.precisions}
        return files, _static_batch_shape(files, batch), None
    from qat_deploy.models import get_model_spec

    spec = get_model_spec(model)
    shape = (batch, *spec.input_shape[1:])
    wanted = [p for p in request.precisions if p not in fp32]
    files = export_model(
        model,
        target,
        out_dir / "onnx" / model / f"batch{batch}",
        input_shape=shape,
        precisions=wanted,
    )
    fp32.update({p: f for p, f in files.items() if p == "fp32"})
    return {**files, **fp32}, list(shape), spec.vocab_size


def _static_batch_shape(files: Mapping[str, Path], batch: int) -> list[int]:
    """Existing files are taken as exported: their first input must be static, with the
    requested batch size."""
    shapes = []
    for path in files.values():
        first = next(iter(onnx_input_shapes(path).values()), ())
        if not first or any(not isinstance(d, int) or d < 1 for d in first):
            raise BadInputError(f"{path} has a dynamic input shape {first}; export it static")
        if first[0] != batch:
            raise BadInputError(f"{path} has batch size {first[0]}, not the requested {batch}")
        shapes.append(list(first))
    if any(shape != shapes[0] for shape in shapes):
        raise BadInputError(f"the given ONNX files take different input shapes: {shapes}")
    return shapes[0]


def _measure_group(group: Group, timing: TimingConfig, tmp: Path) -> list[BenchRow]:
    adapter = get_adapter(group.target)
    work = tmp / f"{group.model}-{group.target}-b{group.batch}-t{group.threads}"
    try:
        engines = build_engines(adapter, group.files, work, group.threads)
    except BackendUnavailableError as exc:  # not installed: still a row, never a number
        measured = {p: Measurement(not_measured=str(exc)) for p in group.files}
    else:
        measured = time_engines(adapter, engines, timing, group.int_high)
    summaries = {
        p: summarize(m.latencies_ms) for p, m in measured.items() if m.latencies_ms is not None
    }
    rows = []
    for precision, m in measured.items():
        summary = summaries.get(precision)
        row = BenchRow(
            model=group.model,
            target=group.target,
            precision=precision,
            batch=group.batch,
            threads=group.threads,
            input_shape=group.input_shape,
            onnx=str(group.files[precision]),
            latency_ms=Measured(summary.to_dict()) if summary else NotMeasured(str(m.not_measured)),
            throughput_sps=group.batch * 1e3 / summary.p50 if summary else None,
            engine_info=dict(m.engine.info) if m.engine else {},
        )
        if precision == "int8":
            row.speedup = _speedup(measured, timing.block)
            if m.engine is not None:
                row.int8_layers = _int8_layers(adapter, m.engine)
        rows.append(row)
    return rows


def _speedup(measured: Mapping[str, Measurement], block: int) -> Result | None:
    if "fp32" not in measured:
        return None  # nothing to compare with
    for precision in ("fp32", "int8"):
        if measured[precision].latencies_ms is None:
            return NotMeasured(f"{precision}: {measured[precision].not_measured}")
    ratio = paired_ratio(measured["fp32"].latencies_ms, measured["int8"].latencies_ms, block)
    return Measured({"value": ratio})


def _int8_layers(adapter: Adapter, engine: BuiltEngine) -> str:
    """Shown beside the speedup: an int8 engine slower than fp32 usually has float layers."""
    try:
        report = adapter.kernel_report(engine)
    except DeployError as exc:
        return f"unknown: {exc}"
    return f"{len(report.int8_compute)}/{len(report.compute_layers)}"


# ---- reports ---------------------------------------------------------------------------------


def report_json(rows: list[BenchRow], request: BenchRequest, env: Mapping[str, object]) -> str:
    document = {
        "schema": 1,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "environment": dict(env),
        "timing": asdict(request.timing),
        "throughput": "batch / p50 latency, one stream",
        "speedup": "median over interleaved timing rounds of fp32 block median / int8 block "
        "median (deploy.engines.timing.paired_ratio)",
        "results": [row.to_dict() for row in rows],
    }
    return json.dumps(document, indent=2) + "\n"


def report_markdown(rows: list[BenchRow], request: BenchRequest, env: Mapping) -> str:
    t = request.timing
    lines = [
        "# deploy bench",
        "",
        f"CPU: {env['cpu']} ({env['logical_cpus']} logical CPUs). Timing: warm-up {t.warmup}, "
        f"blocks of {t.block} (re-warm {t.rewarm}), at least {t.min_runs} runs and "
        f"{t.min_time_s:g} s per engine; fp32 and int8 of a group interleaved in one run. "
        "Throughput = batch / p50.",
        "",
        "| model | target | batch | threads | precision | p50 ms | p90 ms | p99 ms | mean ms "
        "| runs | samples/s | int8 speedup | int8 layers |",
        "|" + "---|" * 13,
    ]
    for r in rows:
        head = f"| {r.model} | {r.target} | {r.batch} | {r.threads} | {r.precision} "
        if isinstance(r.latency_ms, Measured):
            lat = r.latency_ms.values
            timing = (
                f"| {lat['p50']:.3f} | {lat['p90']:.3f} | {lat['p99']:.3f} | {lat['mean']:.3f} "
                f"| {lat['runs']} | {r.throughput_sps:.1f} "
            )
        else:
            timing = f"| not measured: {_cell(r.latency_ms.reason)} | - | - | - | - | - "
        speedup = speedup_cell(r)
        lines.append(f"{head}{timing}| {speedup} | {_cell(r.int8_layers or '-')} |")
    return "\n".join(lines) + "\n"


def speedup_cell(row: BenchRow) -> str:
    if isinstance(row.speedup, Measured):
        return f"{row.speedup.values['value']:.2f}x"
    return "-"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def report_png(rows: list[BenchRow]) -> bytes:
    """Grouped p50 bars (whiskers up to p90) per group; unmeasured ones are labelled, not drawn."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    groups = list(dict.fromkeys(_group_label(r) for r in rows))
    precisions = list(dict.fromkeys(r.precision for r in rows))
    width = 0.8 / max(len(precisions), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(groups)), 4.5))
    measured = [r.latency_ms.values["p50"] for r in rows if isinstance(r.latency_ms, Measured)]
    for k, precision in enumerate(precisions):
        for g, label in enumerate(groups):
            row = next(
                (r for r in rows if r.precision == precision and _group_label(r) == label), None
            )
            if row is None:
                continue
            x = g + (k - (len(precisions) - 1) / 2) * width
            if isinstance(row.latency_ms, Measured):
                p50, p90 = row.latency_ms.values["p50"], row.latency_ms.values["p90"]
                ax.bar(x, p50, width, color=f"C{k}", label=precision if g == 0 else None)
                ax.errorbar(x, p50, yerr=[[0], [p90 - p50]], color="black", capsize=3)
            else:
                ax.text(x, 0, "not\nmeasured", ha="center", va="bottom", fontsize=7, rotation=90)
    if measured and max(measured) / min(measured) > 30:
        ax.set_yscale("log")
    ax.set_xticks(range(len(groups)), groups, fontsize=8)
    ax.set_ylabel("p50 latency, ms (whisker: p90)")
    ax.set_title("deploy bench: fp32 vs int8, interleaved timing")
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return buffer.getvalue()


def _group_label(row: BenchRow) -> str:
    return f"{row.model}\n{row.target}\nb{row.batch} t{row.threads}"


def require_matplotlib() -> None:
    """Checked before measuring, so a missing plotting library costs seconds, not minutes."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise BackendUnavailableError(
            "matplotlib is not installed (needed for bench.png): pip install matplotlib"
        ) from exc


def write_reports(rows: list[BenchRow], request: BenchRequest, out_dir: Path) -> list[Path]:
    """Render all three outputs, then write each atomically."""
    env = environment()
    rendered = {
        "bench.json": report_json(rows, request, env).encode(),
        "bench.md": report_markdown(rows, request, env).encode(),
        "bench.png": report_png(rows),
    }
    return [write_atomic(out_dir / name, data) for name, data in rendered.items()]
