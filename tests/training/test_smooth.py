"""SmoothQuant (deploy.training.smooth): the float function stays the same, an outlier channel of
a Linear input stops costing accuracy, and the OpenVINO build carries it at full int8."""

from __future__ import annotations

import dataclasses

import onnx
import torch

from qat_deploy.deploy import recipe
from qat_deploy.deploy.app.pipeline import BuildOptions, build
from qat_deploy.deploy.frontend.prepare import prepare
from qat_deploy.deploy.frontend.quant_modules import QuantLinear
from qat_deploy.deploy.training.calibrate import calibrate
from qat_deploy.deploy.training.choice import CLEAR_GAIN
from qat_deploy.deploy.training.smooth import (
    SmoothScale,
    choose_alpha,
    linear_only_quantizers,
    smooth_linear_inputs,
)
from qat_deploy.deploy.verify.closeness import sqnr_db
from qat_deploy.models.bert_tiny import BertConfig, bert_tiny
from tests.report_schema import read_report


def outlier_bert():
    """bert_tiny whose LayerNorms write channel 3 fifty times larger, as trained BERTs'
    outlier dimensions do; the inputs that reach Linear layers then carry it. A factory
    `deploy build --model tests.training.test_smooth:outlier_bert` takes."""
    torch.manual_seed(0)
    model = bert_tiny()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight[3] *= 50.0
    config = BertConfig()
    shape = [1, config.seq_len]
    return model.eval(), {"input_ids": {"shape": shape, "dtype": "int64", "range": [0, 100]}}


def _bert_with_outlier_channel():
    model, inputs = outlier_bert()
    shape = (4, *inputs["input_ids"]["shape"][1:])
    ids = torch.randint(0, 100, shape, generator=torch.Generator().manual_seed(1))
    return model, ids


def _prepared(model, ids, smooth: bool):
    # 8-bit weights on every machine: on x86 without VNNI prepare() would take 7 (reduce_range),
    # and a 7-bit weight has less room for the scale smoothing moves into it
    prepared = prepare(model, "openvino", ids[:1], reduce_range=False)
    if not smooth:
        prepared.rules = dataclasses.replace(prepared.rules, smooth_quant_alphas=())
    calibrate(prepared, [ids], progress=False)
    if smooth:
        smooth_linear_inputs(prepared, [ids], 0.95)
        calibrate(prepared, [ids], progress=False)
    return prepared


def _logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return (out if torch.is_tensor(out) else out[0]).double()


def test_smoothing_leaves_the_float_function_unchanged():
    model, ids = _bert_with_outlier_channel()
    prepared = _prepared(model, ids, smooth=True)
    for q in prepared.quantizers():
        q.enable_fake_quant(False)
    torch.testing.assert_close(_logits(prepared, ids), _logits(model, ids), rtol=1e-4, atol=1e-5)
    assert any(isinstance(q.smooth, SmoothScale) for q in prepared.quantizers())


def test_only_quantizers_read_by_linear_layers_alone_are_smoothed():
    model, ids = _bert_with_outlier_channel()
    prepared = prepare(model, "openvino", ids[:1])
    found = linear_only_quantizers(prepared.model)
    assert found and all(isinstance(m, QuantLinear) for ms in found.values() for m in ms)
    graph = prepared.model.graph
    matmul_inputs = {  # attention's activation x activation MatMuls: their quantizers stay
        arg.target
        for node in graph.nodes
        if node.op == "call_function" and "matmul" in str(node.target)
        for arg in node.args
        if isinstance(arg, torch.fx.Node) and arg.op == "call_module"
    }
    assert matmul_inputs and not matmul_inputs & set(found)


def test_an_outlier_channel_costs_less_accuracy_when_smoothed():
    model, ids = _bert_with_outlier_channel()
    reference = _logits(model, ids)
    plain = sqnr_db(reference.numpy(), _logits(_prepared(model, ids, smooth=False), ids).numpy())
    smoothed = sqnr_db(reference.numpy(), _logits(_prepared(model, ids, smooth=True), ids).numpy())
    assert smoothed > plain + 3.0, (plain, smoothed)


def test_openvino_build_of_a_transformer_is_smoothed_and_stays_int8(tmp_path):
    """The Mul before each smoothed quantizer is in the QDQ file; OpenVINO still runs every
    compute layer int8 and matches the smoothed fake-quant model (the build's own check)."""
    options = BuildOptions(
        target="openvino",
        model="tests.training.test_smooth:outlier_bert",
        out_dir=tmp_path,
        eval_samples=32,
        min_time_s=0.2,
        debug_layers=True,
    )
    report = build(options)
    assert read_report(tmp_path)["smooth_quant"] == report["smooth_quant"]
    smoothing = report["smooth_quant"]
    assert smoothing["quantizers"] > 0 and smoothing["alpha"] is not None
    assert smoothing["cosine"][str(smoothing["alpha"])] > smoothing["cosine"]["none"]
    assert report["status"] == "ok"
    assert report["kernels"]["float"] == 0
    qdq = onnx.load(str(tmp_path / recipe.QDQ_NAME))
    producers = {o: n for n in qdq.graph.node for o in n.output}
    quantized_muls = [
        n
        for n in qdq.graph.node
        if n.op_type == "QuantizeLinear"
        and producers.get(n.input[0]) is not None
        and producers[n.input[0]].op_type == "Mul"
    ]
    assert len(quantized_muls) >= report["smooth_quant"]["quantizers"]
    # --debug-layers names a smoothed quantizer after the layer before its Mul
    layers = [row["layer"] for row in report["layers"]["quantizers"]]
    assert sum(name.endswith(" (smoothed)") for name in layers) == len(quantized_muls)
    assert not any(name.endswith(".smooth") for name in layers)


def test_cnns_are_not_smoothed_even_where_transformers_are():
    """SmoothQuant is a transformer-mode rule: a CNN's Linear classifier keeps its inputs."""
    plan = recipe.Recipe(target="openvino", model="mnist_cnn", calib_batches=1)
    prepared = recipe.quantize(recipe.load(plan, evaluation=False), plan)
    assert prepared.plan.mode == "cnn" and prepared.plan.smooth_quant is None
    assert all(q.smooth is None for q in prepared.quantizers())


def test_smoothing_is_chosen_only_where_it_clearly_helps():
    """The outlier model takes a strength whose output error on the held-out half of the
    calibration batches is well below no smoothing's; the trials leave the model as it was."""
    model, ids = _bert_with_outlier_channel()
    batches = [ids[:2], ids[2:]]
    prepared = prepare(model, "openvino", ids[:1])
    calibrate(prepared, batches, progress=False)
    alpha, scores = choose_alpha(prepared, model, batches, (0.5, 0.8, 0.95))
    assert alpha is not None and set(scores) == {"none", "0.5", "0.8", "0.95"}
    assert 1 - scores[str(alpha)] <= CLEAR_GAIN * (1 - scores["none"])
    # the prepared model itself is untouched by the trials
    assert all(q.smooth is None for q in prepared.quantizers())
