"""Errors the user can act on, each mapped to a documented exit code.

The CLI turns any DeployError into one line on stderr and its exit code; anything else is a
bug and exits with INTERNAL_ERROR.
"""

from __future__ import annotations

OK = 0
INTERNAL_ERROR = 1
BAD_INPUT = 2
BACKEND_UNAVAILABLE = 3
CHECK_FAILED = 4
LATENCY_REGRESSION = 5


class DeployError(Exception):
    """Base of every error that is the user's to fix; carries the process exit code."""

    exit_code = INTERNAL_ERROR


class BadInputError(DeployError, ValueError):
    """Malformed or unusable input: files, shapes, NaN/Inf data, unknown names."""

    exit_code = BAD_INPUT


class BackendUnavailableError(DeployError, RuntimeError):
    """The requested backend (or the hardware it needs) is not present on this machine."""

    exit_code = BACKEND_UNAVAILABLE


class CheckFailedError(DeployError):
    """A verification (lint rule, kernel precision, accuracy threshold) did not pass."""

    exit_code = CHECK_FAILED


class LatencyRegressionError(DeployError):
    """The CI gate found a significant latency regression beyond tolerance."""

    exit_code = LATENCY_REGRESSION


def one_line(exc: BaseException) -> str:
    """First line of an exception, prefixed by its type: enough to name a problem in one line."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
