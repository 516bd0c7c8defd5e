"""TensorRT adapter: datacenter TensorRT where there is an NVIDIA GPU, else TensorRT-RTX.

- Datacenter TensorRT (`import tensorrt`) and a GPU: polygraphy loaders build a strongly typed
  plan for that GPU, the engine inspector reports the layers, polygraphy's TrtRunner runs it.
- Otherwise TensorRT-RTX (`import tensorrt_rtx_bindings`): the real ONNX parser and an
  ahead-of-time build for compute capability `sm` (default SM89), no GPU needed; the layers come
  from the DETAILED build log.

Both save out_dir/engine.tensorrt.plan and the raw layer information beside it. BuiltEngine.info
says which TensorRT built the plan ("builder"), for which "compute_capability", and, when this
machine cannot run the engine, "latency": "not measured: <why>" -- the same reason runner()
raises as BackendUnavailableError. Callers read info["latency"] to report latency honestly.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import onnx

from qat_deploy.backends.tensorrt import datacenter, rtx
from qat_deploy.backends.tensorrt.gpu import probe_gpu
from qat_deploy.backends.tensorrt.layer_info import (
    layer_precisions,
    layers_from_json,
    layers_from_text,
    onnx_compute_nodes,
)
from qat_deploy.backends.tensorrt.plan_build import PlanBuild
from qat_deploy.deploy.common.artifacts import write_atomic
from qat_deploy.deploy.common.errors import BackendUnavailableError, BadInputError, CheckFailedError
from qat_deploy.deploy.engines.adapter import Adapter, BuiltEngine, KernelReport

PLAN_NAME = "engine.tensorrt.plan"
DEFAULT_SM = "SM89"
_LAYER_INFO = {"text": "engine.tensorrt.layers.txt", "json": "engine.tensorrt.layers.json"}
_SOURCES = {
    "text": "TensorRT-RTX engine layer information (DETAILED build log)",
    "json": "TensorRT engine inspector (LayerInformationFormat.JSON)",
}


def installed(module: str) -> bool:
    """Whether `module` imports here (a broken install counts as missing)."""
    try:
        importlib.import_module(module)
    except (ImportError, OSError):
        return False
    return True


@dataclass(frozen=True)
class TensorRTAdapter(Adapter):
    """`sm` is the compute capability TensorRT-RTX builds for (dataclasses.replace to change)."""

    name: ClassVar[str] = "tensorrt"
    sm: str = DEFAULT_SM

    def unavailable_reason(self) -> str | None:
        if self._path() is not None:
            return None
        if installed(datacenter.MODULE):
            return (
                f"tensorrt is installed but {probe_gpu().missing}; "
                "pip install '.[tensorrt-rtx]' to build ahead of time without a GPU"
            )
        gpu = probe_gpu()
        if gpu.missing is None:
            return (
                f"neither {datacenter.MODULE} nor {rtx.MODULE} is installed; this machine has "
                f"an {gpu.name} ({gpu.sm}): pip install '.[tensorrt]' to build and time on it"
            )
        return (
            f"neither {datacenter.MODULE} nor {rtx.MODULE} is installed; "
            "pip install '.[tensorrt-rtx]' (or '.[tensorrt]' on a machine with an NVIDIA GPU)"
        )

    def _build(
        self, onnx_path: Path, out_dir: Path, *, precision: str, threads: int
    ) -> BuiltEngine:
        _check_model(onnx_path, precision)
        if self._path() == "datacenter":
            result = datacenter.build(onnx_path, probe_gpu().sm or "unknown")
        else:
            result = rtx.build(onnx_path, self.sm)
        artifact = out_dir / PLAN_NAME
        layer_info = _LAYER_INFO[result.layer_info_format]
        write_atomic(artifact, result.plan)
        write_atomic(out_dir / layer_info, result.layer_info.encode())
        return BuiltEngine(
            backend=self.name,
            artifact=artifact,
            onnx_path=onnx_path,
            precision=precision,
            threads=threads,
            info=_info(result, layer_info),
        )

    def runner(self, engine: BuiltEngine):
        reason = _cannot_run(engine.info.get("builder", ""))
        if reason is not None:
            raise BackendUnavailableError(f"tensorrt: {reason}")
        return datacenter.runner(engine.artifact)

    def kernel_report(self, engine: BuiltEngine) -> KernelReport:
        path = engine.artifact.parent / engine.info["layer_info"]
        text = path.read_text()
        fmt = "text" if path.suffix == ".txt" else "json"
        layers = layers_from_text(text) if fmt == "text" else layers_from_json(text)
        if not layers:
            raise CheckFailedError(
                f"{path.name} holds no engine layers: cannot tell which layers run int8"
            )
        return KernelReport(
            layer_precisions(layers, onnx_compute_nodes(engine.onnx_path)), source=_SOURCES[fmt]
        )

    def _path(self) -> str | None:
        """Which build path applies here: "datacenter", "rtx", or None (neither can build)."""
        if installed(datacenter.MODULE) and probe_gpu().missing is None:
            return "datacenter"
        if installed(rtx.MODULE):
            return "rtx"
        return None


def _check_model(onnx_path: Path, precision: str) -> None:
    """A strongly typed build takes precision from the graph: the claim must match it."""
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    has_qdq = any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in graph.node)
    if precision == "int8" and not has_qdq:
        raise BadInputError(
            f"{onnx_path.name} has no QuantizeLinear/DequantizeLinear nodes; "
            "TensorRT would build it in float, not int8"
        )
    if precision == "fp32" and has_qdq:
        raise BadInputError(
            f"{onnx_path.name} has QuantizeLinear/DequantizeLinear nodes; a strongly typed "
            "TensorRT build runs them in int8, so it is no fp32 baseline"
        )


def _info(result: PlanBuild, layer_info: str) -> dict[str, str]:
    gpu = probe_gpu()
    info = {
        "builder": result.builder,
        "compute_capability": result.compute_capability,
        "gpu": gpu.name or f"none ({gpu.missing})",
        "strongly_typed": "true",
        "build_seconds": f"{result.seconds:.3f}",
        "plan_bytes": str(len(result.plan)),
        "layer_info": layer_info,
    }
    if result.warnings:
        info["warnings"] = " | ".join(result.warnings)
    reason = _cannot_run(result.builder)
    if reason is not None:
        info["latency"] = f"not measured: {reason}"
    return info


def _cannot_run(builder: str) -> str | None:
    """Why this machine cannot deserialize and time a plan from `builder`, or None if it can."""
    gpu = probe_gpu()
    if gpu.missing is not None:
        return (
            "deserializing/running a TensorRT engine needs an NVIDIA GPU "
            f"(none found: {gpu.missing})"
        )
    if builder.startswith("TensorRT-RTX"):
        return (
            f"the plan was built ahead of time by {builder}; running TensorRT-RTX "
            "plans is not supported here: pip install '.[tensorrt]' to build and time on this GPU"
        )
    if not installed(datacenter.MODULE):
        return "running the plan needs the tensorrt package (not installed)"
    return None


ADAPTER = TensorRTAdapter()
