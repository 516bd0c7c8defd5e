"""onnxruntime CPU execution provider: the optimized graph is the engine and the proof.

onnxruntime has no separate engine format; its graph optimizer (QDQ selector/action fusion)
decides at session creation which Q/DQ groups become int8 kernels. Saving the optimized model
shows the outcome node by node, so that file is both the artifact and the kernel report's source.
With ORT_ENABLE_ALL it holds layout ops for this CPU (NCHWc), so it is valid on this machine only;
the runner therefore loads the ONNX given to onnxruntime with the same options. That is the QDQ
model itself, or a copy with the one fusion onnxruntime misses (matmul_bias.py).

One optimizer is off (DISABLED_OPTIMIZERS): WeightBiasQuantization gives any Conv, ConvTranspose
or Gemm that reads a DequantizeLinear and has a float weight per-tensor int8 weights. That is
every layer kept float (--keep-float, --accuracy-budget, --tune-latency) after an int8 one, so
the engine would compute what neither the fake-quant model nor the user asked for (ShuffleNetV2
with 21 layers float: one such layer became a QLinearConv, engine vs fake-quant cosine 0.9977).
Our int8 layers carry int8 weights and int32 biases already, so it has nothing else to do. A
QDQ model deployed outside this tool needs the same `disabled_optimizers` argument.
"""

from __future__ import annotations

import functools
from pathlib import Path

import onnx
import onnxruntime as ort
from google.protobuf.message import DecodeError
from polygraphy.backend.onnxrt import OnnxrtRunner

from qat_deploy.backends.onnxruntime.matmul_bias import fuse_matmul_bias
from qat_deploy.deploy.common.artifacts import atomic_path
from qat_deploy.deploy.common.errors import BadInputError, one_line
from qat_deploy.deploy.engines.adapter import Adapter, BuiltEngine, KernelReport, LayerPrecision

#: op_type -> compute kind, for the compute ops of the CPU EP (int8 and float, all domains:
#: the same op_type appears in ai.onnx, com.microsoft and layout domains such as NCHWc).
COMPUTE_KIND = {
    **dict.fromkeys(("Conv", "FusedConv", "NhwcConv", "NhwcFusedConv"), "conv"),
    **dict.fromkeys(("QLinearConv", "ConvInteger"), "conv"),
    **dict.fromkeys(("ConvTranspose", "QLinearConvTranspose"), "conv_transpose"),
    **dict.fromkeys(("Gemm", "FusedGemm", "QGemm"), "linear"),
    **dict.fromkeys(("MatMul", "FusedMatMul", "TransposeMatMul", "Attention"), "matmul"),
    **dict.fromkeys(
        (
            "QLinearMatMul",
            "MatMulInteger",
            "MatMulIntegerToFloat",
            "DynamicQuantizeMatMul",
            "QAttention",
        ),
        "matmul",
    ),
}

#: Kernels computing in 8-bit integers whatever their input tensor type (the dynamic ones
#: quantize a float input themselves).
INT8_KERNELS = frozenset(
    {
        "QLinearConv",
        "ConvInteger",
        "QLinearConvTranspose",
        "QGemm",
        "QLinearMatMul",
        "MatMulInteger",
        "MatMulIntegerToFloat",
        "DynamicQuantizeMatMul",
        "QAttention",
    }
)

#: Ops whose output keeps the (8-bit) element type of their first input.
_TYPE_PRESERVING = frozenset(
    {
        "Transpose",
        "Reshape",
        "Flatten",
        "Squeeze",
        "Unsqueeze",
        "MaxPool",
        "NhwcMaxPool",
        "Slice",
        "Gather",
        "Split",
        "Concat",
        "Resize",
        "Identity",
        "Pad",
        "Expand",
        "Tile",
        "DepthToSpace",
        "SpaceToDepth",
    }
)
_INT8_TYPES = frozenset({onnx.TensorProto.INT8, onnx.TensorProto.UINT8})


#: onnxruntime graph optimizers that would change what the QDQ model computes (see above)
DISABLED_OPTIMIZERS = ("WeightBiasQuantization",)


def session_options(threads: int, optimized_path: Path | None = None) -> ort.SessionOptions:
    """Latency-oriented CPU options shared by the build and the runner."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: the NCHWc "hardware specific" note is known
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    return options


def create_session(
    onnx_path: Path, threads: int, optimized_path: Path | None = None
) -> ort.InferenceSession:
    options = session_options(threads, optimized_path)
    try:
        return ort.InferenceSession(
            str(onnx_path),
            options,
            providers=["CPUExecutionProvider"],
            disabled_optimizers=list(DISABLED_OPTIMIZERS),
        )
    except Exception as exc:  # onnxruntime's error types share no useful base class
        raise BadInputError(f"onnxruntime cannot load {onnx_path}: {one_line(exc)}") from exc


class OnnxruntimeAdapter(Adapter):
    name = "onnxruntime"

    def unavailable_reason(self) -> str | None:
        return None  # a hard dependency of the project: CPU EP is always there

    def _build(
        self, onnx_path: Path, out_dir: Path, *, precision: str, threads: int
    ) -> BuiltEngine:
        source, fused = _prefused(onnx_path, out_dir / f"engine.{self.name}.input.onnx")
        artifact = out_dir / f"engine.{self.name}.onnx"
        with atomic_path(artifact) as tmp:
            create_session(source, threads, optimized_path=tmp)  # writes the artifact
        return BuiltEngine(
            backend=self.name,
            artifact=artifact,
            onnx_path=source,
            precision=precision,
            threads=threads,
            info={
                "onnxruntime": ort.__version__,
                "provider": "CPUExecutionProvider",
                "graph_optimization": "ORT_ENABLE_ALL",
                "disabled_optimizers": ", ".join(DISABLED_OPTIMIZERS),
                "artifact": "optimized ONNX graph; CPU-specific layouts, valid on this machine",
                "matmul_bias_fused": str(fused),
            },
        )

    def runner(self, engine: BuiltEngine) -> OnnxrtRunner:
        """Runs the graph the build gave onnxruntime (the QDQ model, or its copy with our
        fusions): session creation repeats the optimization the build saved. Reloading the
        saved optimized graph instead measured 6% slower on bert_tiny."""
        loader = functools.partial(create_session, engine.onnx_path, engine.threads)
        return OnnxrtRunner(loader, name=f"{self.name}-{engine.precision}")

    def kernel_report(self, engine: BuiltEngine) -> KernelReport:
        try:
            model = onnx.load(str(engine.artifact), load_external_data=False)
        except (OSError, DecodeError) as exc:
            raise BadInputError(
                f"cannot read onnxruntime engine {engine.artifact}: {one_line(exc)}"
            ) from exc
        return KernelReport(
            layers=graph_precisions(model.graph),
            source="onnxruntime optimized model graph (ORT_ENABLE_ALL, CPU EP)",
        )


def _prefused(onnx_path: Path, fused_path: Path) -> tuple[Path, int]:
    """The graph to hand onnxruntime: `onnx_path`, or when fuse_matmul_bias finds work, a
    copy written atomically to `fused_path`. Models with external data are left as they are."""
    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except (OSError, DecodeError) as exc:
        raise BadInputError(f"onnxruntime cannot load {onnx_path}: {one_line(exc)}") from exc
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        return onnx_path, 0
    fused = fuse_matmul_bias(model)
    if not fused:
        return onnx_path, 0
    with atomic_path(fused_path) as tmp:
        onnx.save(model, str(tmp))
    return fused_path, fused


def graph_precisions(graph: onnx.GraphProto) -> list[LayerPrecision]:
    """Each node's precision: int8 for int8 kernels and for nodes fed 8-bit tensors.

    8-bit tensors are followed from the graph inputs and initializers through the nodes
    (topologically sorted, as onnxruntime saves them): quantizing ops and QLinear* kernels
    produce them, type-preserving ops pass them on.
    """
    int8 = {t.name for t in graph.initializer if t.data_type in _INT8_TYPES}
    int8 |= {v.name for v in graph.input if v.type.tensor_type.elem_type in _INT8_TYPES}
    layers = []
    for node in graph.node:
        fed_int8 = bool(node.input) and node.input[0] in int8
        if _produces_int8(node, fed_int8):
            int8.update(node.output)
        layers.append(
            LayerPrecision(
                name=node.name or node.output[0],
                layer_type=node.op_type,
                precision="int8" if node.op_type in INT8_KERNELS or fed_int8 else "float",
                compute_kind=COMPUTE_KIND.get(node.op_type),
            )
        )
    return layers


def _produces_int8(node: onnx.NodeProto, fed_int8: bool) -> bool:
    op = node.op_type
    if op in ("QuantizeLinear", "DynamicQuantizeLinear") or op.startswith("QLinear"):
        return True
    if op == "QGemm":  # quantized output only when y_scale (input 7) is given
        return len(node.input) > 7 and bool(node.input[7])
    return fed_int8 and op in _TYPE_PRESERVING


ADAPTER = OnnxruntimeAdapter()
