"""A QDQ file tied to its fake-quant model (deploy.verify.provenance): the exported file holds
every grid and weight the model computes, and a file changed after export is named."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from qat_deploy.deploy import recipe
from qat_deploy.deploy.export.qdq import export
from qat_deploy.deploy.frontend.prepare import prepare
from qat_deploy.deploy.verify import provenance


@pytest.fixture(scope="module", params=[("mnist_cnn", "tensorrt"), ("bert_tiny", "openvino")])
def exported(request, tmp_path_factory):
    """A Conv+BN model (BN folded into the quantized weights) and a transformer with an int8
    embedding table, each with its exported QDQ file."""
    model, target = request.param
    plan = recipe.Recipe(target=target, model=model, eval_samples=2)
    loaded = recipe.load(plan)
    prepared = recipe.quantize(loaded, plan)
    paths = recipe.export_onnx(loaded, prepared, tmp_path_factory.mktemp(model))
    return prepared, onnx.load(str(paths["int8"]))


def _replaced(model: onnx.ModelProto, name: str, codes: np.ndarray) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    (init,) = [t for t in out.graph.initializer if t.name == name]
    init.CopyFrom(numpy_helper.from_array(codes, name))
    return out


def _largest_weight(model: onnx.ModelProto) -> tuple[str, np.ndarray]:
    name = max(provenance.file_weights(model), key=lambda w: w.values.size).name
    (init,) = [t for t in model.graph.initializer if t.name == name]
    return name, numpy_helper.to_array(init)


def test_the_exported_file_holds_every_weight_and_grid_of_its_model(exported):
    prepared, model = exported
    sites = [s for s in prepared.plan.sites if s.role == "weight"]
    assert len(provenance.file_weights(model)) == len(sites) > 0
    assert provenance.foreign_weights(model, prepared) == ()
    assert provenance.foreign_grids(model, prepared) == ()


def test_dequantized_file_weights_are_onnxruntimes_dequantize_linear(exported):
    """The independent reference: onnxruntime's DequantizeLinear on the same codes and
    per-channel parameters."""
    _, model = exported
    dequantizers = {n.input[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
    inits = {t.name: t for t in model.graph.initializer}
    for weight in provenance.file_weights(model):
        node = dequantizers[weight.name]
        graph = helper.make_graph(
            [helper.make_node("DequantizeLinear", list(node.input), ["y"], name="dq")],
            "dq",
            [],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
            [inits[i] for i in node.input if i],
        )
        graph.node[0].attribute.extend(node.attribute)
        single = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
        session = ort.InferenceSession(
            single.SerializeToString(), providers=["CPUExecutionProvider"]
        )
        np.testing.assert_array_equal(weight.values, session.run(None, {})[0])


def test_one_output_channel_of_changed_weights_is_named(exported):
    prepared, model = exported
    name, codes = _largest_weight(model)
    changed = codes.copy()
    changed[0] = np.clip(changed[0].astype(np.int32) + 2, -128, 127).astype(codes.dtype)
    assert provenance.foreign_weights(_replaced(model, name, changed), prepared) == (name,)


def test_a_tie_rounded_the_other_way_is_allowed_but_many_one_step_changes_are_not(exported):
    prepared, model = exported
    name, codes = _largest_weight(model)
    flat = codes.reshape(-1).astype(np.int32)
    inner = np.flatnonzero(np.abs(flat) < 120)  # a step up stays inside the range
    one = flat.copy()
    one[inner[0]] += 1
    assert (
        provenance.foreign_weights(
            _replaced(model, name, one.astype(codes.dtype).reshape(codes.shape)), prepared
        )
        == ()
    )
    count = 2 * max(1, int(provenance.WEIGHT_TIE_SHARE * codes.size)) + 1  # over the share
    many = flat.copy()
    many[inner[:: max(1, len(inner) // count)][:count]] += 1
    assert np.count_nonzero(many != flat) == count
    spoilt = many.astype(codes.dtype).reshape(codes.shape)
    assert provenance.foreign_weights(_replaced(model, name, spoilt), prepared) == (name,)


@pytest.mark.parametrize("exported", [("bert_tiny", "openvino")], indirect=True)
def test_two_layers_of_one_shape_reading_each_others_weights_are_named(exported):
    """Each weight is held to the layer its reader belongs to: q_proj reading k_proj's int8
    weight (and k_proj q_proj's) holds only weights of the model, yet computes another
    function."""
    prepared, model = exported
    by_shape: dict[tuple[int, ...], list[str]] = {}
    for weight in provenance.file_weights(model):
        by_shape.setdefault(weight.values.shape, []).append(weight.name)
    first, second = next(names for names in by_shape.values() if len(names) > 1)[:2]
    swapped = onnx.ModelProto()
    swapped.CopyFrom(model)
    outputs = {
        n.input[0]: n.output[0] for n in swapped.graph.node if n.op_type == "DequantizeLinear"
    }
    exchange = {outputs[first]: outputs[second], outputs[second]: outputs[first]}
    for node in swapped.graph.node:
        if node.op_type != "DequantizeLinear":
            node.input[:] = [exchange.get(name, name) for name in node.input]
    assert provenance.foreign_weights(model, prepared) == ()
    assert sorted(provenance.foreign_weights(swapped, prepared)) == sorted([first, second])


def test_an_activation_quantized_on_a_grid_the_model_lacks_is_named(exported):
    prepared, model = exported
    changed = onnx.ModelProto()
    changed.CopyFrom(model)
    inits = {t.name: t for t in changed.graph.initializer}
    (q,) = [
        n for n in changed.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits
    ][:1]
    scale = numpy_helper.to_array(inits[q.input[1]])
    inits[q.input[1]].CopyFrom(numpy_helper.from_array(scale * np.float32(4), q.input[1]))
    assert q.input[0] in provenance.foreign_grids(changed, prepared)


class LayerScale(torch.nn.Module):
    """ConvNeXt's layer scale: a constant an activation quantizer reads on onnxruntime, whose
    QuantizeLinear the export folds into integers like a weight's."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.gamma = torch.nn.Parameter(torch.linspace(-1.0, 1.0, 8))

    def forward(self, x):
        return self.conv(x) * self.gamma.reshape(1, -1, 1, 1)


def test_a_constant_an_activation_quantizer_reads_is_held_to_the_models_grids(tmp_path):
    x = torch.randn(4, 8, 8, 8)
    prepared = prepare(LayerScale().eval(), "onnxruntime", x)
    with torch.no_grad():
        prepared(x)
    model = onnx.load(str(export(prepared, tmp_path / "m.onnx", x[:1])))
    weights = provenance.file_weights(model)
    constants = [w for w in weights if w.values.shape == (1, 8, 1, 1) or w.values.shape == (8,)]
    assert constants and len(weights) == 2
    assert provenance.foreign_weights(model, prepared) == ()
    (gamma,) = constants
    spoilt = _replaced(
        model,
        gamma.name,
        np.zeros_like(
            numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == gamma.name))
        ),
    )
    inits = {t.name: t for t in spoilt.graph.initializer}
    dq = next(
        n for n in spoilt.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == gamma.name
    )
    scale = numpy_helper.to_array(inits[dq.input[1]])
    inits[dq.input[1]].CopyFrom(numpy_helper.from_array(scale * np.float32(3), dq.input[1]))
    assert provenance.foreign_weights(spoilt, prepared) == (gamma.name,)
