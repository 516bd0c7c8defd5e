"""Named input specs: --input-shape NAME:SHAPE:DTYPE, --input-spec files, forward() checks,
per-input .npz data and synthetic token ids + padding masks. No export or engine needed."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from qat_deploy.deploy.app.cli import main
from qat_deploy.deploy.app.cli.build import parse_inputs
from qat_deploy.deploy.common import errors
from qat_deploy.deploy.data import default_dataset, load_calibration_data
from qat_deploy.models import load_model
from qat_deploy.models.inputs import InputSpec

MODEL = "tests.app.test_multi_input:bare_two_input_model"
IDS = InputSpec("input_ids", (2, 12), "int64", (0, 50))
MASK = InputSpec("attention_mask", (2, 12), "int64")


def run(args: list[str], capsys, monkeypatch) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["deploy", *args])
    with pytest.raises(SystemExit) as exc:
        main()
    return exc.value.code, capsys.readouterr().err


def test_named_input_shapes_parse_to_specs():
    shape, inputs = parse_inputs(["input_ids:1x128:int64", "attention_mask:1x128"], None)
    assert shape is None
    assert inputs == (
        InputSpec("input_ids", (1, 128), "int64"),
        InputSpec("attention_mask", (1, 128), "float32"),
    )
    assert parse_inputs(["1x3x8x8"], None) == ((1, 3, 8, 8), None)
    assert parse_inputs(None, None) == (None, None)


def test_spec_file_with_range_and_vocab_size(tmp_path):
    path = tmp_path / "spec.json"
    path.write_text(
        json.dumps(
            {
                "input_ids": {"shape": [1, 8], "dtype": "int64", "range": [0, 30522]},
                "token_type_ids": {"shape": [1, 8], "dtype": "int32", "vocab_size": 2},
                "pixel_mask": [1, 8],
            }
        )
    )
    _, inputs = parse_inputs(None, path)
    assert inputs == (
        InputSpec("input_ids", (1, 8), "int64", (0, 30522)),
        InputSpec("token_type_ids", (1, 8), "int32", (0, 2)),
        InputSpec("pixel_mask", (1, 8), "float32"),
    )


def test_specs_are_reordered_to_forward_order_and_ranged_by_the_embedding():
    reversed_specs = (
        InputSpec("attention_mask", (2, 12), "int64"),
        InputSpec("input_ids", (2, 12), "int64"),
    )
    _, spec = load_model(MODEL, inputs=reversed_specs)
    assert [i.name for i in spec.inputs] == ["input_ids", "attention_mask"]
    assert spec.inputs[0].range == (0, 50) and spec.by_keyword


def test_single_unnamed_input_is_named_after_the_first_parameter():
    _, spec = load_model("mnist_cnn")
    assert [i.name for i in spec.inputs] == ["x"] and not spec.by_keyword
    assert spec.input_shape == (1, 1, 16, 16) and spec.input_dtype == "float32"


def _is_spec(arg) -> bool:
    """Spec-file contents in a case: a dict (written as JSON) or text starting with { or @."""
    return isinstance(arg, dict) or arg.startswith(("{", "@"))


def _spec_file(tmp_path, content) -> str:
    path = tmp_path / "spec.json"
    path.write_text(content.removeprefix("@") if isinstance(content, str) else json.dumps(content))
    return str(path)


NAMED = ["--input-shape", "input_ids:2x12:int64", "--input-shape"]
BAD_SPECS = {
    "unknown dtype": (NAMED + ["attention_mask:2x12:int8"], "bad input dtype 'int8'"),
    "not a parameter": (NAMED + ["token_ids:2x12:int64"], "input 'token_ids' is not a parameter"),
    "missing input": (["--input-shape", "input_ids:2x12:int64"], "missing required input"),
    "bad dims": (NAMED + ["attention_mask:2xQ:int64"], "bad dims in --input-shape"),
    "zero dim": (NAMED + ["attention_mask:2x0:int64"], "bad dims"),
    "batch mismatch": (NAMED + ["attention_mask:3x12:int64"], "different batch sizes"),
    "no shape": (["--model", MODEL], "returned no input shape"),
    "two unnamed": (["--input-shape", "2x12", "--input-shape", "2x12"], "need names"),
    "both flags": (["--input-shape", "2x12", "--input-spec", "{}"], "not both"),
    "spec not found": (["--input-spec", "/nonexistent/spec.json"], "spec file not found"),
    "spec not json": (["--input-spec", "@not json"], "cannot read input spec file"),
    "spec unknown key": (
        ["--input-spec", {"input_ids": {"shape": [2, 12], "dtyp": "int64"}}],
        "unknown key 'dtyp'",
    ),
    "spec bad range": (
        ["--input-spec", {"input_ids": {"shape": [2, 12], "dtype": "int64", "range": [5, 1]}}],
        "bad range",
    ),
    "range on float": (
        ["--input-spec", {"input_ids": {"shape": [2, 12], "range": [0, 9]}}],
        "only int64/int32 inputs take a range",
    ),
}


@pytest.mark.parametrize("case", list(BAD_SPECS))
def test_bad_input_specs_are_one_line_errors(case, tmp_path, capsys, monkeypatch):
    args, message = BAD_SPECS[case]
    args = [_spec_file(tmp_path, a) if _is_spec(a) else a for a in args]
    if "--model" not in args:
        args = ["--model", MODEL, *args]
    out = tmp_path / "out"
    code, err = run(
        ["build", "--target", "onnxruntime", *args, "--out", str(out)], capsys, monkeypatch
    )
    assert code == errors.BAD_INPUT, err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (out / "model.qdq.onnx").exists()


def _ids_mask(n=6, seq=12):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 50, size=(n, seq))
    mask = np.ones((n, seq), np.int64)
    mask[:, seq // 2 :] = 0
    return ids, mask


def test_named_npz_is_read_per_input_with_labels(tmp_path):
    ids, mask = _ids_mask()
    np.savez(tmp_path / "d.npz", attention_mask=mask.astype(np.float64), input_ids=ids, y=[1] * 6)
    data = load_calibration_data(tmp_path / "d.npz", inputs=(IDS, MASK))
    assert list(data.inputs) == ["input_ids", "attention_mask"] and len(data) == 6
    assert data.inputs["attention_mask"].dtype == np.int64 and data.labels.tolist() == [1] * 6
    np.testing.assert_array_equal(data.inputs["input_ids"], ids)
    np.testing.assert_array_equal(data.inputs["attention_mask"], mask)
    zero_mask = dict(input_ids=ids, attention_mask=np.zeros_like(mask))  # zeros are fine in ints
    np.savez(tmp_path / "z.npz", **zero_mask)
    assert (
        not load_calibration_data(tmp_path / "z.npz", inputs=(IDS, MASK))
        .inputs["attention_mask"]
        .any()
    )


FLOAT = InputSpec("features", (2, 12), "float32")
IDS_MASK = dict(zip(("input_ids", "attention_mask"), _ids_mask(), strict=True))


@pytest.mark.parametrize(
    ("arrays", "specs", "message"),
    [
        ({"input_ids": IDS_MASK["input_ids"]}, (IDS, MASK), "no array for input 'attention_mask'"),
        ({"x": IDS_MASK["input_ids"]}, (IDS, MASK), "no array for input 'input_ids'"),
        ({**IDS_MASK, "input_ids": IDS_MASK["input_ids"][:5]}, (IDS, MASK), "sample counts"),
        ({**IDS_MASK, "input_ids": IDS_MASK["input_ids"] + 50}, (IDS, MASK), "range [0, 50)"),
        ({**IDS_MASK, "input_ids": IDS_MASK["input_ids"] - 1}, (IDS, MASK), "range [0, 50)"),
        ({**IDS_MASK, "input_ids": IDS_MASK["input_ids"] + 0.5}, (IDS, MASK), "has fractions"),
        ({**IDS_MASK, "attention_mask": np.ones((6, 8))}, (IDS, MASK), "shape 6x8"),
        ({**IDS_MASK, "attention_mask": np.array([["a"] * 12] * 6)}, (IDS, MASK), "non-numeric"),
        ({"input_ids": IDS_MASK["input_ids"], "features": np.zeros((6, 12))}, (IDS, FLOAT), "zero"),
        (
            {"input_ids": IDS_MASK["input_ids"], "features": np.full((6, 12), np.nan)},
            (IDS, FLOAT),
            "72 NaN values",
        ),
        ({**IDS_MASK, "y": np.arange(5)}, (IDS, MASK), "labels must be 6 integers"),
    ],
)
def test_named_npz_errors_name_the_input(tmp_path, arrays, specs, message):
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(errors.BadInputError) as info:
        load_calibration_data(tmp_path / "d.npz", inputs=specs)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_multi_input_data_must_be_an_npz(tmp_path):
    np.save(tmp_path / "a.npy", IDS_MASK["input_ids"])
    with pytest.raises(errors.BadInputError, match="takes 2 inputs"):
        load_calibration_data(tmp_path / "a.npy", inputs=(IDS, MASK))


def test_synthetic_token_ids_and_padding_masks():
    _, spec = load_model("tests.app.test_multi_input:two_input_model")
    data = default_dataset(spec, 200, seed=1)
    ids, mask = data.inputs["input_ids"], data.inputs["attention_mask"]
    assert ids.shape == mask.shape == (200, 12) and ids.dtype == mask.dtype == np.int64
    assert ids.min() >= 0 and ids.max() < 50 and len(np.unique(ids)) == 50
    assert set(np.unique(mask)) == {0, 1}
    lengths = mask.sum(1)
    # ones then zeros: each row equals the prefix mask of its own length
    np.testing.assert_array_equal(mask, np.arange(12)[None] < lengths[:, None])
    assert lengths.min() >= 1 and len(np.unique(lengths)) > 6  # lengths vary, none empty
    held_out = default_dataset(spec, 200, seed=1, split="eval")
    assert not np.array_equal(ids, held_out.inputs["input_ids"])
    again = default_dataset(spec, 200, seed=1)
    np.testing.assert_array_equal(mask, again.inputs["attention_mask"])


def test_synthetic_ids_without_a_range_are_refused():
    from qat_deploy.models.registry import ModelSpec

    spec = ModelSpec("m", object, inputs=(InputSpec("ids", (2, 12), "int64"), MASK))
    with pytest.raises(errors.BadInputError, match="input 'ids' takes int64 token ids"):
        default_dataset(spec, 2)
