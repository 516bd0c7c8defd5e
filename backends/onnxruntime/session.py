"""onnxruntime sessions as the build and the runner create them, and the one graph optimizer
the build switches per model, by timing the model both ways.

WeightBiasQuantization is always off (adapter.py says why). QDQPropagationTransformer moves a
DequantizeLinear down and a QuantizeLinear up through Transpose, Reshape, MaxPool and the like,
so those run on 8-bit data. That is usually cheaper, but onnxruntime's 8-bit Transpose is slow
for some permutations: swapping 2-element blocks ([1024, 16, 2, 2], perm 0 2 1 3) took 0.58 ms
in uint8 against 0.023 ms in float (AMD EPYC Zen 4, 2 threads). timm MobileViT-XXS's patch
unfold and fold are such Transposes: with propagation they took 8 of its 22 ms (profiled); without
it, 14.6 ms. Other models profile faster with it (EdgeNeXt, Swin, MNASNet), so the build times
the model both ways and keeps the faster, unless both give the same optimized graph.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from polygraphy.backend.onnxrt import OnnxrtRunner
from polygraphy.comparator import DataLoader

from qat_deploy.backends.onnxruntime.kernels import graph_precisions
from qat_deploy.deploy.common.errors import BadInputError, one_line
from qat_deploy.deploy.engines.timing import TimingConfig, runner_call, time_interleaved

#: onnxruntime graph optimizers that would change what the QDQ model computes (adapter.py)
DISABLED_OPTIMIZERS = ("WeightBiasQuantization",)
PROPAGATION = "QDQPropagationTransformer"
#: "measure": time both and keep the faster; "on" / "off": no timing (a reproducible build)
PROPAGATION_CHOICES = ("measure", "on", "off")
#: Propagation goes off only when the model runs at least this much faster without it: a
#: smaller gain is within what two sessions of one model differ by on a shared machine.
PROPAGATION_MARGIN = 0.05
CHOICE_TIMING = TimingConfig(warmup=5, block=5, min_runs=40, min_time_s=0.5, rewarm=2)


def session_options(threads: int, optimized_path: Path | None = None) -> ort.SessionOptions:
    """Latency-oriented CPU options shared by the build and the runner."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: the NCHWc "hardware specific" note is known
    # Worker threads spin inside a run but not after it. Left spinning, an idle session's
    # workers take a core from the next session's run: timing fp32 and int8 MobileNetV3-Small
    # interleaved (2 threads, 2 cores) gave p50/p90 1.64/6.19 ms with the default and
    # 1.30/1.48 ms with this, the lowest p50 of any setting (no spinning at all: 1.87 ms).
    options.add_session_config_entry("session.force_spinning_stop", "1")
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    return options


def create_session(
    onnx_path: Path,
    threads: int,
    optimized_path: Path | None = None,
    disabled: tuple[str, ...] = DISABLED_OPTIMIZERS,
) -> ort.InferenceSession:
    options = session_options(threads, optimized_path)
    try:
        return ort.InferenceSession(
            str(onnx_path),
            options,
            providers=["CPUExecutionProvider"],
            disabled_optimizers=list(disabled),
        )
    except Exception as exc:  # onnxruntime's error types share no useful base class
        raise BadInputError(f"onnxruntime cannot load {onnx_path}: {one_line(exc)}") from exc


@dataclass(frozen=True)
class OptimizerChoice:
    disabled: tuple[str, ...]  # what the runner must disable too
    reason: str  # one line for the report


def check_propagation(choice: str) -> None:
    if choice not in PROPAGATION_CHOICES:
        raise BadInputError(
            f"bad qdq_propagation {choice!r}; expected one of {', '.join(PROPAGATION_CHOICES)}"
        )


def optimize(onnx_path: Path, threads: int, choice: str, optimized_path: Path) -> OptimizerChoice:
    """Write the optimized graph of `onnx_path` to `optimized_path` with QDQ propagation on,
    off, or whichever of the two measures faster here (`choice`, PROPAGATION_CHOICES)."""
    check_propagation(choice)
    off = (*DISABLED_OPTIMIZERS, PROPAGATION)
    if choice != "measure":
        disabled = off if choice == "off" else DISABLED_OPTIMIZERS
        create_session(onnx_path, threads, optimized_path, disabled)
        return OptimizerChoice(disabled, f"{PROPAGATION} {choice}, as asked")
    with tempfile.TemporaryDirectory(prefix="ort-optimized-") as work:
        graphs = {"on": Path(work) / "on.onnx", "off": Path(work) / "off.onnx"}
        sessions = {
            "on": create_session(onnx_path, threads, graphs["on"], DISABLED_OPTIMIZERS),
            "off": create_session(onnx_path, threads, graphs["off"], off),
        }
        if _signature(graphs["on"]) == _signature(graphs["off"]):
            shutil.copyfile(graphs["on"], optimized_path)
            return OptimizerChoice(DISABLED_OPTIMIZERS, f"{PROPAGATION} on: it changes nothing")
        medians = _median_latencies(sessions)
        faster_off = prefer_without_propagation(medians["on"], medians["off"])
        chosen = "off" if faster_off else "on"
        shutil.copyfile(graphs[chosen], optimized_path)
    timing = f"median {medians['off']:.3g} ms without it, {medians['on']:.3g} ms with it"
    disabled = off if faster_off else DISABLED_OPTIMIZERS
    return OptimizerChoice(disabled, f"{PROPAGATION} {chosen}: {timing}")


def prefer_without_propagation(with_ms: float, without_ms: float) -> bool:
    """Whether the session without QDQ propagation is faster by more than the noise margin."""
    return without_ms < (1.0 - PROPAGATION_MARGIN) * with_ms


def _signature(path: Path) -> list[tuple[str, str]]:
    """Each node's op and precision: equal when propagation moved no op to or from int8."""
    graph = onnx.load(str(path), load_external_data=False).graph
    return [(layer.layer_type, layer.precision) for layer in graph_precisions(graph)]


def _median_latencies(sessions: dict[str, ort.InferenceSession]) -> dict[str, float]:
    """Median ms per session on one random input, timed in interleaved blocks."""
    runners = {name: OnnxrtRunner(session) for name, session in sessions.items()}
    for runner in runners.values():
        runner.activate()
    try:
        loader = DataLoader(seed=0)
        loader.input_metadata = next(iter(runners.values())).get_input_metadata()
        feed = loader[0]
        calls = {name: runner_call(runner, feed) for name, runner in runners.items()}
        latencies = time_interleaved(calls, CHOICE_TIMING)
        return {name: float(np.median(ms)) for name, ms in latencies.items()}
    finally:
        for runner in runners.values():
            runner.deactivate()
