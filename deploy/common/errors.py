"""Errors the user can act on, each mapped to a documented exit code.

The CLI turns any DeployError into one line on stderr and its exit code. `classify` maps
everything else that can end a run onto the same codes: a signal (128 + its number, as shells
report it), a fault of the machine (disk full, read-only folder, out of memory: exit 6, naming
the path or the resource), user code that called sys.exit (bad input). Only what is left is a
bug and exits with INTERNAL_ERROR.
"""

from __future__ import annotations

import errno
import signal

OK = 0
INTERNAL_ERROR = 1
BAD_INPUT = 2
BACKEND_UNAVAILABLE = 3
CHECK_FAILED = 4
LATENCY_REGRESSION = 5
ENVIRONMENT_FAULT = 6
RANK_FAILED = 7

#: OSError numbers that say "this machine cannot do it now", not "the program is wrong"
ENVIRONMENT_ERRNOS = frozenset(
    {
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EFBIG,
        errno.EACCES,
        errno.EPERM,
        errno.EROFS,
        errno.ENOTDIR,
        errno.EISDIR,
        errno.ENOMEM,
        errno.EMFILE,
        errno.ENFILE,
        errno.EIO,
    }
)
#: how native libraries (torch, onnxruntime, OpenVINO) word a failed allocation
OUT_OF_MEMORY_WORDS = ("can't allocate memory", "out of memory", "bad_alloc", "failed to allocate")


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


class EnvironmentFaultError(DeployError):
    """The machine, not the input or the program: disk full, no permission, out of memory,
    an output folder another build holds."""

    exit_code = ENVIRONMENT_FAULT


class RankFailedError(DeployError):
    """A data-parallel run lost a rank: it died, hung past the timeout, or dropped its
    connection. Names the rank where known."""

    exit_code = RANK_FAILED


#: torch.distributed's errors for a peer that died, hung or cannot be reached (by name: this
#: module does not import torch), and the words of those gloo raises as a plain RuntimeError
_RANK_ERRORS = ("DistBackendError", "DistNetworkError", "DistStoreError")
_RANK_ERROR_WORDS = ("gloo/transport", "Connection reset by peer", "Connection closed by peer")


class Interrupted(BaseException):
    """A signal ended the run (SIGINT, SIGTERM, SIGHUP). A BaseException like
    KeyboardInterrupt, so no `except Exception` in user or library code swallows it."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


#: Signals the CLI's handler has turned into Interrupted in this process, newest last
_received_signals: list[int] = []


def note_signal(signum: int) -> None:
    """Remember that a signal is ending this run. Library code can swallow the Interrupted
    the handler raises: polygraphy's LazyModule.is_importable has a bare `except:`, so a
    SIGTERM landing there surfaced as "PolygraphyException: Function: to_numpy is unsupported
    for objects of type: ndarray" (exit 1). Whatever then ends the run is the signal's doing."""
    _received_signals.append(signum)


def forget_signals() -> None:
    """The run that noted signals is over (the CLI's main may run again in-process)."""
    _received_signals.clear()


def interruption(exc: BaseException) -> Interrupted | None:
    """The signal behind `exc`, if any: native code that a signal interrupts can wrap it (an
    extension module's init turns it into "ImportError: initialization failed"), and library
    code can swallow it and fail otherwise (note_signal)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, Interrupted):
            return current
        if isinstance(current, KeyboardInterrupt):
            return Interrupted(signal.SIGINT)
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return Interrupted(_received_signals[-1]) if _received_signals else None


def classify(exc: BaseException) -> DeployError | Interrupted:
    """The documented outcome of any exception that ends a run (the original stays the
    __cause__). Unknown exceptions become a DeployError with INTERNAL_ERROR."""
    signalled = interruption(exc)
    if signalled is not None:
        return signalled
    if isinstance(exc, DeployError):
        return exc
    if isinstance(exc, SystemExit):
        return BadInputError(f"model code called sys.exit({exc.code!r})")
    if isinstance(exc, MemoryError) or (
        isinstance(exc, RuntimeError)
        and any(word in str(exc).lower() for word in OUT_OF_MEMORY_WORDS)
    ):
        return EnvironmentFaultError(f"out of memory: {one_line(exc)}")
    if type(exc).__name__ in _RANK_ERRORS or (
        isinstance(exc, RuntimeError) and any(word in str(exc) for word in _RANK_ERROR_WORDS)
    ):
        return RankFailedError(f"lost contact with another rank: {one_line(exc)}")
    if isinstance(exc, OSError) and exc.errno in ENVIRONMENT_ERRNOS:
        where = f": {exc.filename}" if exc.filename else ""
        return EnvironmentFaultError(f"{exc.strerror or one_line(exc)}{where}")
    internal = DeployError(f"internal error: {one_line(exc)} (rerun with --debug)")
    internal.__cause__ = exc
    return internal


def one_line(exc: BaseException) -> str:
    """First line of an exception, prefixed by its type: enough to name a problem in one line."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
