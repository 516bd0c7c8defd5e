"""Datacenter TensorRT on an NVIDIA GPU, through polygraphy's TensorRT loaders.

Written against TensorRT >= 10.1 and polygraphy 0.49+; it cannot run on the GPU-less machines
this project is developed on, so it stays as thin as the loaders allow. The network is strongly
typed: Q/DQ nodes alone decide what runs in int8 (precision flags are not allowed then), which is
TensorRT's recommended explicit-quantization path. The layer information comes from the engine
inspector, which needs the deserialized engine (fine here: this path has a GPU).
"""

from __future__ import annotations

import time
from pathlib import Path

from qat_deploy.backends.tensorrt.onnx_parser import parse_onnx
from qat_deploy.backends.tensorrt.plan_build import PlanBuild
from qat_deploy.deploy.common.errors import CheckFailedError, one_line

MODULE = "tensorrt"


def build(onnx_path: Path, sm: str) -> PlanBuild:
    """Parse and build for the GPU in this machine (`sm` names it, for the record)."""
    import tensorrt as trt
    from polygraphy.backend.trt import (
        CreateConfig,
        create_network,
        engine_bytes_from_network,
        engine_from_bytes,
    )
    from polygraphy.backend.trt.util import get_trt_logger
    from polygraphy.exception import PolygraphyException

    builder, network = create_network(strongly_typed=True)
    parser = parse_onnx(trt, network, get_trt_logger(), onnx_path)
    config = CreateConfig(profiling_verbosity=trt.ProfilingVerbosity.DETAILED)
    start = time.perf_counter()
    try:
        plan = engine_bytes_from_network((builder, network, parser), config=config)
    except PolygraphyException as exc:
        raise CheckFailedError(
            f"TensorRT could not build {onnx_path.name}: {one_line(exc)}"
        ) from exc
    seconds = time.perf_counter() - start
    inspector = engine_from_bytes(plan).create_engine_inspector()
    return PlanBuild(
        plan=bytes(plan),
        layer_info=inspector.get_engine_information(trt.LayerInformationFormat.JSON),
        layer_info_format="json",
        builder=f"TensorRT {trt.__version__} (datacenter)",
        compute_capability=sm,
        seconds=seconds,
    )


def runner(plan_path: Path):
    """polygraphy's TrtRunner over the saved plan (deserialized on activate)."""
    from polygraphy.backend.trt import EngineFromPath, TrtRunner

    return TrtRunner(EngineFromPath(str(plan_path)))
