"""`deploy build`: model -> prepared -> calibrated (-> QAT) -> QDQ ONNX -> lint -> engine ->
kernel check -> accuracy check -> latency -> report.json.

The part up to QDQ ONNX is deploy.recipe, shared with `deploy bench` and `deploy check`. Every
stage writes atomically; the report is written after each stage and on every exit path, saying
how far the run got and why it stopped, so CI can read it even when the build fails.

Models may take several named inputs (ModelSpec.inputs): every stage feeds all of them, the
model as model(**{name: tensor}) and engines by their input names (by position when the names
differ). Models returning a tuple, dict or ModelOutput are checked on their first tensor.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from qat_deploy.deploy import recipe
from qat_deploy.deploy.app import output_dir
from qat_deploy.deploy.common.artifacts import write_atomic
from qat_deploy.deploy.common.environment import environment
from qat_deploy.deploy.common.errors import (
    BackendUnavailableError,
    BadInputError,
    CheckFailedError,
    Interrupted,
    classify,
)
from qat_deploy.deploy.common.measured import Measured, NotMeasured
from qat_deploy.deploy.data import Dataset, input_pairs
from qat_deploy.deploy.engines.adapter import BuiltEngine, get_adapter
from qat_deploy.deploy.engines.timing import (
    TimingConfig,
    paired_ratio,
    runner_call,
    summarize,
    time_interleaved,
)
from qat_deploy.deploy.lint import float_by_rule, lint, quantized_by_rule
from qat_deploy.deploy.verify import closeness, engine_check, layer_debug
from qat_deploy.models import ModelSpec

#: report.json's contract: deploy/app/report.schema.json (validated against every report the tests
#: produce); the version changes when a reader would have to change
REPORT_SCHEMA = Path(__file__).with_name("report.schema.json")
REPORT_SCHEMA_VERSION = 2
LAYERS_PNG = "layers.png"
#: the accuracy budget's reference engine: every layer the rules quantize in int8
ALL_INT8 = "all_int8"
#: calibrations that trade rare outliers for resolution of the rest of a tensor
CLIPPING_OBSERVERS = ("percentile", "mse", "entropy")
STAGES = (
    "prepare",
    "calibrate",
    "tune",
    "qat",
    "export",
    "lint",
    "build",
    "kernels",
    "layers",
    "accuracy",
    "latency",
)
#: evaluation samples --debug-layers compares per layer (every quantized tensor of each is kept)
DEBUG_SAMPLES = 8


@dataclass(frozen=True)
class BuildOptions(recipe.Recipe):
    """A build: the recipe of its QDQ model (deploy.recipe.Recipe: model, inputs, data,
    calibration, QAT) and what the build does with it."""

    out_dir: Path = Path("out")
    export_only: bool = False
    min_int8_fraction: float = 0.5
    min_time_s: float = 1.0
    sm: str | None = None  # TensorRT compute capability for ahead-of-time builds
    debug_layers: bool = False  # per-layer float / fake-quant / engine comparison
    #: int8-vs-fake-quant bounds, loosened to twice the model's float64 floor when it is noisier
    thresholds: closeness.Thresholds = closeness.DEFAULT_THRESHOLDS["int8_vs_fakequant"]


@dataclass
class Report:
    """report.json, filled stage by stage. Artifacts are recorded with their sha256 as they are
    written, so the report vouches only for files this run wrote, byte for byte."""

    out_dir: Path
    data: dict = field(default_factory=dict)

    def set(self, key: str, value) -> None:
        self.data[key] = value.to_dict() if isinstance(value, Measured | NotMeasured) else value

    def artifact(self, key: str, path: Path) -> None:
        self.data["artifacts"][key] = {"path": str(path), "sha256": output_dir.sha256(path)}

    def write(self) -> Path:
        text = json.dumps(self.data, indent=2, sort_keys=False, default=str)
        return write_atomic(self.out_dir / "report.json", text.encode())


Progress = Callable[[str], None]


def build(options: BuildOptions, progress: Progress = lambda stage: None) -> dict:
    """Run the pipeline; returns the report. Raises a DeployError (or errors.Interrupted) after
    writing report.json when a stage cannot run, a check fails or the run is interrupted.

    The folder is locked for the run. Its report is replaced first by one saying "running" that
    lists no artifacts, so a run killed outright leaves no report vouching for files it may
    have half replaced; every other exit writes the final status and its exit code."""
    _check_options(options)
    with output_dir.owned(Path(options.out_dir)) as out:
        report = Report(out)
        report.set("schema_version", REPORT_SCHEMA_VERSION)
        report.set("target", options.target)
        report.set("status", "running")
        report.set("pid", os.getpid())
        report.set("stages", {})
        report.set("artifacts", {})
        report.write()
        started = time.perf_counter()
        try:
            with _warnings_recorded(report):
                _run(options, out, report, progress)
        except BaseException as exc:
            error = classify(exc)
            interrupted = isinstance(error, Interrupted)
            report.set("status", str(error) if interrupted else f"failed: {error}")
            report.set("exit_code", error.exit_code)
            report.set("seconds", round(time.perf_counter() - started, 2))
            with contextlib.suppress(OSError):  # the original error is the one to report
                output_dir.remove_own_temps(out)
            with contextlib.suppress(OSError):
                report.write()
            if error is exc:
                raise
            raise error from exc
        report.set("status", "ok")
        report.set("exit_code", 0)
        report.set("seconds", round(time.perf_counter() - started, 2))
        try:
            report.write()
        except OSError as exc:
            raise classify(exc) from exc
    return report.data


@contextlib.contextmanager
def _warnings_recorded(report: Report, keep: int = 20) -> Iterator[None]:
    """Library warnings (torch deprecations, exporter notes) go into the report, each once,
    instead of between the progress bar and the one line that says how the build ended."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        try:
            yield
        finally:
            seen = dict.fromkeys(f"{w.category.__name__}: {w.message}" for w in caught)
            report.set("warnings", [text.splitlines()[0] for text in seen][:keep])


def _check_options(o: BuildOptions) -> None:
    recipe.check(o)
    if o.debug_layers and o.export_only:
        raise BadInputError("--debug-layers compares the engine's layers; drop --export-only")
    t = o.thresholds
    for flag, value, low, high in (
        ("--min-agreement", t.min_top1_agreement, 0.0, 1.0),
        ("--min-cosine", t.min_cosine, -1.0, 1.0),
        ("--max-err-steps", t.max_p999_err_steps, 0.0, math.inf),
    ):
        if value is not None and not low <= value <= high:
            raise BadInputError(f"{flag} {value:g} is outside [{low:g}, {high:g}]")


def _stage(report: Report, progress: Progress, name: str) -> None:
    """Mark a stage done, on disk too: a run killed later still shows how far it got."""
    progress(name)
    report.data["stages"][name] = "done"
    report.write()


def _run(o: BuildOptions, out: Path, report: Report, progress: Progress) -> None:
    # a missing or broken backend, or an option it lacks, fails before any work
    adapter = get_adapter(o.target).with_options(**({"sm": o.sm} if o.sm is not None else {}))
    if not o.export_only:
        adapter.require_available()
    loaded = recipe.load(o)
    model, spec, calib, evaluation = loaded.model, loaded.spec, loaded.calib, loaded.evaluation
    report.set("model", _model_report(spec))
    report.set(
        "data",
        {
            "calibration": calib.source,
            "evaluation": evaluation.source,
            "labels": evaluation.labels is not None,
        },
    )
    report.set("environment", environment(o.threads))
    report.set("calibration", o.calibration)
    prepared = recipe.quantize(loaded, o, lambda name: _stage(report, progress, name))
    report.set("calibration", prepared.plan.calibration["observer"])  # what "auto" chose
    if prepared.plan.calibration["auto"] is not None:
        report.set("calibration_choice", prepared.plan.calibration["auto"])
    report.set("quantizers", len(prepared.quantizers()))
    report.set("placement_mode", prepared.plan.mode)
    report.set("kept_float", prepared.plan.kept_float)
    if prepared.plan.accuracy_budget is not None:
        report.set("accuracy_budget", prepared.plan.accuracy_budget)
    if prepared.plan.latency_tuning is not None:
        report.set("latency_tuning", prepared.plan.latency_tuning)
    if prepared.plan.smooth_quant is not None:
        report.set("smooth_quant", prepared.plan.smooth_quant)
    if prepared.plan.qat is not None:
        report.set("qat", prepared.plan.qat)
    if o.qat_checkpoint is not None and Path(o.qat_checkpoint).is_file():
        report.artifact("qat_checkpoint", Path(o.qat_checkpoint))

    float_weights: dict[str, np.ndarray] | None = {} if o.debug_layers else None
    paths = recipe.export_onnx(loaded, prepared, out, float_weights=float_weights)
    fp32_path, qdq_path = paths["fp32"], paths["int8"]
    report.artifact("fp32_onnx", fp32_path)
    report.artifact("qdq_onnx", qdq_path)
    _stage(report, progress, "export")
    violations = lint(qdq_path, o.target)
    report.set("lint", [dataclasses.asdict(v) for v in violations])
    _stage(report, progress, "lint")
    if violations:
        raise CheckFailedError(f"{len(violations)} lint violation(s) in {qdq_path.name}")
    if o.export_only:
        return

    int8 = adapter.build(qdq_path, out, precision="int8", threads=o.threads)
    fp32 = adapter.build(fp32_path, out / "fp32", precision="fp32", threads=o.threads)
    report.artifact("engine", int8.artifact)
    report.artifact("fp32_engine", fp32.artifact)
    report.set("engine", int8.info)
    _stage(report, progress, "build")

    kernels = adapter.kernel_report(int8)
    kernels.float_by_rule = float_by_rule(qdq_path, o.target)
    kernels.quantized_by_rule = quantized_by_rule(qdq_path, o.target)
    report.set("kernels", kernels.to_dict())
    _stage(report, progress, "kernels")
    planned = kernels.planned_int8
    if planned <= 0:
        raise CheckFailedError(
            "no compute layer is left to run int8: the rules or --keep-float keep all "
            f"{len(kernels.float_by_rule)} float"
        )
    if kernels.int8_fraction_of_quantized < o.min_int8_fraction:
        floats = ", ".join(kernels.fallback_layers)
        raise CheckFailedError(
            f"only {len(kernels.int8_compute)} of the {planned} compute layers the rules quantize "
            f"run int8 (required {o.min_int8_fraction:.0%}); float: {floats}"
        )

    int8_layers = len(kernels.int8_compute)
    layers = None
    if float_weights is not None:
        layers = _debug_layers(
            report, progress, adapter, qdq_path, float_weights, int8_layers, evaluation, spec, o
        )

    def per_layer() -> layer_debug.Faithfulness | None:
        """Asked only when the end-to-end check fails (engine_check.require_faithful):
        --debug-layers' result, or a run of its engine columns alone."""
        result = layers
        if result is None:
            feeds = _layer_feeds(evaluation, spec, qdq_path)
            result = layer_debug.analyse(qdq_path, {}, feeds, adapter, int8_layers, o.threads)
        return engine_check.per_layer_verdict(result, qdq_path, prepared)

    engines = {"fp32": fp32, "int8": int8}
    if prepared.plan.accuracy_budget and prepared.plan.accuracy_budget["kept_float"]:
        engines[ALL_INT8] = _all_int8_engine(loaded, adapter, out / ALL_INT8, o)
    runners = _runners(adapter, engines)
    if isinstance(runners, str):  # cannot run here (TensorRT without a GPU): say so
        for key in ("accuracy", "latency_ms", "speedup"):
            report.set(key, NotMeasured(runners))
        _fake_quant_accuracy(report, model, prepared, evaluation, spec, runners)
        return
    try:
        _accuracy(
            report, progress, model, prepared, runners["int8"], evaluation, spec, o, per_layer
        )
        _latency(report, progress, runners, spec, calib, o)
    finally:
        for runner in runners.values():
            runner.deactivate()


def _debug_layers(
    report: Report,
    progress: Progress,
    adapter,
    qdq_path: Path,
    float_weights: dict[str, np.ndarray],
    engine_int8_layers: int,
    evaluation: Dataset,
    spec: ModelSpec,
    o: BuildOptions,
) -> layer_debug.LayerDebug:
    """Per-layer errors into the report and layers.png, before the accuracy check can fail:
    a failing build is when they are wanted."""
    feeds = _layer_feeds(evaluation, spec, qdq_path)
    result = layer_debug.analyse(
        qdq_path, float_weights, feeds, adapter, engine_int8_layers, o.threads
    )
    report.set("layers", result.to_dict())
    title = f"{spec.name} on {o.target}: SQNR vs float per quantizer"
    report.artifact("layers_png", layer_debug.plot(result, title, qdq_path.parent / LAYERS_PNG))
    _stage(report, progress, "layers")
    return result


def _layer_feeds(evaluation: Dataset, spec: ModelSpec, qdq_path: Path) -> list[dict]:
    """The first DEBUG_SAMPLES evaluation samples, in batches, keyed by the QDQ model's inputs."""
    arrays, batch = evaluation.arrays(spec.inputs), spec.input_shape[0]
    return engine_check.layer_feeds(qdq_path, arrays, batch, DEBUG_SAMPLES)


def _model_report(spec: ModelSpec) -> dict:
    """Name and inputs; single-input models keep the input_shape/input_dtype keys too."""
    out: dict = {"name": spec.name}
    if len(spec.inputs) == 1:
        out.update(input_shape=list(spec.input_shape), input_dtype=spec.input_dtype)
    out["inputs"] = [item.to_dict() for item in spec.inputs]
    return out


def _runners(adapter, engines: Mapping[str, BuiltEngine]) -> dict | str:
    """Activated runners by name, or the reason engines cannot run on this machine."""
    try:
        runners = {name: adapter.runner(engine) for name, engine in engines.items()}
    except BackendUnavailableError as exc:
        return str(exc)
    for runner in runners.values():
        runner.activate()
    return runners


def _all_int8_engine(loaded, adapter, folder: Path, o: BuildOptions) -> BuiltEngine:
    """The engine of the same recipe without the accuracy budget's float layers: what the
    budget's choice is timed against (in its own folder; the report vouches for the main
    artifacts only)."""
    every_layer = recipe.quantize(
        loaded,
        dataclasses.replace(
            o, accuracy_budget=None, tune_latency=False, qat_checkpoint=None, qat_resume=False
        ),
    )
    path = recipe.export_onnx(loaded, every_layer, folder, precisions=("int8",))["int8"]
    return adapter.build(path, folder, precision="int8", threads=o.threads)


def _feed(runner, arrays: Mapping[str, np.ndarray], start: int, stop: int) -> dict:
    """Rows start:stop keyed by the engine's input names."""
    pairs = input_pairs(list(runner.get_input_metadata().keys()), arrays)
    return {e: arrays[a][start:stop] for e, a in pairs}


def _fake_quant_accuracy(report, model, prepared, evaluation: Dataset, spec, why: str) -> None:
    """Where the engine cannot run: the fake-quant model vs fp32 on the evaluation data. An
    engine that matches its fake-quant model (what the accuracy check holds it to) is this
    far from fp32, so below the int8_vs_fp32 bound the build fails (exit 4) instead of
    shipping an engine nobody could check."""
    arrays = evaluation.arrays(spec.inputs)
    float_out = engine_check.model_outputs(model, spec, arrays, torch.float32)
    fake_quant = engine_check.model_outputs(prepared, spec, arrays, torch.float32)
    result = closeness.compare(fake_quant, float_out, closeness.range_step(float_out))
    report.set("fakequant_vs_fp32", result)
    bound = closeness.DEFAULT_THRESHOLDS["int8_vs_fp32"]
    try:
        closeness.check(result, bound, "fakequant_vs_fp32")
    except CheckFailedError as exc:
        raise CheckFailedError(
            f"{exc}: the quantized model itself is this far from fp32, so its engine would be "
            f"too (the engine was built but not run: {why}); try another --calibration, "
            "--keep-float or QAT"
        ) from exc


def _accuracy(
    report,
    progress,
    model,
    prepared,
    runner,
    evaluation: Dataset,
    spec,
    o: BuildOptions,
    per_layer: Callable[[], layer_debug.Faithfulness | None],
) -> None:
    """The engine against its fake-quant model (engine_check: the build fails where it does
    not compute it) and against fp32 (fails where the quantization itself loses too much)."""
    batch = spec.input_shape[0]
    n = (len(evaluation) // batch) * batch
    if n == 0:
        raise BadInputError(f"evaluation data has fewer samples than the batch size {batch}")
    x = {name: a[:n] for name, a in evaluation.arrays(spec.inputs).items()}
    engine_out = engine_check.engine_outputs(runner, x, batch)
    refs = engine_check.references(model, prepared, spec, x)
    results, thresholds = engine_check.compare_engine(engine_out, refs, o.thresholds)
    if evaluation.labels is not None:
        labels = evaluation.labels[:n]
        results["top1"] = {
            "fp32": closeness.top1_accuracy(refs.float_out, labels),
            "fakequant": closeness.top1_accuracy(refs.fake_quant, labels),
            "int8": closeness.top1_accuracy(engine_out, labels),
        }
    report.set("accuracy", Measured(results))
    _stage(report, progress, "accuracy")
    try:
        engine_check.require_faithful(results, thresholds[engine_check.FAKEQUANT], per_layer)
    finally:  # with the per-layer verdict where one was asked for
        report.set("accuracy", Measured(results))
    try:
        closeness.check(results["int8_vs_fp32"], thresholds["int8_vs_fp32"], "int8_vs_fp32")
    except CheckFailedError as exc:
        # the engine computes what its fake-quant model computes: the loss is quantization's
        auto = prepared.plan.calibration["auto"]
        tried = set(auto["cosine"]) if auto else {o.calibration}
        clipping = [name for name in CLIPPING_OBSERVERS if name not in tried]
        raise CheckFailedError(
            f"{exc}; the engine matches its fake-quant model, so the quantization itself loses "
            f"this much: try --calibration {' or '.join(clipping)} (clips activation outliers), "
            "QAT, or a better-conditioned model"
            + ("" if o.debug_layers else "; --debug-layers shows where the error enters")
        ) from exc


def _latency(report, progress, runners: dict, spec, calib: Dataset, o: BuildOptions) -> None:
    arrays, batch = calib.arrays(spec.inputs), spec.input_shape[0]
    calls = {name: runner_call(r, _feed(r, arrays, 0, batch)) for name, r in runners.items()}
    config = TimingConfig(min_time_s=o.min_time_s)
    latencies = time_interleaved(calls, config)
    main = {k: latencies[k] for k in ("fp32", "int8")}
    report.set("latency_ms", Measured({k: summarize(v).to_dict() for k, v in main.items()}))
    speedup = paired_ratio(latencies["fp32"], latencies["int8"], config.block)
    report.set("speedup", Measured({"value": speedup}))
    if ALL_INT8 in latencies:  # what keeping the budget's layers float costs, same run
        report.data["accuracy_budget"]["latency"] = {
            "speedup_all_int8": paired_ratio(latencies["fp32"], latencies[ALL_INT8], config.block),
            "speedup": speedup,
            "slowdown_vs_all_int8": paired_ratio(
                latencies["int8"], latencies[ALL_INT8], config.block
            ),
        }
    _stage(report, progress, "latency")
