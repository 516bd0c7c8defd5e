"""Per-layer debugging (deploy.verify.layer_debug, `deploy build --debug-layers`): the float twin
computes what the float model computes, the entering error is onnxruntime's own
QuantizeLinear/DequantizeLinear error, a quantizer spoiled on purpose ranks first, and the
engine's marked codes are the codes the unmarked engine computes."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from qat_deploy.backends.onnxruntime.adapter import OnnxruntimeAdapter
from qat_deploy.deploy import recipe
from qat_deploy.deploy.app.output_dir import owned
from qat_deploy.deploy.app.pipeline import BuildOptions, build
from qat_deploy.deploy.common import errors
from qat_deploy.deploy.engines.adapter import get_adapter
from qat_deploy.deploy.verify import layer_debug
from qat_deploy.deploy.verify.closeness import mean_cosine, sqnr_db
from tests.app.test_pipeline import FAST, _outlier_data
from tests.report_schema import read_report

SAMPLES = 8


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """mnist_cnn for onnxruntime: its QDQ file, float weights, fp32 file and feeds."""
    out = tmp_path_factory.mktemp("mnist")
    plan = recipe.Recipe(target="onnxruntime", model="mnist_cnn", eval_samples=SAMPLES)
    loaded = recipe.load(plan)
    prepared = recipe.quantize(loaded, plan)
    weights: dict[str, np.ndarray] = {}
    paths = recipe.export_onnx(loaded, prepared, out, float_weights=weights)
    x = next(iter(loaded.evaluation.arrays(loaded.spec.inputs).values()))
    feeds = [{"input": x[i : i + 1]} for i in range(SAMPLES)]
    return paths, weights, feeds


def _ort(model: onnx.ModelProto | str, feed: dict) -> list[np.ndarray]:
    source = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(None, feed)


def test_the_float_twin_computes_the_float_model(exported):
    paths, weights, feeds = exported
    twin = layer_debug.float_twin(onnx.load(str(paths["int8"])), weights)
    ops = {n.op_type for n in twin.graph.node}
    assert not ops & {"QuantizeLinear"}  # only the exact int32 bias DQs may stay
    for feed in feeds[:3]:
        (float_out,) = _ort(str(paths["fp32"]), feed)
        (twin_out,) = _ort(twin, feed)
        # summation order differs by CPU (2e-4 on outputs of ~1-10 on an AVX2-only EPYC); a
        # weight left quantized would be off by about a weight step, 1e-2
        np.testing.assert_allclose(twin_out, float_out, rtol=1e-3, atol=1e-3)


def test_entering_error_is_onnxruntimes_quantize_dequantize_error(exported):
    """The input quantizer sees the raw input, so its entering error can be rebuilt with
    onnxruntime's QuantizeLinear -> DequantizeLinear on the same scale and zero point."""
    paths, weights, feeds = exported
    result = layer_debug.analyse(
        paths["int8"], weights, feeds, get_adapter("onnxruntime"), 0, threads=1
    )
    row = next(r for r in result.rows if r.tensor == "input")
    assert result.flagged() == []  # a clean model: nothing far below the rest
    model = onnx.load(str(paths["int8"]))
    q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "input")
    inits = {t.name: t for t in model.graph.initializer}
    graph = helper.make_graph(
        [
            helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
            helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]),
        ],
        "qdq",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [
            numpy_helper.from_array(numpy_helper.to_array(inits[q.input[1]]), "s"),
            numpy_helper.from_array(numpy_helper.to_array(inits[q.input[2]]), "z"),
        ],
    )
    qdq = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    x = np.concatenate([f["input"] for f in feeds])
    (y,) = _ort(qdq, {"x": x})
    signal, noise = np.sum(x.astype(np.float64) ** 2), np.sum((x - y).astype(np.float64) ** 2)
    assert row.entering_db == pytest.approx(10 * np.log10(signal / noise), abs=1e-9)


@pytest.mark.parametrize("target", ["onnxruntime", "openvino"])
def test_a_quantizer_spoiled_on_purpose_ranks_first_and_the_engine_follows_it(
    exported, target, tmp_path
):
    """One activation quantizer's scale times 10: most error enters there and only there is
    flagged; the engine (built from the same file) still computes its codes."""
    paths, weights, feeds = exported
    model = onnx.load(str(paths["int8"]))
    acts = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    spoiled = acts[len(acts) // 2]
    inits = {t.name: t for t in model.graph.initializer}
    scale = numpy_helper.to_array(inits[spoiled.input[1]]) * np.float32(10)
    model.graph.initializer.append(numpy_helper.from_array(scale, "spoiled_scale"))
    for node in model.graph.node:  # the Q and the DQ(s) reading its codes
        if node is spoiled or (
            node.op_type == "DequantizeLinear" and node.input[0] in spoiled.output
        ):
            node.input[1] = "spoiled_scale"
    path = tmp_path / "spoiled.qdq.onnx"
    onnx.save(model, str(path))
    adapter = get_adapter(target)
    plain = adapter.build(path, tmp_path / "plain", precision="int8", threads=1)
    int8_layers = len(adapter.kernel_report(plain).int8_compute)
    result = layer_debug.analyse(path, weights, feeds, adapter, int8_layers, threads=1)

    first = result.ranked()[0]
    assert first.tensor == spoiled.input[0]
    assert [row.tensor for row in result.flagged()] == [spoiled.input[0]]
    rows = [r for r in result.rows if r.kind == "activation"]
    at = next(i for i, r in enumerate(rows) if r.tensor == spoiled.input[0])
    assert rows[at].arrived_db < rows[at - 1].arrived_db - 10  # the drop is there, not before
    # marking the codes as outputs left every int8 kernel in place
    assert result.engine.values["int8_compute_layers_marked"] == int8_layers > 0
    for row in rows:  # the engine computes the QDQ model's codes (rounding apart)
        assert row.engine_mismatch is not None and row.engine_mismatch < 0.01, row
    assert result.faithfulness().faithful  # a bad scale in the model is not the engine's fault
    assert not any(p.name.startswith(".layer_debug") for p in tmp_path.iterdir())


class _OneLayerComputedWrong(OnnxruntimeAdapter):
    """The real onnxruntime engine of a graph whose one QuantizeLinear quantizes with 10x its
    scale while its readers dequantize with the right one: an engine that computes that layer
    (and only that layer) differently from the model it was given."""

    def __init__(self, codes: str):
        self.codes = codes

    def build(self, onnx_path, out_dir, **kwargs):
        model = onnx.load(str(onnx_path))
        q = next(n for n in model.graph.node if n.output[0] == self.codes)
        inits = {t.name: t for t in model.graph.initializer}
        scale = numpy_helper.to_array(inits[q.input[1]]) * np.float32(10)
        model.graph.initializer.append(numpy_helper.from_array(scale, "wrong_scale"))
        q.input[1] = "wrong_scale"
        wrong = out_dir / "wrong.onnx"
        onnx.save(model, str(wrong))
        return super().build(wrong, out_dir, **kwargs)


def test_the_entering_engine_columns_find_the_one_layer_an_engine_computes_wrong(exported):
    """Arrived, the error spreads to every quantizer downstream; entering (each quantizer
    recomputed from the engine's own upstream codes) it is at the wrong layer alone."""
    paths, weights, feeds = exported
    model = onnx.load(str(paths["int8"]))
    acts = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    wrong = acts[len(acts) // 2]
    result = layer_debug.analyse(
        paths["int8"], weights, feeds, _OneLayerComputedWrong(wrong.output[0]), 0, threads=1
    )
    rows = [r for r in result.rows if r.kind == "activation"]
    at = next(i for i, r in enumerate(rows) if r.tensor == wrong.input[0])
    assert (
        rows[at].engine_entering_max_steps >= 5 and rows[at].engine_entering_mismatch > 0.2
    )  # ReLU zeros stay zero
    downstream = rows[at + 1 :]
    assert max(r.engine_max_steps for r in downstream) >= 2  # propagated...
    for row in rows[:at] + downstream:  # ...but not entering: ONNX arithmetic, rounding apart
        assert row.engine_entering_max_steps <= 1 and row.engine_entering_mismatch < 0.01, row
    verdict = result.faithfulness()
    assert not verdict.faithful and verdict.worst_layer == rows[at].layer
    assert verdict.quantizers == len(rows)


def test_weights_have_an_entering_error_against_their_float_values(exported):
    paths, weights, feeds = exported
    model = onnx.load(str(paths["int8"]))
    found = layer_debug.quantizers(model, weights)
    weight_rows = [p for p in found if p.kind == "weight"]
    assert len(weight_rows) == len(weights) > 0
    result = layer_debug.analyse(paths["int8"], weights, feeds, get_adapter("onnxruntime"), 0, 1)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for p in weight_rows:
        row = next(r for r in result.rows if r.tensor == p.tensor)
        shape = [-1] + [1] * (inits[p.tensor].ndim - 1)
        # the file's own int8 codes, dequantized as DequantizeLinear does (float32)
        codes = inits[p.tensor].astype(np.float32) - p.zero_point.astype(np.float32).reshape(shape)
        dequantized = codes * p.scale.astype(np.float32).reshape(shape)
        assert row.entering_db == pytest.approx(sqnr_db(weights[p.tensor], dequantized), abs=1e-9)
        assert row.arrived_db is None and row.engine_max_steps is None


def test_debug_layers_in_a_failing_build_names_the_layer_the_outliers_spoil(tmp_path):
    """The outlier test's min-max build fails its accuracy check; with --debug-layers the
    report still carries the per-layer table (schema-valid), its first row is the input
    quantizer that the spikes stretch, and layers.png is an artifact with its hash."""
    data = _outlier_data(tmp_path / "spiky.npz")
    options = BuildOptions(
        target="onnxruntime",
        model="tests.app.test_pipeline:outlier_sensitive_model",
        data=data,
        out_dir=tmp_path / "out",
        debug_layers=True,
        **FAST,
    )
    with pytest.raises(errors.CheckFailedError) as failure:
        build(options)
    assert "--debug-layers" not in str(failure.value)  # already on: no hint to turn it on
    report = read_report(tmp_path / "out")
    layers = report["layers"]
    first = next(r for r in layers["quantizers"] if r["tensor"] == layers["ranked"][0])
    assert first["kind"] == "activation" and first["consumers"] == ["1"]  # Sequential's Linear
    assert report["stages"]["layers"] == "done"
    png = tmp_path / "out" / "layers.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["artifacts"]["layers_png"]["path"] == str(png)


def test_without_a_gpu_tensorrt_reports_the_engine_columns_as_not_measured(tmp_path):
    pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT-RTX not installed")
    report = build(
        BuildOptions(
            target="tensorrt", model="mnist_cnn", out_dir=tmp_path, debug_layers=True, **FAST
        )
    )
    layers = read_report(tmp_path)["layers"]
    assert report["status"] == "ok"
    assert layers["engine"]["measured"] is False and "GPU" in layers["engine"]["reason"]
    acts = [r for r in layers["quantizers"] if r["kind"] == "activation"]
    assert acts and all(r["engine_max_steps"] is None for r in acts)
    assert all(r["arrived_db"] is not None for r in acts)


def test_a_dead_runs_scratch_folder_is_removed_by_the_next_build(tmp_path):
    dead = tmp_path / ".layer_debug.999999999.0123abcd.tmp"
    dead.mkdir()
    (dead / "model.qdq.marked.onnx").write_bytes(b"partial")
    with owned(tmp_path):
        assert not dead.exists()


def test_the_float_twin_matches_on_a_transformer_too(tmp_path):
    """Linear layers on 3-D inputs (MatMul + bias) and attention: the twin's output is the
    float model's."""
    plan = recipe.Recipe(target="openvino", model="bert_tiny", eval_samples=2)
    loaded = recipe.load(plan)
    prepared = recipe.quantize(loaded, plan)
    weights: dict[str, np.ndarray] = {}
    paths = recipe.export_onnx(loaded, prepared, tmp_path, float_weights=weights)
    twin = layer_debug.float_twin(onnx.load(str(paths["int8"])), weights)
    session = ort.InferenceSession(str(paths["fp32"]), providers=["CPUExecutionProvider"])
    arrays = loaded.evaluation.arrays(loaded.spec.inputs)
    names = [i.name for i in session.get_inputs()]
    feed = {n: a[:1] for n, a in zip(names, arrays.values(), strict=False)}
    (float_out,) = session.run(None, feed)[:1]
    twin_out = _ort(twin, feed)[0]
    assert mean_cosine(twin_out.reshape(1, -1), float_out.reshape(1, -1)) > 0.99999


def test_the_summary_names_the_worst_layers_and_says_when_marking_changed_fusions():
    from rich.console import Console

    from qat_deploy.deploy.app.cli.build import summary_table

    def row(tensor, layer, kind, db):
        return {"tensor": tensor, "layer": layer, "kind": kind, "entering_db": db}

    layers = {
        "engine": {"measured": True, "int8_compute_layers_marked": 32, "int8_compute_layers": 24},
        "ranked": ["b", "a"],
        "flagged": ["b"],
        "quantizers": [
            row("a", "enc.0.fc", "weight", 30.0),
            row("b", "gelu_2", "activation", 12.5),
        ],
    }
    report = {"model": {"name": "m"}, "target": "openvino", "status": "ok", "layers": layers}
    console = Console(record=True, width=200)
    console.print(summary_table(report))
    text = console.export_text()
    assert "gelu_2 output 12.5 dB, enc.0.fc weight 30.0 dB" in text
    assert "marking changed fusions: 32 int8 layers marked, 24 unmarked" in text
    assert "1 quantizer(s) 12+ dB below the median" in text
    layers["engine"]["int8_compute_layers_marked"] = 24
    console = Console(record=True, width=200)
    console.print(summary_table(report))
    assert "marking changed" not in console.export_text()
