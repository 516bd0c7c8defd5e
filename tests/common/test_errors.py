"""Every way a run can end maps to a documented exit code (deploy.common.errors.classify)."""

from __future__ import annotations

import errno
import signal

import pytest

from qat_deploy.deploy.common import errors


@pytest.mark.parametrize(
    ("exc", "code", "words"),
    [
        (KeyboardInterrupt(), 130, "SIGINT"),
        (errors.Interrupted(signal.SIGTERM), 143, "SIGTERM"),
        (OSError(errno.ENOSPC, "No space left on device", "/out/m.onnx"), 6, "/out/m.onnx"),
        (PermissionError(errno.EACCES, "Permission denied", "/ro"), 6, "Permission denied: /ro"),
        (MemoryError(), 6, "out of memory"),
        (RuntimeError("DefaultCPUAllocator: can't allocate memory: 7e13 bytes"), 6, "memory"),
        (SystemExit(3), errors.BAD_INPUT, "sys.exit(3)"),
        (ValueError("a bug of ours"), errors.INTERNAL_ERROR, "ValueError: a bug of ours"),
        (OSError(errno.EBADF, "Bad file descriptor"), errors.INTERNAL_ERROR, "internal error"),
        (errors.CheckFailedError("lint"), errors.CHECK_FAILED, "lint"),
    ],
)
def test_classify_maps_each_ending_to_its_code(exc, code, words):
    outcome = errors.classify(exc)
    assert outcome.exit_code == code
    assert words in str(outcome)
    assert "\n" not in str(outcome)


def test_interrupted_is_not_an_exception_user_code_can_swallow():
    """`except Exception` in a model's forward must not eat a Ctrl-C or a SIGTERM."""
    with pytest.raises(errors.Interrupted):
        try:
            raise errors.Interrupted(signal.SIGTERM)
        except Exception:  # noqa: BLE001 - what careless user code does
            pytest.fail("Interrupted was caught as an Exception")


def test_a_signal_wrapped_by_native_code_is_still_the_signal():
    """pybind11 turns an exception during a module's init into ImportError, keeping it as the
    cause: a SIGTERM while onnxruntime imports must not read as a broken install."""
    try:
        try:
            raise errors.Interrupted(signal.SIGTERM)
        except errors.Interrupted as inner:
            raise ImportError("initialization failed") from inner
    except ImportError as wrapped:
        outcome = errors.classify(wrapped)
    assert isinstance(outcome, errors.Interrupted) and outcome.exit_code == 143


def test_a_signal_a_library_swallowed_still_ends_the_run_as_the_signal():
    """polygraphy's is_importable has a bare `except:`: a SIGTERM landing there vanished and
    its array dispatch then failed with an unrelated error, reported as an internal error."""

    def library_call():
        try:
            raise errors.Interrupted(signal.SIGTERM)  # what the CLI's handler raises
        except:  # noqa: E722 - what that library code does
            pass
        raise RuntimeError("Function: to_numpy is unsupported for objects of type: ndarray")

    errors.note_signal(signal.SIGTERM)  # the CLI's handler notes it before raising
    try:
        with pytest.raises(RuntimeError) as failure:
            library_call()
        outcome = errors.classify(failure.value)
    finally:
        errors.forget_signals()
    assert isinstance(outcome, errors.Interrupted) and outcome.exit_code == 143
    # once the run is over, the same error is an internal error again
    assert errors.classify(failure.value).exit_code == errors.INTERNAL_ERROR
