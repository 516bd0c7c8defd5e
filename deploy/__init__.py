"""qat-deploy: one QAT front end, per-backend int8 rules, QDQ ONNX export, engine checks.

Data flow: model -> prepare() (fake-quant, by the target's rules) -> calibrate() / train_qat()
-> QDQ ONNX -> engine -> report.
"""

from qat_deploy.deploy.common.errors import (
    BackendUnavailableError,
    BadInputError,
    CheckFailedError,
    DeployError,
    EnvironmentFaultError,
    LatencyRegressionError,
    RankFailedError,
)
from qat_deploy.deploy.frontend.prepare import PreparedModel, prepare
from qat_deploy.deploy.quant.sync import ranks_synced
from qat_deploy.deploy.rules.backend import available_targets, get_rules
from qat_deploy.deploy.training.calibrate import calibrate
from qat_deploy.deploy.training.qat import train_qat
from qat_deploy.deploy.training.smooth import smooth_linear_inputs

__all__ = [
    "BackendUnavailableError",
    "BadInputError",
    "CheckFailedError",
    "DeployError",
    "EnvironmentFaultError",
    "LatencyRegressionError",
    "PreparedModel",
    "RankFailedError",
    "available_targets",
    "calibrate",
    "get_rules",
    "prepare",
    "ranks_synced",
    "smooth_linear_inputs",
    "train_qat",
]
