"""Run TensorRT's own ONNX parser and turn its errors into one line per failing node.

The parser is the authority on what TensorRT accepts (zero points, int32 bias DQ, QOperator
ops, ...), so its verdict is reported as-is rather than re-derived. The same code serves
datacenter TensorRT and TensorRT-RTX: their parser APIs are identical.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from qat_deploy.deploy.common.errors import CheckFailedError

# Without a GPU the parser appends the CUDA runtime's "no driver" complaint to some node errors;
# it says nothing about the model, so it is left out of the one-line summary.
_NO_DRIVER_NOISE = "cudaError 35"


def parse_onnx(trt: ModuleType, network, logger, onnx_path: Path):
    """Populate `network` from `onnx_path`; returns the parser (it must outlive the network)."""
    parser = trt.OnnxParser(network, logger)
    ok = parser.parse_from_file(str(onnx_path))
    errors = [describe_error(parser.get_error(i)) for i in range(parser.num_errors)]
    if not ok or errors:
        # the first error goes on the first line: that is the line a CLI prints
        detail = "\n".join(errors) or "the parser gave no reason"
        raise CheckFailedError(f"TensorRT's ONNX parser rejected {onnx_path.name}: {detail}")
    return parser


def describe_error(error) -> str:
    """One line: node name, operator, error code and the parser's own message."""
    lines = [line.strip() for line in str(error.desc()).splitlines()]
    message = "; ".join(line for line in lines if line and _NO_DRIVER_NOISE not in line)
    code = str(error.code()).rsplit(".", 1)[-1]
    if error.node() < 0:
        return f"model: {code}: {message}"
    return (
        f"node {error.node_name()} ({error.node_operator()}): {code} in {error.func()}: {message}"
    )
