"""Quantization core: quantization specs, the integer arithmetic (checked against onnxruntime's
QuantizeLinear by the tests and `deploy selfcheck`), range observers and fake-quantize modules,
with ranks kept in step under data-parallel training. Every other layer builds on it; it imports
only deploy.common."""

from qat_deploy.deploy.quant.fake_quant import FakeQuantize
from qat_deploy.deploy.quant.functional import (
    dequantize,
    fake_quantize,
    fake_quantize_lsq,
    quantize,
)
from qat_deploy.deploy.quant.histogram_observers import MSEObserver, PercentileObserver
from qat_deploy.deploy.quant.observers import (
    CurrentMinMaxObserver,
    FixedRangeObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    Observer,
    fixed_range,
    qparams_from_range,
)
from qat_deploy.deploy.quant.spec import INT8_SYM_ACT, INT8_WEIGHT, UINT8_AFFINE_ACT, QuantSpec

__all__ = [
    "INT8_SYM_ACT",
    "INT8_WEIGHT",
    "UINT8_AFFINE_ACT",
    "CurrentMinMaxObserver",
    "FakeQuantize",
    "FixedRangeObserver",
    "MSEObserver",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "Observer",
    "PercentileObserver",
    "QuantSpec",
    "dequantize",
    "fake_quantize",
    "fake_quantize_lsq",
    "fixed_range",
    "qparams_from_range",
    "quantize",
]
