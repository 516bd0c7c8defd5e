"""The int8 claim of a kernel report: how many layers should run int8 is counted on the QDQ
model once the pipeline has read it, because an engine's layers need not be its ONNX nodes."""

from __future__ import annotations

from qat_deploy.deploy.engines.adapter import KernelReport, LayerPrecision


def _engine(int8: int, total: int) -> list[LayerPrecision]:
    return [
        LayerPrecision(f"fc{i}", "FullyConnected", "int8" if i < int8 else "float", "linear")
        for i in range(total)
    ]


def test_planned_layers_come_from_the_qdq_model_when_the_engine_merged_layers():
    """OpenVINO reported 38 compute layers for all-MiniLM-L6-v2, whose QDQ model has 48
    compute nodes: with 43 of them float by rule, engine layers less ONNX nodes left none
    planned while the 5 quantized nodes still ran."""
    floats = [f"float{i}" for i in range(43)]
    report = KernelReport(_engine(int8=5, total=38), "test", float_by_rule=floats)
    assert report.planned_int8 == 0 and report.int8_fraction_of_quantized == 0.0
    report.quantized_by_rule = [f"quantized{i}" for i in range(5)]
    assert report.planned_int8 == 5 and report.int8_fraction_of_quantized == 1.0


def test_without_the_qdq_model_every_reported_layer_not_float_by_rule_is_planned():
    report = KernelReport(_engine(int8=6, total=8), "test", float_by_rule=["kept"])
    assert report.planned_int8 == 7
    assert abs(report.int8_fraction_of_quantized - 6 / 7) < 1e-12
