"""The vendor benchmark's per-sample feeds (one image input, or token models' inputs by name)
and which variants it times on each runtime."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

from benchmarks.vs_vendor import (
    MIN_COSINE,
    Variant,
    died_of,
    measure,
    nncf_recipes,
    same_files,
    samples,
    timed_on,
    tuning_note,
)


def test_one_input_is_fed_as_input_one_sample_at_a_time():
    x = np.arange(3 * 2 * 4, dtype=np.float32).reshape(3, 2, 4)
    feeds = samples(x)
    assert [list(f) for f in feeds] == [["input"]] * 3
    for i, feed in enumerate(feeds):
        np.testing.assert_array_equal(feed["input"], x[i : i + 1])


def test_token_inputs_are_fed_by_name_with_their_rows_kept_together():
    ids = np.arange(4 * 5).reshape(4, 5)
    mask = (np.arange(4 * 5).reshape(4, 5) % 3 > 0).astype(np.int64)
    feeds = samples({"input_ids": ids, "attention_mask": mask})
    assert len(feeds) == 4
    for i, feed in enumerate(feeds):
        assert feed["input_ids"].shape == (1, 5)
        np.testing.assert_array_equal(feed["input_ids"][0], ids[i])
        np.testing.assert_array_equal(feed["attention_mask"][0], mask[i])


def test_own_rules_only_drops_ours_built_for_the_other_runtime_and_keeps_the_rest():
    onnx = Path("m.onnx")
    fp32 = Variant("fp32", onnx, "fp32")
    ours = {t: Variant(f"ours ({t} rules)", onnx, "int8", ours_for=t) for t in ("ort", "ov")}
    vendor = Variant("nncf", onnx, "int8", vendor=True)
    every = [fp32, ours["ort"], ours["ov"], vendor]
    assert timed_on("ort", every, own_rules_only=True) == [fp32, ours["ort"], vendor]
    assert timed_on("ov", every, own_rules_only=True) == [fp32, ours["ov"], vendor]
    assert timed_on("ov", every, own_rules_only=False) == every


def _matmul_model(path: Path, softmax: bool) -> Path:
    from onnx import TensorProto, helper, numpy_helper, save

    weight = numpy_helper.from_array(np.random.default_rng(0).normal(size=(8, 8)).astype("f4"), "w")
    last = helper.make_node("Softmax" if softmax else "Relu", ["mm"], ["output"])
    nodes = [helper.make_node("MatMul", ["input", "w"], ["mm"]), last]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 8])],
        [weight],
    )
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_nncf_gets_its_transformer_recipe_as_a_second_try_only_on_image_models_with_attention(
    tmp_path: Path,
):
    with_softmax = _matmul_model(tmp_path / "attn.onnx", softmax=True)
    plain = _matmul_model(tmp_path / "plain.onnx", softmax=False)
    assert nncf_recipes(with_softmax, transformer=False) == (False, True)
    assert nncf_recipes(plain, transformer=False) == (False,)
    assert nncf_recipes(with_softmax, transformer=True) == (True,)


def _read_address_zero() -> None:
    ctypes.string_at(0)  # a real segmentation fault, as a crashing runtime plugin gives


def _raise() -> None:
    raise RuntimeError("an exception, not a crash")


def test_a_crash_in_the_child_is_named_and_the_parent_lives_on():
    assert died_of(_read_address_zero) == "SIGSEGV"
    assert died_of(_raise) is None  # the parent reports exceptions itself, building in-process
    assert died_of(print, "fine") is None


def test_the_tuned_row_names_the_layers_the_search_took_float():
    t = {"float_layers": ["layer1.0.conv1", "fc"], "regions": 54, "seconds": 31.6}
    note = tuning_note({**t, "retimed": 0, "contended": 0})
    assert "2/54 layers float" in note and "layer1.0.conv1" in note and "fc" in note
    assert "contended" not in note
    quiet = tuning_note({**t, "float_layers": [], "retimed": 2, "contended": 1})
    assert "0/54 layers float," in quiet and "2 timings retaken, 1 still contended" in quiet


def test_the_tuned_row_says_what_gain_was_asked_and_what_the_final_timing_reverted():
    """A row with no float layers tells a noisy search (a high bar) from a reverted one."""
    t = {"float_layers": [], "regions": 52, "seconds": 210.0, "retimed": 0, "contended": 0}
    noisy = tuning_note({**t, "threshold": 0.2666, "reverted": None})
    assert "a change had to gain 26.7%" in noisy and "reverted" not in noisy
    back = {"float_layers": ["a", "b", "c"], "time_ratio": 1.0512, "contended": True}
    reverted = tuning_note({**t, "threshold": 0.05, "reverted": back})
    assert "reverted 3 float layers (time ratio 1.051, contended)" in reverted


def _rescaled_activation(path: Path, out: Path, factor: float) -> Path:
    """A copy of a QDQ file with the middle activation quantizer's scale multiplied by
    `factor` (its Q and every DQ share the scale initializer): a file its fake-quant model
    no longer describes."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    consts = {t.name: t for t in model.graph.initializer}
    activation_qs = [
        n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in consts
    ]
    scale = consts[activation_qs[len(activation_qs) // 2].input[1]]
    scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * factor, scale.name))
    onnx.save(model, str(out))
    return out


def test_an_engine_that_departs_from_its_fake_quant_model_fails_the_build_check_and_is_broken(
    tmp_path,
):
    """Our rows are held to `deploy build`'s own engine check: an engine computing something
    its fake-quant model does not (here a file whose middle activation quantizer clips at a
    quarter of its range) is reported BROKEN with the check's reason and cannot count, while
    the same model as exported passes. A cosine-to-fp32 bound alone lets the copy through.
    A byte-for-byte copy of ours is paired with it (same_file_ratio)."""
    from dataclasses import replace

    from benchmarks.vs_vendor import HELD_OUT, our_variant
    from qat_deploy.deploy import recipe
    from qat_deploy.deploy.data import default_dataset
    from qat_deploy.deploy.engines.timing import TimingConfig
    from qat_deploy.models import load_model

    model, spec = load_model("digits_resnet")
    loaded = recipe.Loaded(model, spec, default_dataset(spec, 16, split="calib"), None)
    evaluation = default_dataset(spec, HELD_OUT, split="eval")
    fp32 = Variant("fp32", recipe.export_onnx(loaded, None, tmp_path, ["fp32"])["fp32"], "fp32")
    ours = our_variant(loaded, "onnxruntime", tmp_path, evaluation.arrays(spec.inputs))
    clipped = _rescaled_activation(ours.onnx, tmp_path / "clipped.onnx", 0.25)
    copy = replace(ours, name="ours clipped", onnx=clipped)
    cfg = TimingConfig(warmup=1, block=2, min_runs=2, min_time_s=0.0, rewarm=1)

    again = tmp_path / "again.onnx"
    again.write_bytes(ours.onnx.read_bytes())
    twice = replace(ours, name="ours again", onnx=again)
    variants = [fp32, ours, copy, twice]

    rows, notes = measure("onnxruntime", variants, evaluation.inputs, 1, cfg)

    by_name = {r.variant: r for r in rows}
    assert by_name[ours.name].build_check == ""
    assert "BROKEN" not in by_name[ours.name].note
    failed = by_name["ours clipped"]
    assert "fails deploy build's engine check" in failed.build_check
    assert "int8_vs_fakequant" in failed.build_check
    assert "BROKEN (engine check)" in failed.note
    assert failed.cosine >= MIN_COSINE  # the bound against fp32 alone would have passed it
    assert any("ours clipped" in n and "engine check" in n for n in notes)
    # the byte-for-byte copy is timed against the original: the run's A/A ratio
    assert by_name["ours again"].same_file_ratio > 0
    assert [r.variant for r in rows if r.same_file_ratio is not None] == ["ours again"]


def test_a_variant_with_the_same_file_as_an_earlier_one_is_paired_with_it(tmp_path):
    """ours tuned where the search kept every layer int8 is ours again, byte for byte: the
    two are named as one file, so their paired ratio can stand as the run's A/A noise."""
    first, same, other = tmp_path / "a.onnx", tmp_path / "b.onnx", tmp_path / "c.onnx"
    first.write_bytes(b"graph one")
    same.write_bytes(b"graph one")
    other.write_bytes(b"graph two")
    variants = [
        Variant("ours", first, "int8", ours_for="ort"),
        Variant("ours tuned", same, "int8", ours_for="ort"),
        Variant("vendor", other, "int8", vendor=True),
    ]
    assert same_files(variants) == {"ours tuned": "ours"}
