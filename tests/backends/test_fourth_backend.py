"""Adding a backend means adding one folder: a throwaway fourth backend, written only into a
temporary folder on the `backends` package path, builds end to end through the same pipeline
and lint as the shipped three. Nothing outside its folder names it."""

from __future__ import annotations

import sys
import textwrap

import pytest

from qat_deploy import backends
from qat_deploy.deploy.app.pipeline import BuildOptions, build
from qat_deploy.deploy.lint import lint
from qat_deploy.deploy.rules.backend import available_targets, get_rules

RULES = '''
"""Minimal rules: int8 Conv (input and output, as QLinearConv wants) and Linear only."""
from qat_deploy.deploy.quant.spec import INT8_WEIGHT, UINT8_AFFINE_ACT
from qat_deploy.deploy.rules.backend import CONV_FUSIONS, BackendRules, Inputs, OpRule

RULES = BackendRules(
    name="plain_ort",
    activation=UINT8_AFFINE_ACT,
    weight=INT8_WEIGHT,
    ops={"conv": OpRule(Inputs.ACTIVATION, output=True), "linear": OpRule(Inputs.ACTIVATION)},
    pass_through=frozenset({"maxpool", "reshape", "transpose", "identity", "getitem"}),
    fusions=CONV_FUSIONS,
    int32_bias=frozenset({"conv", "linear"}),
    # onnxruntime's u8 x s8 kernels saturate int16 pair sums on x86 without VNNI (an AVX2-only
    # EPYC: cosine 0.51 vs the fake-quant model with 8-bit weights)
    int16_pair_sums_without_vnni=True,
)
'''

ADAPTER = '''
"""onnxruntime's CPU EP with its default optimizations, written against the Adapter hooks."""
import functools
from pathlib import Path

import onnx
from polygraphy.backend.onnxrt import OnnxrtRunner

from qat_deploy.backends.onnxruntime.adapter import create_session, graph_precisions
from qat_deploy.deploy.common.artifacts import atomic_path
from qat_deploy.deploy.engines.adapter import Adapter, BuiltEngine, KernelReport


class PlainOrtAdapter(Adapter):
    name = "plain_ort"

    def unavailable_reason(self):
        return None

    def _build(self, onnx_path: Path, out_dir: Path, *, precision: str, threads: int):
        artifact = out_dir / "engine.plain_ort.onnx"
        with atomic_path(artifact) as tmp:
            create_session(onnx_path, threads, optimized_path=tmp)
        return BuiltEngine(self.name, artifact, onnx_path, precision, threads)

    def runner(self, engine: BuiltEngine):
        loader = functools.partial(create_session, engine.onnx_path, engine.threads)
        return OnnxrtRunner(loader, name=f"plain_ort-{engine.precision}")

    def kernel_report(self, engine: BuiltEngine) -> KernelReport:
        graph = onnx.load(str(engine.artifact)).graph
        return KernelReport(layers=graph_precisions(graph), source="plain_ort optimized graph")


ADAPTER = PlainOrtAdapter()
'''


@pytest.fixture
def fourth_backend(tmp_path, monkeypatch):
    folder = tmp_path / "plain_ort"
    folder.mkdir()
    (folder / "__init__.py").write_text('"""A throwaway backend for one test."""\n')
    (folder / "rules.py").write_text(textwrap.dedent(RULES))
    (folder / "adapter.py").write_text(textwrap.dedent(ADAPTER))
    monkeypatch.setattr(backends, "__path__", [*backends.__path__, str(tmp_path)])
    yield "plain_ort"
    for name in [m for m in sys.modules if m.startswith("qat_deploy.backends.plain_ort")]:
        del sys.modules[name]


def test_a_backend_in_its_own_folder_builds_end_to_end(fourth_backend, tmp_path):
    assert fourth_backend in available_targets()
    assert get_rules(fourth_backend).name == "plain_ort"
    report = build(
        BuildOptions(
            target=fourth_backend, out_dir=tmp_path / "out", eval_samples=200, min_time_s=0.2
        )
    )
    assert report["status"] == "ok" and report["target"] == "plain_ort"
    # its rules quantize Conv and Linear only: all 8 compute layers of the digits net run int8
    assert report["kernels"]["int8"] == 8 and report["kernels"]["fallback_layers"] == []
    assert report["accuracy"]["measured"] and report["latency_ms"]["measured"]
    qdq = tmp_path / "out" / "model.qdq.onnx"
    assert lint(qdq, fourth_backend) == []
    # the residual Adds its rules leave float are a violation for the shipped onnxruntime rules
    assert any(v.rule == "unquantized-input" for v in lint(qdq, "onnxruntime"))
