"""One recipe: what `deploy check` and `deploy bench` export is what `deploy build` ships."""

from __future__ import annotations

from qat_deploy.deploy.app import gate
from qat_deploy.deploy.app.bench import export_model
from qat_deploy.deploy.app.pipeline import BuildOptions, build
from qat_deploy.deploy.recipe import DEFAULT_MODEL


def test_the_gated_artifact_is_the_built_one_byte_for_byte(tmp_path):
    assert gate.check.export_model is export_model  # what `deploy check` exports from the repo
    files = export_model(DEFAULT_MODEL, "onnxruntime", tmp_path / "check")
    build(BuildOptions(target="onnxruntime", export_only=True, out_dir=tmp_path / "build"))
    assert files["int8"].read_bytes() == (tmp_path / "build" / "model.qdq.onnx").read_bytes()
    assert files["fp32"].read_bytes() == (tmp_path / "build" / "model.fp32.onnx").read_bytes()


def test_the_build_recipe_changes_the_artifact_when_calibration_changes(tmp_path):
    """The comparison above can fail: a different calibration gives different bytes."""
    files = export_model(DEFAULT_MODEL, "onnxruntime", tmp_path / "check", precisions=["int8"])
    options = BuildOptions(
        target="onnxruntime", export_only=True, out_dir=tmp_path / "build", calib_batches=1
    )
    build(options)
    assert files["int8"].read_bytes() != (tmp_path / "build" / "model.qdq.onnx").read_bytes()
