"""qat-deploy: one QAT front end, per-backend int8 rules, QDQ ONNX export, engine checks.

Data flow: model -> prepare() (fake-quant, by the target's rules) -> calibrate() / train_qat()
-> QDQ ONNX -> engine -> report.
"""

from deploy.calibrate import calibrate
from deploy.errors import (
    BackendUnavailableError,
    BadInputError,
    CheckFailedError,
    DeployError,
    EnvironmentFaultError,
    LatencyRegressionError,
)
from deploy.prepare import PreparedModel, prepare
from deploy.qat import train_qat
from deploy.quant.smooth import smooth_linear_inputs
from deploy.rules import available_targets, get_rules

__all__ = [
    "BackendUnavailableError",
    "BadInputError",
    "CheckFailedError",
    "DeployError",
    "EnvironmentFaultError",
    "LatencyRegressionError",
    "PreparedModel",
    "available_targets",
    "calibrate",
    "get_rules",
    "prepare",
    "smooth_linear_inputs",
    "train_qat",
]
