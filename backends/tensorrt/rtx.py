"""Ahead-of-time engine build with TensorRT for RTX: the real parser and builder, no GPU.

TensorRT-RTX compiles for a compute capability named up front, so a CPU machine can build and
inspect the plan; only deserializing and running it needs the GPU. The engine layer information
arrives in the VERBOSE build log when profiling verbosity is DETAILED (an engine inspector would
need a deserialized engine, hence a GPU), so a capturing logger keeps that message.
"""

from __future__ import annotations

import importlib
import time
from pathlib import Path
from types import ModuleType

from qat_deploy.backends.tensorrt.onnx_parser import parse_onnx
from qat_deploy.backends.tensorrt.plan_build import PlanBuild
from qat_deploy.deploy.common.errors import BadInputError, CheckFailedError

MODULE = "tensorrt_rtx_bindings"  # import name of pip's tensorrt-rtx-cu12-bindings
_LAYER_INFO_HEADER = "Layers:"


def compute_capabilities(trt: ModuleType) -> list[str]:
    """The SMxx names this TensorRT-RTX can build for."""
    names = [name for name in trt.ComputeCapability.__members__ if name.startswith("SM")]
    return sorted(names, key=lambda name: int(name[2:]))


def _capability(trt: ModuleType, sm: str):
    known = compute_capabilities(trt)
    if sm.upper() not in known:
        raise BadInputError(
            f"unknown compute capability '{sm}'; TensorRT-RTX knows {', '.join(known)}"
        )
    return trt.ComputeCapability.__members__[sm.upper()]


def _capturing_logger(trt: ModuleType):
    """An ILogger that keeps the layer information and every warning or error."""

    class CapturingLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.layer_info = ""
            self.problems: list[str] = []

        def log(self, severity, msg: str) -> None:
            if msg.startswith(_LAYER_INFO_HEADER):
                self.layer_info = msg
            elif severity <= trt.ILogger.Severity.WARNING:
                self.problems.append(msg.strip().splitlines()[0] if msg.strip() else msg)

    return CapturingLogger()


def build(onnx_path: Path, sm: str) -> PlanBuild:
    """Parse `onnx_path` and build a strongly typed plan for compute capability `sm`."""
    trt = importlib.import_module(MODULE)
    capability = _capability(trt, sm)
    logger = _capturing_logger(trt)
    builder = trt.Builder(logger)
    # strongly typed: the graph's Q/DQ nodes alone decide what runs in int8
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = parse_onnx(trt, network, logger, onnx_path)
    config = builder.create_builder_config()
    config.num_compute_capabilities = 1
    config.set_compute_capability(capability, 0)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    start = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    del parser  # kept alive until the build: the network refers to its weights
    if plan is None:
        reasons = "; ".join(logger.problems) or "no reason logged"
        raise CheckFailedError(f"TensorRT-RTX could not build {onnx_path.name}: {reasons}")
    return PlanBuild(
        plan=bytes(plan),
        layer_info=logger.layer_info,
        layer_info_format="text",
        builder=f"TensorRT-RTX {trt.__version__}",
        compute_capability=sm.upper(),
        seconds=seconds,
        warnings=tuple(dict.fromkeys(logger.problems)),
    )
