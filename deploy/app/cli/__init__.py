"""`deploy` command line. Every user-facing failure is one line on stderr plus a documented
exit code (see deploy.common.errors); --debug shows the traceback instead. Each command lives in its
own module and registers on the shared app."""

from __future__ import annotations

import importlib
import pkgutil
import signal
import sys
import threading

import typer

from qat_deploy.deploy.app.cli.app import _state, app, err_console
from qat_deploy.deploy.app.entry import HANDLED_SIGNALS, exit_now
from qat_deploy.deploy.common import errors
from qat_deploy.deploy.training import distributed

# every other module in this package defines commands on `app`; importing registers them
for _module in pkgutil.iter_modules(__path__):
    if _module.name not in ("app", "__main__"):
        importlib.import_module(f"{__name__}.{_module.name}")


#: seconds a run may take to unwind after a signal before it is ended outright
UNWIND_GRACE_S = 20.0
_watchdogs: list[threading.Timer] = []


def _interrupt(signum: int, frame: object) -> None:
    """Unwind the command as an exception, so temp files go and the report says interrupted.

    An exception raised from a signal handler can land in a finalizer that swallows it, and
    cleanup can hang in native code: so the process ends outright (as after SIGKILL, the
    report then still says "running") on a second signal or after UNWIND_GRACE_S seconds."""
    for other in HANDLED_SIGNALS:
        signal.signal(other, exit_now)
    watchdog = threading.Timer(UNWIND_GRACE_S, exit_now, (signum, None))
    watchdog.daemon = True
    watchdog.start()
    _watchdogs.append(watchdog)
    errors.note_signal(signum)
    raise errors.Interrupted(signum)


def main() -> None:
    """Console-script entry: every way a command ends (done, an error, an exception from a
    library or the machine, a signal) is one line on stderr and a documented exit code.
    The signal handlers it installs are restored on the way out (main may run in-process)."""
    previous = {signum: signal.signal(signum, _interrupt) for signum in HANDLED_SIGNALS}
    try:
        _main()
    finally:  # unwound in time: no forced exit, and the caller's handlers back
        for watchdog in _watchdogs:
            watchdog.cancel()
        _watchdogs.clear()
        errors.forget_signals()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _main() -> None:
    try:
        code = app(standalone_mode=False)
    except (typer.Exit, SystemExit) as exc:
        sys.exit(getattr(exc, "exit_code", getattr(exc, "code", 0)) or 0)
    except typer.Abort:
        _fail(errors.Interrupted(signal.SIGINT))
    except typer.TyperException as exc:  # usage errors: unknown command/option, bad value
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        err_console.print(f"error: {message} (see 'deploy --help')", markup=False, highlight=False)
        sys.exit(errors.BAD_INPUT)
    except BaseException as exc:
        if _state["debug"]:
            raise
        _fail(errors.classify(exc))
    if isinstance(code, int) and code != 0:  # typer returns 130 for a bare Ctrl-C
        sys.exit(code)


def _fail(error: errors.DeployError | errors.Interrupted) -> None:
    if isinstance(error, errors.Interrupted) and distributed.is_worker():
        sys.exit(error.exit_code)  # the launcher stopped this rank and says why, once
    plain = isinstance(error, errors.Interrupted) or error.exit_code == errors.INTERNAL_ERROR
    prefix = "" if plain else "error: "
    err_console.print(f"{prefix}{error}", markup=False, highlight=False)
    sys.exit(error.exit_code)


if __name__ == "__main__":
    main()
