"""Models with several inputs (token ids + attention mask) through the whole pipeline.

The end-to-end tests need deploy.frontend.prepare and deploy.export.qdq to take dict example
inputs (ONNX inputs named after the keys); the others check the pieces the pipeline feeds them with.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from qat_deploy.deploy.app.pipeline import BuildOptions, _feed, build
from qat_deploy.deploy.common.errors import CheckFailedError
from qat_deploy.deploy.frontend.prepare import prepare
from qat_deploy.deploy.training.calibrate import calibrate, first_tensor
from qat_deploy.models import load_model
from tests.report_schema import read_report

VOCAB, SEQ, BATCH = 50, 12, 2
SPECS = {
    "input_ids": {"shape": [BATCH, SEQ], "dtype": "int64"},
    "attention_mask": {"shape": [BATCH, SEQ], "dtype": "int64"},
}
FAST = {"eval_samples": 64, "min_time_s": 0.1, "calib_batches": 2, "batch_size": 8}


class TwoInput(nn.Module):
    """Embedding over token ids, masked mean over the sequence, Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.hidden = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.to(torch.float32).unsqueeze(-1)
        pooled = (self.embed(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self.head(torch.relu(self.hidden(pooled)))


def two_input_model():
    """Factory declaring its inputs (the vocab range comes from the nn.Embedding)."""
    return TwoInput(), SPECS


def bare_two_input_model():
    return TwoInput()


def _ids_and_mask(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, size=(n, SEQ))
    lengths = rng.integers(1, SEQ + 1, size=n)
    mask = (np.arange(SEQ)[None] < lengths[:, None]).astype(np.int64)
    return {"input_ids": ids, "attention_mask": mask}


def test_load_model_names_orders_and_ranges_the_inputs():
    _, spec = load_model("tests.app.test_multi_input:two_input_model")
    assert [i.name for i in spec.inputs] == ["input_ids", "attention_mask"]
    assert spec.by_keyword and spec.input_shape == (BATCH, SEQ)
    assert spec.inputs[0].range == (0, VOCAB)  # the embedding's num_embeddings
    assert spec.inputs[1].range is None  # masks take no token range


def test_calibrating_on_keyword_batches_matches_positional_batches():
    model = TwoInput().eval()
    data = {k: torch.from_numpy(v) for k, v in _ids_and_mask(16).items()}
    example = {k: v[:BATCH] for k, v in data.items()}
    by_name = prepare(model, "onnxruntime", example)
    by_position = prepare(model, "onnxruntime", tuple(example.values()))
    calibrate(by_name, [{k: v[i : i + 8] for k, v in data.items()} for i in (0, 8)], progress=False)
    calibrate(
        by_position,
        [(data["input_ids"][i : i + 8], data["attention_mask"][i : i + 8]) for i in (0, 8)],
        progress=False,
    )
    named, positional = by_name.quantizers(), by_position.quantizers()
    assert named and len(named) == len(positional)
    for a, b in zip(named, positional, strict=True):
        torch.testing.assert_close(a.scale, b.scale, rtol=0, atol=0)


class FakeRunner:
    def __init__(self, names):
        self.names = names

    def get_input_metadata(self):
        return dict.fromkeys(self.names)


def test_engine_feed_matches_by_name_then_by_position():
    arrays = {"input_ids": np.arange(6).reshape(3, 2), "attention_mask": np.ones((3, 2))}
    by_name = _feed(FakeRunner(["attention_mask", "input_ids"]), arrays, 0, 2)
    assert by_name.keys() == {"attention_mask", "input_ids"}
    np.testing.assert_array_equal(by_name["input_ids"], [[0, 1], [2, 3]])
    by_position = _feed(FakeRunner(["input_0", "input_1"]), arrays, 1, 3)
    np.testing.assert_array_equal(by_position["input_0"], [[2, 3], [4, 5]])
    unused_dropped = _feed(FakeRunner(["input_ids"]), arrays, 0, 1)
    assert list(unused_dropped) == ["input_ids"]
    with pytest.raises(CheckFailedError, match="engine takes inputs a, b, c"):
        _feed(FakeRunner(["a", "b", "c"]), arrays, 0, 1)


def test_first_tensor_of_tuples_dicts_and_model_outputs():
    a, b = torch.ones(1), torch.zeros(1)
    assert first_tensor(a) is a
    assert first_tensor((a, b)) is a
    assert first_tensor({"logits": b, "hidden": a}) is b
    # a Hugging Face ModelOutput is an OrderedDict whose unset fields are skipped
    assert first_tensor(OrderedDict(loss=None, logits=(b, a))) is b


def _onnx_input_names(path) -> list[str]:
    return [i.name for i in onnx.load(str(path)).graph.input]


def test_two_input_model_builds_end_to_end(tmp_path):
    report = build(
        BuildOptions(
            target="onnxruntime",
            model="tests.app.test_multi_input:two_input_model",
            out_dir=tmp_path,
            **FAST,
        )
    )
    on_disk = read_report(tmp_path)
    assert on_disk["status"] == "ok" and report["stages"]["latency"] == "done"
    assert on_disk["model"]["inputs"] == [
        {"name": "input_ids", "shape": [BATCH, SEQ], "dtype": "int64", "range": [0, VOCAB]},
        {"name": "attention_mask", "shape": [BATCH, SEQ], "dtype": "int64"},
    ]
    assert "input_shape" not in on_disk["model"]
    assert "input_ids: random token ids" in on_disk["data"]["calibration"]
    assert "attention_mask: padding masks" in on_disk["data"]["calibration"]
    fp32 = tmp_path / "model.fp32.onnx"
    assert _onnx_input_names(fp32) == ["input_ids", "attention_mask"]
    # the float ONNX agrees with torch on data it never saw, fed by name
    data = _ids_and_mask(BATCH, seed=7)
    session = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"])
    got = session.run(None, data)[0]
    model, _ = load_model("tests.app.test_multi_input:two_input_model")
    with torch.no_grad():
        want = model(**{k: torch.from_numpy(v) for k, v in data.items()}).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert on_disk["accuracy"]["int8_vs_fp32"]["cosine"] > 0.99


def test_two_input_build_on_named_npz_data(tmp_path):
    data = _ids_and_mask(64, seed=1)
    labels = np.random.default_rng(2).integers(0, 4, size=64)
    np.savez(tmp_path / "d.npz", **data, y=labels)
    report = build(
        BuildOptions(
            target="onnxruntime",
            model="tests.app.test_multi_input:two_input_model",
            data=tmp_path / "d.npz",
            qat_epochs=1,
            out_dir=tmp_path / "out",
            **FAST,
        )
    )
    assert report["status"] == "ok" and report["stages"]["qat"] == "done"
    assert report["data"]["labels"] is True and "top1" in report["accuracy"]


def test_cli_named_input_shapes_export_a_two_input_graph(tmp_path, monkeypatch, capsys):
    from qat_deploy.deploy.app.cli import main

    out = tmp_path / "out"
    args = ["--model", "tests.app.test_multi_input:bare_two_input_model", "--export-only"]
    for name in ("attention_mask", "input_ids"):  # any order: forward() decides
        args += ["--input-shape", f"{name}:{BATCH}x{SEQ}:int64"]
    monkeypatch.setattr(
        "sys.argv", ["deploy", "build", "--target", "onnxruntime", *args, "--out", str(out)]
    )
    main()
    report = read_report(out)
    assert report["status"] == "ok" and report["lint"] == []
    assert [i["name"] for i in report["model"]["inputs"]] == ["input_ids", "attention_mask"]
    for name in ("model.fp32.onnx", "model.qdq.onnx"):
        assert _onnx_input_names(out / name) == ["input_ids", "attention_mask"]
