"""A polygraphy runner for OpenVINO compiled-model blobs (polygraphy ships none for OpenVINO).

It imports the exported blob rather than recompiling the ONNX, so what runs is the artifact the
build wrote, with the precision decisions made at build time.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from pathlib import Path

import openvino as ov
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata

from qat_deploy.deploy.common.errors import BadInputError, one_line

DEVICE = "CPU"


#: What every build compiles with and every import repeats: importing a blob applies the
#: import's own INFERENCE_PRECISION_HINT, so a blob compiled for f32 and imported without it
#: runs in bf16 on CPUs that have bf16 (checked on a Xeon with AMX, OpenVINO 2026.4).
INFERENCE_PRECISION = "f32"


def import_blob(blob: Path, threads: int) -> ov.CompiledModel:
    """The compiled model of an exported blob, with this run's thread count."""
    config = {
        "INFERENCE_NUM_THREADS": threads,
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": INFERENCE_PRECISION,
    }
    try:
        return ov.Core().import_model(Path(blob).read_bytes(), DEVICE, config)
    except (OSError, RuntimeError) as exc:
        raise BadInputError(
            f"cannot import OpenVINO blob {blob} (rebuild it with this OpenVINO): {ov_message(exc)}"
        ) from exc


def ov_message(exc: BaseException) -> str:
    """The informative line of an OpenVINO error (they open with "Exception from <file>" lines)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith("Exception from ")]
    return useful[-1] if useful else one_line(exc)


class OpenvinoRunner(BaseRunner):
    def __init__(self, blob: Path, threads: int, name: str | None = None) -> None:
        super().__init__(name=name, prefix="openvino-runner")
        self.blob = Path(blob)
        self.threads = threads

    def activate_impl(self) -> None:
        self.compiled = import_blob(self.blob, self.threads)
        self.request = self.compiled.create_infer_request()

    def get_input_metadata_impl(self) -> TensorMetadata:
        meta = TensorMetadata()
        for port in self.compiled.inputs:
            shape = port.get_partial_shape()
            dims = None
            if shape.rank.is_static:
                dims = [d.get_length() if d.is_static else None for d in shape]
            meta.add(port.get_any_name(), dtype=port.get_element_type().to_dtype(), shape=dims)
        return meta

    def infer_impl(self, feed_dict: dict) -> OrderedDict:
        start = time.perf_counter()
        results = self.request.infer(dict(feed_dict))  # copies outputs: safe to keep
        self.inference_time = time.perf_counter() - start
        return OrderedDict((port.get_any_name(), results[port]) for port in self.compiled.outputs)

    def deactivate_impl(self) -> None:
        del self.request, self.compiled
