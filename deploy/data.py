"""Calibration and evaluation data: built-in sets and validated user files.

Built-in sets are offline: "digits" is scikit-learn's bundled 8x8 digits (real images, used for
mnist_cnn) and "synthetic" is seeded random data for models without a bundled data set. User
data comes from an .npz/.npy file or a folder of images/.npy files and is validated up front,
because NaN, Inf, all-zero or mis-shaped calibration data silently produces useless scales.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from deploy.errors import BadInputError, one_line

if TYPE_CHECKING:
    from models.registry import ModelSpec

SPLITS = ("calib", "eval")
INPUT_KEYS = ("x", "inputs")
LABEL_KEYS = ("y", "labels")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0  # fixed so calibration (train) never overlaps evaluation (test)


@dataclass(frozen=True, eq=False)
class Dataset:
    """Model inputs (batch first), optional int64 labels, and where they came from."""

    inputs: np.ndarray
    labels: np.ndarray | None
    source: str

    def __len__(self) -> int:
        return len(self.inputs)


class DigitsSplit(NamedTuple):
    """Normalized N x 1 x H x W float32 images and int64 labels; mean/std are the train stats."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    mean: float
    std: float


@lru_cache(maxsize=1)
def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # slow import; only digits users pay for it

    bunch = load_digits()
    images = (bunch.images / 16.0).astype(np.float32)[:, None]  # pixel values are 0..16
    return images, bunch.target.astype(np.int64)


def digits_split(upsample_to: int = 16, seed: int = DIGITS_SPLIT_SEED) -> DigitsSplit:
    """Stratified 80/20 split of the 1,797 digits, bilinearly resized to upsample_to pixels.

    Normalization uses train statistics only, so the test split stays truly held out.
    """
    from sklearn.model_selection import train_test_split

    if isinstance(upsample_to, bool) or not isinstance(upsample_to, int) or upsample_to < 1:
        raise BadInputError(f"bad digits size {upsample_to!r}; expected a positive integer")
    images, labels = _raw_digits()
    if upsample_to != images.shape[-1]:
        resized = F.interpolate(
            torch.from_numpy(images),
            size=(upsample_to, upsample_to),
            mode="bilinear",
            align_corners=False,
        )
        images = resized.numpy()
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=DIGITS_TEST_FRACTION, stratify=labels, random_state=seed
    )
    mean, std = float(images[train_idx].mean()), float(images[train_idx].std())

    def norm(x: np.ndarray) -> np.ndarray:
        return ((x - mean) / std).astype(np.float32)

    return DigitsSplit(
        norm(images[train_idx]),
        labels[train_idx],
        norm(images[test_idx]),
        labels[test_idx],
        mean,
        std,
    )


def default_dataset(spec: ModelSpec, n: int, seed: int = 0, split: str = "calib") -> Dataset:
    """Up to n samples of the model's default data set.

    split="calib" draws from the training side, split="eval" from held-out data (the digits
    test split; a separate random stream for synthetic data). Digits returns fewer than n
    samples when the split is smaller; the source string says how many.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise BadInputError(f"bad sample count {n!r}; expected a positive integer")
    if split not in SPLITS:
        raise BadInputError(f"bad split '{split}'; expected one of {', '.join(SPLITS)}")
    builder = _BUILTIN.get(spec.default_data)
    if builder is None:
        raise BadInputError(
            f"model '{spec.name}' names unknown data set '{spec.default_data}'; "
            f"known: {', '.join(sorted(_BUILTIN))}"
        )
    return builder(spec, n, seed, split)


def _digits_dataset(spec: ModelSpec, n: int, seed: int, split: str) -> Dataset:
    shape = spec.input_shape
    if len(shape) != 4 or shape[1] != 1 or shape[2] != shape[3]:
        raise BadInputError(
            f"digits data needs a N x 1 x S x S model input; "
            f"model '{spec.name}' takes {_fmt(shape)}"
        )
    data = digits_split(upsample_to=shape[-1])
    x, y = (data.x_train, data.y_train) if split == "calib" else (data.x_test, data.y_test)
    pick = np.random.default_rng(seed).permutation(len(x))[:n]
    part = "train split" if split == "calib" else "held-out test split"
    return Dataset(
        x[pick],
        y[pick],
        f"digits (scikit-learn, real; {part}, {len(pick)} of "
        f"{len(x)} rows, {shape[-1]}x{shape[-1]}, seed {seed})",
    )


def _synthetic_dataset(spec: ModelSpec, n: int, seed: int, split: str) -> Dataset:
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    shape = (n, *spec.input_shape[1:])
    if spec.input_dtype == "int64":
        if spec.vocab_size is None:
            raise BadInputError(f"model '{spec.name}' takes int64 token ids but has no vocab_size")
        inputs = rng.integers(0, spec.vocab_size, size=shape, dtype=np.int64)
        kind = f"random token ids in [0, {spec.vocab_size})"
    else:
        inputs = rng.standard_normal(shape, dtype=np.float32)
        kind = "random normal"
    return Dataset(inputs, None, f"synthetic ({kind}, seed {seed}, {split})")


_BUILTIN: dict[str, Callable[[ModelSpec, int, int, str], Dataset]] = {
    "digits": _digits_dataset,
    "synthetic": _synthetic_dataset,
}


def load_calibration_data(
    path: str | Path, input_shape: tuple[int, ...], input_dtype: str = "float32"
) -> Dataset:
    """Read and validate user data for a model taking input_shape (batch dim free).

    Accepts an .npz (array "x"/"inputs", else the first non-label array; labels from
    "y"/"labels"), an .npy, or a folder of .npy files (one sample or a batch each) and
    PNG/JPEG images. Images are resized to the model's H x W, converted to 1 or 3 channels
    and scaled to [0, 1] with no mean/std normalization: save preprocessed arrays when the
    model expects normalized inputs.
    """
    if input_dtype not in ("float32", "int64"):
        raise BadInputError(f"bad input dtype '{input_dtype}'; expected float32 or int64")
    path = Path(path)
    if not path.exists():
        raise BadInputError(f"calibration data not found: {path}")
    if path.is_dir():
        inputs, labels = _read_folder(path, input_shape), None
    elif path.suffix.lower() in (".npz", ".npy"):
        inputs, labels = _read_numpy(path)
    else:
        raise BadInputError(
            f"unsupported calibration data {path}: expected .npz, .npy or a "
            "folder of .npy/.png/.jpg files"
        )
    return _validated(inputs, labels, tuple(input_shape), input_dtype, path)


def _read_numpy(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            return loaded, None
        with loaded:
            return _pick_arrays(loaded, path)
    except BadInputError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise BadInputError(
            f"cannot read calibration data {path}: corrupt or not a NumPy file ({one_line(exc)})"
        ) from exc


def _pick_arrays(npz: np.lib.npyio.NpzFile, path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    keys = list(npz.files)
    input_key = next((k for k in INPUT_KEYS if k in keys), None) or next(
        (k for k in keys if k not in LABEL_KEYS), None
    )
    if input_key is None:
        raise BadInputError(
            f"calibration data {path} is empty: no input array "
            f"(expected key {' or '.join(INPUT_KEYS)})"
        )
    label_key = next((k for k in LABEL_KEYS if k in keys), None)
    arrays = [npz[k] for k in (input_key, label_key) if k is not None]
    if not all(isinstance(a, np.ndarray) for a in arrays):  # NpzFile returns non-.npy as bytes
        raise BadInputError(
            f"cannot read calibration data {path}: corrupt or not a NumPy file "
            "(a member is not an .npy array)"
        )
    return arrays[0], arrays[1] if label_key is not None else None


def _read_folder(folder: Path, input_shape: tuple[int, ...]) -> np.ndarray:
    files = sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in (".npy", *IMAGE_SUFFIXES)
    )
    if not files:
        raise BadInputError(f"calibration folder {folder} is empty: no .npy, .png or .jpg files")
    sample_shape = tuple(input_shape[1:])
    batches = []
    for file in files:
        if file.suffix.lower() == ".npy":
            arr, _ = _read_numpy(file)
            arr = arr[None] if arr.shape == sample_shape else arr
            if arr.shape[1:] != sample_shape:
                raise BadInputError(
                    f"calibration data {file}: shape {_fmt(arr.shape)} does not "
                    f"match model input {_fmt(input_shape)} (batch dim free)"
                )
        else:
            arr = _read_image(file, input_shape)[None]
        batches.append(arr)
    return np.concatenate(batches)


def _read_image(file: Path, input_shape: tuple[int, ...]) -> np.ndarray:
    if len(input_shape) != 4 or input_shape[1] not in (1, 3):
        raise BadInputError(
            f"image {file} cannot feed model input {_fmt(input_shape)}: images "
            "need N x 1 x H x W or N x 3 x H x W; save .npy files instead"
        )
    try:
        from PIL import Image
    except ImportError as exc:
        raise BadInputError(
            f"reading image {file} needs Pillow (pip install pillow); "
            "or save the inputs as .npy files"
        ) from exc
    try:
        with Image.open(file) as img:
            img = img.convert("L" if input_shape[1] == 1 else "RGB")
            img = img.resize((input_shape[3], input_shape[2]), Image.Resampling.BILINEAR)
            pixels = np.asarray(img, dtype=np.float32) / 255.0
    except OSError as exc:  # PIL's UnidentifiedImageError is an OSError
        raise BadInputError(
            f"cannot read image {file}: corrupt or unsupported ({one_line(exc)})"
        ) from exc
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def _validated(
    inputs: np.ndarray,
    labels: np.ndarray | None,
    input_shape: tuple[int, ...],
    input_dtype: str,
    path: Path,
) -> Dataset:
    where = f"calibration data {path}"
    if inputs.dtype.kind not in "biuf":
        raise BadInputError(f"{where}: non-numeric dtype {inputs.dtype}")
    if inputs.ndim == 0 or inputs.size == 0:
        raise BadInputError(f"{where} is empty: shape {_fmt(inputs.shape)}")
    if inputs.shape[1:] != input_shape[1:]:
        raise BadInputError(
            f"{where}: shape {_fmt(inputs.shape)} does not match model input "
            f"{_fmt(input_shape)} (batch dim free)"
        )
    if input_dtype == "float32":
        inputs = inputs.astype(np.float32)  # before the Inf check: float64 may overflow
    if inputs.dtype.kind == "f":
        nan, inf = int(np.isnan(inputs).sum()), int(np.isinf(inputs).sum())
        if nan:
            raise BadInputError(f"{where}: contains {nan} NaN values")
        if inf:
            raise BadInputError(f"{where}: contains {inf} Inf values")
    if not inputs.any():
        raise BadInputError(f"{where}: all values are zero")
    if input_dtype == "int64":
        if inputs.dtype.kind == "f" and not np.array_equal(inputs, np.round(inputs)):
            raise BadInputError(f"{where}: model takes int64 token ids but data has fractions")
        if inputs.min() < 0:
            raise BadInputError(f"{where}: negative token ids")
        inputs = inputs.astype(np.int64)
    return Dataset(inputs, _validated_labels(labels, len(inputs), where), str(path))


def _validated_labels(labels: np.ndarray | None, n: int, where: str) -> np.ndarray | None:
    if labels is None:
        return None
    if labels.dtype.kind not in "biu" or labels.shape != (n,):
        raise BadInputError(
            f"{where}: labels must be {n} integers, got {labels.dtype} shape {_fmt(labels.shape)}"
        )
    return labels.astype(np.int64)


def _fmt(shape: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in shape) or "scalar"
