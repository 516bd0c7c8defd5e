"""One way for tests to run a model on onnxruntime's CPU EP at a chosen optimization level:
ORT_DISABLE_ALL is the literal Q/DQ semantics, ORT_ENABLE_ALL the fused int8 engine."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


def ort_outputs(
    model: str | os.PathLike | onnx.ModelProto,
    inputs: np.ndarray,
    level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
) -> np.ndarray:
    """First output for each sample of `inputs` (batch first), run one sample at a time."""
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[None]})[0] for x in inputs])


def engine_cosine(adapter, engine, x: np.ndarray, expected: np.ndarray) -> float:
    """Cosine similarity between `expected` and what the built engine computes for `x`, run
    through the adapter's own runner (the session options and rewrites of the build)."""
    name = onnx.load(str(engine.onnx_path), load_external_data=False).graph.input[0].name
    with adapter.runner(engine) as runner:
        got = next(iter(runner.infer({name: x}).values()))
    return float((got * expected).sum() / np.linalg.norm(got) / np.linalg.norm(expected))


def x_to_y_model(nodes: list[onnx.NodeProto], inits: dict[str, np.ndarray], width: int):
    """An opset-17 model of `nodes` from float input "x" [1, width] to float output "y", with
    `inits` as its initializers: the small Q/DQ patterns the rewrite tests build."""
    graph = helper.make_graph(
        nodes,
        "pattern",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, width])],
        [numpy_helper.from_array(np.array(v), k) for k, v in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
