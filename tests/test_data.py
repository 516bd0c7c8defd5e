"""Data sets: the digits split, built-in defaults, and validation of user calibration files."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest

from qat_deploy.deploy.common.errors import BAD_INPUT, BadInputError
from qat_deploy.deploy.data import Dataset, default_dataset, digits_split, load_calibration_data
from qat_deploy.models import get_model_spec

MNIST_SHAPE = (1, 1, 16, 16)


def rows(x: np.ndarray) -> set[bytes]:
    return {r.tobytes() for r in x.reshape(len(x), -1)}


def test_digits_split_sizes_classes_and_disjointness():
    split = digits_split()
    assert len(split.x_train) + len(split.x_test) == 1797
    assert len(split.x_test) == 360  # 20 %, rounded up by scikit-learn
    assert split.x_train.shape[1:] == (1, 16, 16) and split.x_train.dtype == np.float32
    assert split.y_train.dtype == np.int64 and len(split.y_train) == len(split.x_train)
    assert set(split.y_train) == set(split.y_test) == set(range(10))
    assert not rows(split.x_train) & rows(split.x_test)
    assert abs(split.x_train.mean()) < 1e-4 and abs(split.x_train.std() - 1) < 1e-4


def test_digits_split_is_deterministic():
    a, b = digits_split(), digits_split()
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


def test_digits_native_size_skips_resampling():
    split = digits_split(upsample_to=8)
    assert split.x_test.shape[1:] == (1, 8, 8)
    # Unresampled pixels take only the 17 raw levels 0..16.
    assert len(np.unique(split.x_train)) == 17


def test_mnist_default_data_is_real_digits_with_held_out_eval():
    spec = get_model_spec("mnist_cnn")
    calib = default_dataset(spec, 64, split="calib")
    held_out = default_dataset(spec, 10_000, split="eval")
    split = digits_split()
    assert calib.inputs.shape == (64, 1, 16, 16) and calib.labels.shape == (64,)
    assert rows(calib.inputs) <= rows(split.x_train)
    assert rows(held_out.inputs) == rows(split.x_test)  # capped at the test split's 360 rows
    assert "digits (scikit-learn, real" in calib.source and "360 of 360" in held_out.source
    assert not rows(calib.inputs) & rows(held_out.inputs)


def test_synthetic_defaults():
    image = default_dataset(get_model_spec("mnist_cnn", input_shape=MNIST_SHAPE), 3)
    assert "digits" in image.source  # mnist keeps its real data even with an explicit shape
    resnet = default_dataset(get_model_spec("resnet18"), 2, seed=0)
    assert resnet.inputs.shape == (2, 3, 224, 224) and resnet.inputs.dtype == np.float32
    assert resnet.labels is None and resnet.source == "synthetic (random normal, seed 0, calib)"
    bert = default_dataset(get_model_spec("bert_tiny"), 4, seed=3)
    assert bert.inputs.shape == (4, 128) and bert.inputs.dtype == np.int64
    assert bert.inputs.min() >= 0 and bert.inputs.max() < 1000
    assert "random token ids in [0, 1000)" in bert.source
    again = default_dataset(get_model_spec("bert_tiny"), 4, seed=3)
    held_out = default_dataset(get_model_spec("bert_tiny"), 4, seed=3, split="eval")
    np.testing.assert_array_equal(bert.inputs, again.inputs)
    assert not np.array_equal(bert.inputs, held_out.inputs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n": 0}, "bad sample count"),
        ({"n": 4, "split": "test"}, "bad split 'test'"),
    ],
)
def test_default_dataset_argument_errors(kwargs, message):
    with pytest.raises(BadInputError, match=message):
        default_dataset(get_model_spec("resnet18"), **kwargs)


def test_npz_with_named_arrays_and_labels(tmp_path):
    x = np.random.default_rng(0).standard_normal((5, 1, 16, 16)).astype(np.float64)
    path = tmp_path / "calib.npz"
    np.savez(path, labels=np.arange(5), inputs=x)
    data = load_calibration_data(path, MNIST_SHAPE)
    assert isinstance(data, Dataset) and len(data) == 5 and data.source == str(path)
    assert data.inputs.dtype == np.float32 and data.labels.dtype == np.int64
    np.testing.assert_allclose(data.inputs, x, rtol=1e-6)


def test_npz_first_array_and_npy_file(tmp_path):
    x = np.ones((3, 1, 16, 16), np.float32)
    np.savez(tmp_path / "a.npz", x)
    np.save(tmp_path / "a.npy", x)
    for name in ("a.npz", "a.npy"):
        data = load_calibration_data(tmp_path / name, MNIST_SHAPE)
        assert data.inputs.shape == (3, 1, 16, 16) and data.labels is None


def test_token_ids_are_cast_to_int64(tmp_path):
    np.savez(tmp_path / "t.npz", x=np.full((2, 128), 7.0))
    data = load_calibration_data(tmp_path / "t.npz", (1, 128), input_dtype="int64")
    assert data.inputs.dtype == np.int64 and (data.inputs == 7).all()


def test_folder_of_npy_samples_and_batches(tmp_path):
    np.save(tmp_path / "0.npy", np.ones((1, 16, 16), np.float32))  # one sample
    np.save(tmp_path / "1.npy", np.ones((2, 1, 16, 16), np.float32))  # a batch
    (tmp_path / "notes.txt").write_text("ignored")
    assert load_calibration_data(tmp_path, MNIST_SHAPE).inputs.shape == (3, 1, 16, 16)


def test_folder_of_images(tmp_path):
    image = pytest.importorskip("PIL.Image")
    pixels = np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8)
    image.fromarray(pixels).save(tmp_path / "a.png")
    image.fromarray(pixels).save(tmp_path / "b.jpg")
    data = load_calibration_data(tmp_path, (1, 3, 24, 32))
    assert data.inputs.shape == (2, 3, 24, 32)
    assert 0 <= data.inputs.min() and data.inputs.max() <= 1
    gray = load_calibration_data(tmp_path, MNIST_SHAPE)
    assert gray.inputs.shape == (2, 1, 16, 16)


def _npz(x, **extra):
    def write(path):
        np.savez(path, x=x, **extra)

    return write


def _truncated_npz(path):
    np.savez(path, x=np.ones((4, 1, 16, 16)))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _not_numpy(path):
    path.write_bytes(b"this is not a numpy file at all")


def _bad_member(path):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("x.npy", b"garbage")


GOOD = np.ones((4, 1, 16, 16), np.float32)
NAN = GOOD.copy()
NAN[0, 0, 0, 0] = np.nan
INF = GOOD.copy()
INF[1, 0, 3, 3] = -np.inf


@pytest.mark.parametrize(
    ("filename", "write", "message"),
    [
        ("nan.npz", _npz(NAN), "contains 1 NaN values"),
        ("inf.npz", _npz(INF), "contains 1 Inf values"),
        ("empty.npz", _npz(np.zeros((0, 1, 16, 16), np.float32)), "is empty"),
        ("no_inputs.npz", lambda p: np.savez(p, y=np.arange(3)), "is empty: no input array"),
        ("zero.npz", _npz(np.zeros_like(GOOD)), "all values are zero"),
        ("shape.npz", _npz(np.ones((4, 1, 8, 8))), "shape 4x1x8x8 does not match model input"),
        ("rank.npz", _npz(np.ones((16, 16))), "does not match model input 1x1x16x16"),
        ("text.npz", _npz(np.array(["a", "b"])), "non-numeric dtype"),
        ("labels.npz", _npz(GOOD, y=np.arange(3)), "labels must be 4 integers"),
        ("truncated.npz", _truncated_npz, "corrupt or not a NumPy file"),
        ("garbage.npz", _not_numpy, "corrupt or not a NumPy file"),
        ("member.npz", _bad_member, "corrupt or not a NumPy file"),
        ("data.csv", lambda p: p.write_text("1,2\n"), "unsupported calibration data"),
        ("missing.npz", None, "calibration data not found"),
    ],
)
def test_calibration_data_errors_name_problem_and_path(tmp_path, filename, write, message):
    path = tmp_path / filename
    if write is not None:
        write(path)
    with pytest.raises(BadInputError) as info:
        load_calibration_data(path, MNIST_SHAPE)
    text = str(info.value)
    assert message in text and str(path) in text and "\n" not in text
    assert info.value.exit_code == BAD_INPUT


@pytest.mark.parametrize(
    ("setup", "shape", "message"),
    [
        (lambda d: None, MNIST_SHAPE, "is empty: no .npy, .png or .jpg files"),
        (lambda d: np.save(d / "a.npy", np.ones((2, 8, 8))), MNIST_SHAPE, "a.npy: shape 2x8x8"),
        (lambda d: (d / "a.png").write_bytes(b"not a png"), MNIST_SHAPE, "cannot read image"),
        (lambda d: (d / "a.png").write_bytes(b"x"), (1, 128), "images need N x 1 x H x W"),
    ],
)
def test_folder_errors(tmp_path, setup, shape, message):
    setup(tmp_path)
    with pytest.raises(BadInputError, match=message):
        load_calibration_data(tmp_path, shape)


def test_token_ids_must_be_whole_and_non_negative(tmp_path):
    np.savez(tmp_path / "frac.npz", x=np.full((2, 128), 0.5))
    np.savez(tmp_path / "neg.npz", x=np.full((2, 128), -1))
    with pytest.raises(BadInputError, match="has fractions"):
        load_calibration_data(tmp_path / "frac.npz", (1, 128), input_dtype="int64")
    with pytest.raises(BadInputError, match="negative token ids"):
        load_calibration_data(tmp_path / "neg.npz", (1, 128), input_dtype="int64")


def test_token_ids_are_checked_against_the_vocab_but_may_be_zero(tmp_path):
    from qat_deploy.models import load_model

    (ids,) = load_model("bert_tiny")[1].inputs  # vocab 1000 (models/bert_tiny.py)
    np.savez(tmp_path / "big.npz", x=np.full((2, 128), 1000))
    np.savez(tmp_path / "pad.npz", x=np.zeros((2, 128), np.int32))
    with pytest.raises(BadInputError, match=r"value 1000 is outside the range \[0, 1000\)"):
        load_calibration_data(tmp_path / "big.npz", inputs=(ids,))
    padding = load_calibration_data(tmp_path / "pad.npz", inputs=(ids,))
    assert padding.inputs.dtype == np.int64 and not padding.inputs.any()
