"""OpenVINO CPU plugin: compile the QDQ ONNX, export the compiled blob, prove int8 per layer.

OpenVINO turns Q/DQ pairs into FakeQuantize and its low-precision transformations decide which
layers run int8; the compiled model's runtime graph reports each layer's runtime precision, so
the kernel report reads it from the imported blob, the very artifact that will run.
On CPUs with bf16 support OpenVINO computes float layers in bf16 by default. Every build pins
f32: the fp32 baseline is then really fp32, and the float parts of an int8 engine (dequantized
outputs, SiLU, squeeze-excite, Softmax, LayerNorm) compute what the fake-quant model computes,
so the accuracy check compares int8 arithmetic alone; the runner imports the blob with the same
hint (an import applies its own). Measured on a Xeon with AMX-BF16: in bf16, the int8 engines
of 8 of 20 zoo models missed their fake-quant models (EfficientNet-B0 cosine 0.980 against
0.9925 in f32; a squeeze-excite gate 0.9% of elements off by over half a step, 0 in f32).
"""

from __future__ import annotations

import io
from pathlib import Path

import openvino as ov

from qat_deploy.backends.openvino.runner import (
    DEVICE,
    INFERENCE_PRECISION,
    OpenvinoRunner,
    import_blob,
    ov_message,
)
from qat_deploy.deploy.common.artifacts import write_atomic
from qat_deploy.deploy.common.errors import BadInputError
from qat_deploy.deploy.engines.adapter import Adapter, BuiltEngine, KernelReport, LayerPrecision

#: Runtime layerType -> compute kind, as the CPU plugin names its layers (FullyConnected is a
#: MatMul or Gemm with constant weights; depthwise convolutions are reported as Convolution).
#: Known blind spot: a MatMul fused into a "Subgraph" snippet (fp32 attention) is not listed as
#: compute, because the imported blob's runtime model no longer names the ops a Subgraph fused.
COMPUTE_KIND = {
    "Convolution": "conv",
    "GroupConvolution": "conv",
    "Deconvolution": "conv_transpose",
    "FullyConnected": "linear",
    "MatMul": "matmul",
    "ScaledDotProductAttention": "matmul",
}
INT8_PRECISIONS = frozenset({"u8", "i8"})
#: Runtime-graph bookkeeping, not kernels.
NOT_LAYERS = frozenset({"Const", "Input", "Output"})


class OpenvinoAdapter(Adapter):
    name = "openvino"

    def unavailable_reason(self) -> str | None:
        devices = ov.Core().available_devices
        return None if DEVICE in devices else f"no {DEVICE} device (found: {devices})"

    def _build(
        self, onnx_path: Path, out_dir: Path, *, precision: str, threads: int
    ) -> BuiltEngine:
        config: dict[str, object] = {
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": threads,
            "INFERENCE_PRECISION_HINT": INFERENCE_PRECISION,
        }
        core = ov.Core()
        try:
            compiled = core.compile_model(core.read_model(str(onnx_path)), DEVICE, config)
        except RuntimeError as exc:
            raise BadInputError(f"OpenVINO cannot compile {onnx_path}: {ov_message(exc)}") from exc
        blob = io.BytesIO()
        compiled.export_model(blob)
        artifact = out_dir / f"engine.{self.name}.blob"
        write_atomic(artifact, blob.getvalue())
        return BuiltEngine(
            backend=self.name,
            artifact=artifact,
            onnx_path=onnx_path,
            precision=precision,
            threads=threads,
            info={
                "openvino": ov.get_version(),
                "device": core.get_property(DEVICE, "FULL_DEVICE_NAME"),
                "performance_hint": "LATENCY",
                "inference_precision": compiled.get_property(
                    "INFERENCE_PRECISION_HINT"
                ).get_type_name(),
            },
        )

    def runner(self, engine: BuiltEngine) -> OpenvinoRunner:
        return OpenvinoRunner(
            engine.artifact, engine.threads, name=f"{self.name}-{engine.precision}"
        )

    def kernel_report(self, engine: BuiltEngine) -> KernelReport:
        compiled = import_blob(engine.artifact, engine.threads)
        layers = []
        for op in compiled.get_runtime_model().get_ordered_ops():
            info = op.get_rt_info()
            layer_type = info["layerType"].astype(str)
            if layer_type in NOT_LAYERS:
                continue
            int8 = info["runtimePrecision"].astype(str) in INT8_PRECISIONS
            layers.append(
                LayerPrecision(
                    name=op.get_friendly_name(),
                    layer_type=layer_type,
                    precision="int8" if int8 else "float",
                    compute_kind=COMPUTE_KIND.get(layer_type),
                )
            )
        return KernelReport(layers=layers, source="OpenVINO runtime model rt_info of the blob")


ADAPTER = OpenvinoAdapter()
