"""Compare a QDQ ONNX model with its fake-quant PyTorch source tensor by tensor, in units of
each quantizer's step. ONNX DequantizeLinear outputs and torch quantizer calls are paired by
their exact float32 scale, in execution order where several share one scale, and must agree
in shape. Copies of a quantizer that export passes hoist above a MaxPool or reshape are not
paired: they are exact by construction, and the original after the op is. Where a pass
dropped that original as a requantizer (drop_requantize_after_pass_through), the copy above
a reshape is paired instead, reshaped."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper

from qat_deploy.deploy.quant.fake_quant import FakeQuantize


def activation_dq_outputs(model: onnx.ModelProto) -> dict[float, list[str]]:
    """scale -> output names of activation DequantizeLinear nodes (fed by a QuantizeLinear),
    in graph (topological) order."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    q_outputs = {n.output[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    found: dict[float, list[str]] = {}
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in q_outputs:
            scale = inits.get(n.input[1])
            if scale is not None and scale.size == 1:
                found.setdefault(float(scale.reshape(())), []).append(n.output[0])
    return found


def run_reference_semantics(path, inputs: dict[str, np.ndarray], extra: list[str]):
    """onnxruntime with graph optimizations off: the plain ONNX Q/DQ semantics."""
    model = onnx.load(path)
    for name in extra:
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, 1, None))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, inputs)


def compare_per_quantizer(prepared, path, x: torch.Tensor):
    """Returns (onnx output, torch output, [fraction within one step per paired quantized
    tensor, in graph order])."""
    model = onnx.load(path)
    dq_by_scale = activation_dq_outputs(model)
    captured: dict[float, list[torch.Tensor]] = {}
    hooks = []
    for fq in prepared.modules():
        if isinstance(fq, FakeQuantize) and not fq.spec.per_channel:
            scale = float(fq.effective_qparams()[0].to(torch.float32))
            hooks.append(
                fq.register_forward_hook(
                    lambda m, i, o, s=scale: captured.setdefault(s, []).append(o)
                )
            )
    with torch.no_grad():
        expected = prepared(x).numpy()
    for h in hooks:
        h.remove()
    order = {n.output[0]: i for i, n in enumerate(model.graph.node)}
    pairs = sorted(
        (
            (order[name], scale, name, captured[scale][i])
            for scale, names in dq_by_scale.items()
            if 0 < len(captured.get(scale, [])) <= len(names)
            # extra DQs are copies an export pass placed above a MaxPool or reshape: the
            # torch quantizer's own one comes last
            for i, name in enumerate(names[len(names) - len(captured[scale]) :])
        ),
        key=lambda pair: pair[0],
    )
    names = [name for _, _, name, _ in pairs]
    outputs = run_reference_semantics(path, {model.graph.input[0].name: x.numpy()}, names)
    within = []
    for (_, scale, name, ref), got in zip(pairs, outputs[1:], strict=True):
        if got.shape != tuple(ref.shape) and got.size == ref.numel():
            got = got.reshape(ref.shape)  # the copy above a squeeze whose original was dropped
        assert got.shape == tuple(ref.shape), (name, got.shape, ref.shape)
        steps = np.abs(got - ref.numpy()) / scale
        within.append(float((steps <= 1.0 + 1e-4).mean()))
    return outputs[0], expected, within
