"""onnxruntime CPU execution provider: the optimized graph is the engine and the proof.

onnxruntime has no separate engine format; its graph optimizer (QDQ selector/action fusion)
decides at session creation which Q/DQ groups become int8 kernels. Saving the optimized model
shows the outcome node by node, so that file is both the artifact and the kernel report's source.
With ORT_ENABLE_ALL it holds layout ops for this CPU (NCHWc), so it is valid on this machine only;
the runner therefore loads the ONNX given to onnxruntime with the same options. That is the QDQ
model itself, or a copy with the rewrites onnxruntime's optimizer needs to run more in int8
(PRE_SESSION: matmul_bias.py, hardsigmoid.py, gelu_gate.py), or in fewer ops
(channel_shuffle.py). They apply to the fp32 baseline too, so the int8 speedup compares like
with like.

One optimizer is always off (session.DISABLED_OPTIMIZERS): WeightBiasQuantization gives any
Conv, ConvTranspose or Gemm that reads a DequantizeLinear and has a float weight per-tensor int8
weights. That is every layer kept float (--keep-float, --accuracy-budget, --tune-latency) after
an int8 one, so the engine would compute what neither the fake-quant model nor the user asked
for (ShuffleNetV2 with 21 layers float: one such layer became a QLinearConv, engine vs
fake-quant cosine 0.9977). Our int8 layers carry int8 weights and int32 biases already, so it
has nothing else to do. QDQ propagation is on or off per model, by measurement (session.py; the
engine info says which). A QDQ model deployed outside this tool needs the same
`disabled_optimizers` argument.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnxruntime as ort
from google.protobuf.message import DecodeError
from polygraphy.backend.onnxrt import OnnxrtRunner

from qat_deploy.backends.onnxruntime.channel_shuffle import channel_shuffle_as_gather
from qat_deploy.backends.onnxruntime.gelu_gate import gelu_gate_as_erf
from qat_deploy.backends.onnxruntime.hardsigmoid import hardsigmoid_as_add
from qat_deploy.backends.onnxruntime.kernels import graph_precisions
from qat_deploy.backends.onnxruntime.matmul_bias import fuse_matmul_bias
from qat_deploy.backends.onnxruntime.session import (
    DISABLED_OPTIMIZERS,
    check_propagation,
    create_session,
    optimize,
)
from qat_deploy.deploy.common.artifacts import atomic_path
from qat_deploy.deploy.common.errors import BadInputError, one_line
from qat_deploy.deploy.engines.adapter import Adapter, BuiltEngine, KernelReport

__all__ = ["ADAPTER", "OnnxruntimeAdapter", "create_session", "graph_precisions"]


@dataclass(frozen=True)
class OnnxruntimeAdapter(Adapter):
    """`qdq_propagation` (session.PROPAGATION_CHOICES): "measure" times an int8 model with and
    without onnxruntime's QDQ propagation and keeps the faster; "on"/"off" skip the timing."""

    name = "onnxruntime"
    qdq_propagation: str = "measure"

    def __post_init__(self) -> None:
        check_propagation(self.qdq_propagation)

    def unavailable_reason(self) -> str | None:
        return None  # a hard dependency of the project: CPU EP is always there

    def _build(
        self, onnx_path: Path, out_dir: Path, *, precision: str, threads: int
    ) -> BuiltEngine:
        source, rewrites = _prefused(onnx_path, out_dir / f"engine.{self.name}.input.onnx")
        artifact = out_dir / f"engine.{self.name}.onnx"
        # an fp32 model has no Q/DQ to propagate: nothing to time
        choice = self.qdq_propagation if precision == "int8" else "on"
        with atomic_path(artifact) as tmp:
            chosen = optimize(source, threads, choice, tmp)  # writes the artifact
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
                "disabled_optimizers": ",".join(chosen.disabled),
                "qdq_propagation": chosen.reason,
                "artifact": "optimized ONNX graph; CPU-specific layouts, valid on this machine",
                **{name: str(count) for name, count in rewrites.items()},
            },
        )

    def runner(self, engine: BuiltEngine) -> OnnxrtRunner:
        """Runs the graph the build gave onnxruntime (the QDQ model, or its copy with our
        fusions): session creation repeats the optimization the build saved, with the same
        optimizers off. Reloading the saved optimized graph instead measured 6% slower on
        bert_tiny."""
        recorded = engine.info.get("disabled_optimizers", ",".join(DISABLED_OPTIMIZERS))
        disabled = tuple(name for name in recorded.split(",") if name)
        loader = functools.partial(create_session, engine.onnx_path, engine.threads, None, disabled)
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


def _prefused(onnx_path: Path, fused_path: Path) -> tuple[Path, dict[str, int]]:
    """The graph to hand onnxruntime: `onnx_path`, or when one of its pre-session rewrites
    (PRE_SESSION) finds work, a copy written atomically to `fused_path`; with how many places
    each rewrote. Models with external data are left as they are."""
    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except (OSError, DecodeError) as exc:
        raise BadInputError(f"onnxruntime cannot load {onnx_path}: {one_line(exc)}") from exc
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        return onnx_path, dict.fromkeys(PRE_SESSION, 0)
    counts = {name: rewrite(model) for name, rewrite in PRE_SESSION.items()}
    if not any(counts.values()):
        return onnx_path, counts
    with atomic_path(fused_path) as tmp:
        onnx.save(model, str(tmp))
    return fused_path, counts


#: Exact rewrites of the graph into forms onnxruntime's optimizer runs in int8 or in fewer ops,
#: by the engine-info key that counts them.
PRE_SESSION = {
    "matmul_bias_fused": fuse_matmul_bias,
    "hardsigmoid_as_add": hardsigmoid_as_add,
    "gelu_gate_as_erf": gelu_gate_as_erf,
    "channel_shuffle_as_gather": channel_shuffle_as_gather,
}


ADAPTER = OnnxruntimeAdapter()
