"""Bad input at the command line: one line on stderr naming the problem, a documented exit
code, no traceback, and nothing half-written."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from qat_deploy.deploy.app.cli import main
from qat_deploy.deploy.common import errors
from qat_deploy.deploy.recipe import DEFAULT_MODEL
from qat_deploy.models import get_model_spec


def run(args: list[str], capsys, monkeypatch) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["deploy", *args])
    with pytest.raises(SystemExit) as exc:
        main()
    return exc.value.code, capsys.readouterr().err


def _npz(tmp_path, name="data.npz", **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def good_digits(n=40):
    """Inputs shaped for the default model (what `deploy build` without --model builds)."""
    shape = get_model_spec(DEFAULT_MODEL).input_shape[1:]
    return np.random.default_rng(0).normal(size=(n, *shape)).astype(np.float32)


BAD_BUILDS = {
    "unknown target": (["--target", "tensorrtx"], "unknown target 'tensorrtx'"),
    "unknown model": (["--target", "onnxruntime", "--model", "resnt18"], "unknown model 'resnt18'"),
    "bad model ref": (["--target", "onnxruntime", "--model", "no.such.module:f"], "cannot import"),
    "bad shape text": (["--target", "onnxruntime", "--input-shape", "1xax3"], "bad --input-shape"),
    "shape misfit": (
        ["--target", "onnxruntime", "--input-shape", "1x3x8x8"],
        "takes 1x3x8x8",
    ),
    "named dtype": (
        ["--target", "onnxruntime", "--input-shape", "x:1x1x16x16:float16"],
        "bad input dtype 'float16'",
    ),
    "named not a parameter": (
        ["--target", "onnxruntime", "--input-shape", "img:1x1x16x16"],
        "input 'img' is not a parameter of",
    ),
    "missing data": (["--target", "openvino", "--data", "/nonexistent/x.npz"], "not found"),
    "zero batches": (["--target", "onnxruntime", "--calib-batches", "0"], "--calib-batches"),
    "zero threads": (["--target", "onnxruntime", "--threads", "0"], "--threads"),
    "unknown qat loss": (
        ["--target", "onnxruntime", "--qat-epochs", "1", "--qat-loss", "kl"],
        "unknown --qat-loss 'kl'",
    ),
    "unknown calibration": (
        ["--target", "onnxruntime", "--calibration", "kl"],
        "unknown calibration 'kl'",
    ),
    "cosine above 1": (["--target", "openvino", "--min-cosine", "1.5"], "--min-cosine 1.5"),
    "negative steps": (["--target", "openvino", "--max-err-steps", "-1"], "--max-err-steps -1"),
    "nan agreement": (["--target", "openvino", "--min-agreement", "nan"], "--min-agreement nan"),
    "keep-float typo": (
        ["--target", "onnxruntime", "--keep-float", "clasifier"],
        "--keep-float 'clasifier' matches no Conv/Linear layer",
    ),
    "debug layers without an engine": (
        ["--target", "onnxruntime", "--export-only", "--debug-layers"],
        "--debug-layers compares the engine's layers; drop --export-only",
    ),
    "option of another backend": (
        ["--target", "openvino", "--sm", "sm86"],
        "openvino has no build option sm",
    ),
}


@pytest.mark.parametrize("case", list(BAD_BUILDS))
def test_bad_build_arguments(case, tmp_path, capsys, monkeypatch):
    args, message = BAD_BUILDS[case]
    code, err = run(["build", *args, "--out", str(tmp_path / "out")], capsys, monkeypatch)
    assert code == errors.BAD_INPUT, err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


BAD_DATA = {
    "nan": (lambda x: np.where(np.arange(x.size).reshape(x.shape) == 5, np.nan, x), "NaN"),
    "inf": (lambda x: np.where(np.arange(x.size).reshape(x.shape) == 5, np.inf, x), "Inf"),
    "all zero": (lambda x: np.zeros_like(x), "zero"),
    "empty": (lambda x: x[:0], "empty"),
    "wrong shape": (lambda x: x[:, :, :8, :8], "shape"),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_calibration_data(case, tmp_path, capsys, monkeypatch):
    mutate, message = BAD_DATA[case]
    path = _npz(tmp_path, x=mutate(good_digits()))
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.qdq.onnx").write_bytes(b"a good model from an earlier run")
    code, err = run(
        ["build", "--target", "onnxruntime", "--data", str(path), "--out", str(out)],
        capsys,
        monkeypatch,
    )
    assert code == errors.BAD_INPUT, err
    assert message.lower() in err.lower() and "Traceback" not in err
    assert (out / "model.qdq.onnx").read_bytes() == b"a good model from an earlier run"
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_corrupt_npz(tmp_path, capsys, monkeypatch):
    path = tmp_path / "broken.npz"
    path.write_bytes(b"PK\x03\x04 definitely not a zip archive")
    code, err = run(["build", "--target", "onnxruntime", "--data", str(path)], capsys, monkeypatch)
    assert code == errors.BAD_INPUT and "corrupt" in err and "Traceback" not in err


def test_qat_without_labels(tmp_path, capsys, monkeypatch):
    path = _npz(tmp_path, x=good_digits())
    code, err = run(
        [
            "build",
            "--target",
            "onnxruntime",
            "--data",
            str(path),
            "--qat-epochs",
            "1",
            "--qat-loss",
            "cross_entropy",
            "--out",
            str(tmp_path / "o"),
        ],
        capsys,
        monkeypatch,
    )
    assert code == errors.BAD_INPUT and "labelled" in err


@pytest.mark.parametrize(
    ("content", "message"), [(None, "no such"), (b"\x00\x01garbage", "corrupt")]
)
def test_lint_missing_or_corrupt_onnx(content, message, tmp_path, capsys, monkeypatch):
    path = tmp_path / "m.onnx"
    if content is not None:
        path.write_bytes(content)
    code, err = run(["lint", str(path), "--target", "tensorrt"], capsys, monkeypatch)
    assert code == errors.BAD_INPUT and message in err.lower() and "Traceback" not in err


def test_debug_flag_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["deploy", "--debug", "build", "--target", "nope"])
    with pytest.raises(errors.BadInputError):
        main()
