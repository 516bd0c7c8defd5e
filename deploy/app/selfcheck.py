"""Installation self-check: the core's integer math against onnxruntime's QuantizeLinear.

Useful on a new machine or a new onnxruntime release: any drift in rounding or saturation
between our fake quantization and the runtime would silently cost accuracy after deployment.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

from qat_deploy.deploy.quant import QuantSpec, dequantize, quantize


def onnxruntime_qdq(
    x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """Run QuantizeLinear then DequantizeLinear in onnxruntime with optimizations off."""
    zp_type = TensorProto.INT8 if zero_point.dtype == np.int8 else TensorProto.UINT8
    attrs = {"axis": axis} if axis is not None else {}
    graph = helper.make_graph(
        [
            helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], **attrs),
            helper.make_node("DequantizeLinear", ["q", "s", "z"], ["dq"], **attrs),
        ],
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
        [
            helper.make_tensor_value_info("q", zp_type, x.shape),
            helper.make_tensor_value_info("dq", TensorProto.FLOAT, x.shape),
        ],
        initializer=[numpy_helper.from_array(scale, "s"), numpy_helper.from_array(zero_point, "z")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    q, dq = sess.run(None, {"x": x})
    return q, dq


@dataclass(frozen=True)
class SelfCheckResult:
    case: str
    values: int
    code_mismatches: int
    float_bit_mismatches: int

    @property
    def ok(self) -> bool:
        return self.code_mismatches == 0 and self.float_bit_mismatches == 0


def run_selfcheck(seed: int = 0, size: int = 100_000) -> list[SelfCheckResult]:
    """Compare quantize/dequantize with onnxruntime on random data with ties and saturation."""
    rng = np.random.default_rng(seed)
    results = []
    for signed in (True, False):
        for axis in (None, 0):
            spec = QuantSpec(bits=8, signed=signed, symmetric=False, axis=axis)
            channels = 8
            n = channels if axis is not None else 1
            scale = rng.uniform(1e-3, 0.2, size=n).astype(np.float32)
            zp = rng.integers(spec.qmin, spec.qmax + 1, size=n).astype(
                np.int8 if signed else np.uint8
            )
            x = (rng.normal(size=(channels, size // channels)) * 30).astype(np.float32)
            s_b = scale.reshape(-1, 1) if axis is not None else scale[0]
            ties = (np.round(x / s_b) + 0.5) * s_b  # halfway cases
            x = np.where(rng.random(x.shape) < 0.2, ties, x).astype(np.float32)
            if axis is None:
                scale, zp = scale.reshape(()), zp.reshape(())
            ref_q, ref_dq = onnxruntime_qdq(x, scale, zp, axis)
            st, zt = torch.from_numpy(scale), torch.from_numpy(zp.astype(np.int32))
            q = quantize(torch.from_numpy(x), st, zt, spec)
            dq = dequantize(q, st, zt, spec).numpy()
            results.append(
                SelfCheckResult(
                    case=f"{'int8' if signed else 'uint8'} "
                    f"{'per-channel' if axis is not None else 'per-tensor'}",
                    values=x.size,
                    code_mismatches=int((q.numpy().astype(ref_q.dtype) != ref_q).sum()),
                    float_bit_mismatches=int((dq.view(np.int32) != ref_dq.view(np.int32)).sum()),
                )
            )
    return results
