"""Calibration and evaluation data: built-in sets and validated user files.

Built-in sets are offline: "digits" is scikit-learn's bundled 8x8 digits (real images, used for
mnist_cnn) and "synthetic" is seeded random data for models without a bundled data set. User
data comes from an .npz/.npy file or a folder of images/.npy files and is validated up front,
because NaN, Inf, all-zero or mis-shaped calibration data silently produces useless scales.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from qat_deploy.deploy.common.errors import BadInputError, CheckFailedError, one_line
from qat_deploy.models.inputs import DTYPES, INTEGER_DTYPES, InputSpec

if TYPE_CHECKING:
    from qat_deploy.models.registry import ModelSpec

SPLITS = ("calib", "eval")
INPUT_KEYS = ("x", "inputs")
LABEL_KEYS = ("y", "labels")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0  # fixed so calibration (train) never overlaps evaluation (test)


@dataclass(frozen=True, eq=False)
class Dataset:
    """Model inputs (batch first), optional int64 labels, and where they came from.

    inputs is one array for single-input models and a dict input name -> array (forward()
    order) for models with several inputs."""

    inputs: np.ndarray | dict[str, np.ndarray]
    labels: np.ndarray | None
    source: str

    def __len__(self) -> int:
        first = next(iter(self.inputs.values())) if isinstance(self.inputs, dict) else self.inputs
        return len(first)

    def arrays(self, specs: Sequence[InputSpec]) -> dict[str, np.ndarray]:
        """The inputs as name -> array, a single array named after the model's one input."""
        if isinstance(self.inputs, dict):
            return dict(self.inputs)
        return {specs[0].label: self.inputs}

    def rows(self, start: int, stop: int | None, source: str) -> Dataset:
        """Samples start:stop of every input and of the labels."""
        cut = slice(start, stop)
        inputs = (
            {k: v[cut] for k, v in self.inputs.items()}
            if isinstance(self.inputs, dict)
            else self.inputs[cut]
        )
        return Dataset(inputs, None if self.labels is None else self.labels[cut], source)


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
    arrays, kinds = {}, []
    for item in spec.inputs:
        arrays[item.label], kind = _synthetic_array(spec.name, item, n, rng)
        kinds.append(kind if len(spec.inputs) == 1 else f"{item.label}: {kind}")
    inputs = next(iter(arrays.values())) if len(spec.inputs) == 1 else arrays
    return Dataset(inputs, None, f"synthetic ({'; '.join(kinds)}, seed {seed}, {split})")


def _synthetic_array(
    model: str, item: InputSpec, n: int, rng: np.random.Generator
) -> tuple[np.ndarray, str]:
    """Realistic stand-ins: a mask keeps a random-length prefix of ones and pads with zeros,
    token ids are uniform in their range, floats are standard normal."""
    shape = (n, *item.shape[1:])
    if item.is_mask:
        length = shape[-1] if len(shape) > 1 else 1
        keep = rng.integers(1, length + 1, size=(n,) + (1,) * (len(shape) - 1))
        positions = np.arange(length) if len(shape) > 1 else np.zeros(1)
        mask = np.broadcast_to(positions < keep, shape)
        return mask.astype(_NUMPY[item.dtype]), "padding masks, ones then zeros"
    if item.dtype == "bool":
        return rng.integers(0, 2, size=shape).astype(bool), "random booleans"
    if item.dtype in INTEGER_DTYPES:
        if item.range is None:
            raise BadInputError(
                f"model '{model}' input '{item.label}' takes {item.dtype} token ids but has no "
                'vocab_size or value range; give "range" in --input-spec or pass --data'
            )
        low, high = item.range
        ids = rng.integers(low, high, size=shape, dtype=np.int64).astype(_NUMPY[item.dtype])
        return ids, f"random token ids in [{low}, {high})"
    return rng.standard_normal(shape, dtype=np.float32), "random normal"


_NUMPY = {"float32": np.float32, "int64": np.int64, "int32": np.int32, "bool": np.bool_}


_BUILTIN: dict[str, Callable[[ModelSpec, int, int, str], Dataset]] = {
    "digits": _digits_dataset,
    "synthetic": _synthetic_dataset,
}


def load_calibration_data(
    path: str | Path,
    input_shape: tuple[int, ...] | None = None,
    input_dtype: str = "float32",
    *,
    inputs: Sequence[InputSpec] | None = None,
) -> Dataset:
    """Read and validate user data for a model taking input_shape (batch dim free), or the
    named `inputs` (which win over input_shape/input_dtype).

    Accepts an .npz (array "x"/"inputs"/the input's name, else the first non-label array;
    labels from "y"/"labels"), an .npy, or a folder of .npy files (one sample or a batch each)
    and PNG/JPEG images. Images are resized to the model's H x W, converted to 1 or 3 channels
    and scaled to [0, 1] with no mean/std normalization: save preprocessed arrays when the
    model expects normalized inputs. A model with several inputs takes an .npz holding one
    array per input name.
    """
    if inputs is None:
        if input_dtype not in DTYPES:
            raise BadInputError(
                f"bad input dtype '{input_dtype}'; expected one of {', '.join(DTYPES)}"
            )
        inputs = (InputSpec(None, tuple(input_shape or ()), input_dtype),)
    path = Path(path)
    if not path.exists():
        raise BadInputError(f"calibration data not found: {path}")
    if len(inputs) > 1:
        return _validated_named(*_read_named(path, inputs), tuple(inputs), path)
    item = inputs[0]
    if path.is_dir():
        arrays, labels = _read_folder(path, item.shape), None
    elif path.suffix.lower() in (".npz", ".npy"):
        arrays, labels = _read_numpy(path, item.name)
    else:
        raise BadInputError(
            f"unsupported calibration data {path}: expected .npz, .npy or a "
            "folder of .npy/.png/.jpg files"
        )
    where = f"calibration data {path}"
    x = _validated_array(arrays, item, where)
    return Dataset(x, _validated_labels(labels, len(x), where), str(path))


def _read_named(
    path: Path, specs: Sequence[InputSpec]
) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    names = [s.label for s in specs]
    if path.is_dir() or path.suffix.lower() != ".npz":
        raise BadInputError(
            f"calibration data {path}: the model takes {len(names)} inputs "
            f"({', '.join(names)}); pass an .npz with one array per input name"
        )
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = list(npz.files)
            missing = [n for n in names if n not in keys]
            if missing:
                raise BadInputError(
                    f"calibration data {path} has no array for input '{missing[0]}' "
                    f"(has: {', '.join(keys) or 'nothing'}; the model takes {', '.join(names)})"
                )
            arrays = {n: npz[n] for n in names}
            label_key = next((k for k in LABEL_KEYS if k in keys), None)
            labels = npz[label_key] if label_key is not None else None
    except BadInputError:
        raise
    except (AttributeError, OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise BadInputError(
            f"cannot read calibration data {path}: corrupt or not an .npz archive ({one_line(exc)})"
        ) from exc
    members = [*arrays.values(), *([] if labels is None else [labels])]
    if not all(isinstance(a, np.ndarray) for a in members):
        raise BadInputError(
            f"cannot read calibration data {path}: corrupt or not a NumPy file "
            "(a member is not an .npy array)"
        )
    return arrays, labels


def _validated_named(
    arrays: dict[str, np.ndarray],
    labels: np.ndarray | None,
    specs: tuple[InputSpec, ...],
    path: Path,
) -> Dataset:
    checked = {
        s.label: _validated_array(arrays[s.label], s, f"calibration data {path}, input '{s.label}'")
        for s in specs
    }
    counts = {name: len(a) for name, a in checked.items()}
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{k} {v}" for k, v in counts.items())
        raise BadInputError(
            f"calibration data {path}: inputs have different sample counts ({listed})"
        )
    n = next(iter(counts.values()))
    return Dataset(checked, _validated_labels(labels, n, f"calibration data {path}"), str(path))


def _read_numpy(path: Path, name: str | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            return loaded, None
        with loaded:
            return _pick_arrays(loaded, path, name)
    except BadInputError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise BadInputError(
            f"cannot read calibration data {path}: corrupt or not a NumPy file ({one_line(exc)})"
        ) from exc


def _pick_arrays(
    npz: np.lib.npyio.NpzFile, path: Path, name: str | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    keys = list(npz.files)
    preferred = (name, *INPUT_KEYS) if name else INPUT_KEYS
    input_key = next((k for k in preferred if k in keys), None) or next(
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


def _validated_array(x: np.ndarray, item: InputSpec, where: str) -> np.ndarray:
    """One input's samples, cast to its dtype; float inputs must be finite and not all zero
    (useless scales), integer inputs whole and in range (zeros are fine: masks, padding)."""
    if x.dtype.kind not in "biuf":
        raise BadInputError(f"{where}: non-numeric dtype {x.dtype}")
    if x.ndim == 0 or x.size == 0:
        raise BadInputError(f"{where} is empty: shape {_fmt(x.shape)}")
    if x.shape[1:] != item.shape[1:]:
        raise BadInputError(
            f"{where}: shape {_fmt(x.shape)} does not match model input "
            f"{_fmt(item.shape)} (batch dim free)"
        )
    if item.dtype == "float32":
        x = x.astype(np.float32)  # before the Inf check: float64 may overflow
    if x.dtype.kind == "f":
        nan, inf = int(np.isnan(x).sum()), int(np.isinf(x).sum())
        if nan:
            raise BadInputError(f"{where}: contains {nan} NaN values")
        if inf:
            raise BadInputError(f"{where}: contains {inf} Inf values")
    if item.dtype == "float32":
        if not x.any():
            raise BadInputError(f"{where}: all values are zero")
        return x
    what = "values" if item.is_mask or item.dtype == "bool" else "token ids"
    if x.dtype.kind == "f" and not np.array_equal(x, np.round(x)):
        raise BadInputError(f"{where}: model takes {item.dtype} {what} but data has fractions")
    if item.dtype == "bool":
        if not np.isin(x, (0, 1)).all():
            raise BadInputError(f"{where}: bool input needs 0/1 values")
        return x.astype(bool)
    low, high = item.range or (0 if what == "token ids" else None, None)
    if low is not None and x.min() < low:
        raise BadInputError(
            f"{where}: negative token ids"
            if item.range is None
            else f"{where}: value {x.min()} is outside the range [{low}, {high})"
        )
    if high is not None and x.max() >= high:
        raise BadInputError(f"{where}: value {x.max()} is outside the range [{low}, {high})")
    info = np.iinfo(_NUMPY[item.dtype])
    if x.min() < info.min or x.max() > info.max:
        raise BadInputError(f"{where}: values do not fit {item.dtype}")
    return x.astype(_NUMPY[item.dtype])


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


def input_pairs(engine: list[str], arrays: Mapping[str, np.ndarray]) -> list[tuple[str, str]]:
    """(engine input, model input) pairs: matched by name, by position when the names differ
    (a single input exported as "input"), model inputs the engine dropped left out."""
    if set(engine) <= set(arrays):
        return [(name, name) for name in engine]
    if len(engine) == len(arrays):
        return list(zip(engine, arrays, strict=True))
    raise CheckFailedError(
        f"the engine takes inputs {', '.join(engine)}; the model's are {', '.join(arrays)}"
    )
