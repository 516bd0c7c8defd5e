"""The `deploy` program's first lines: signals are handled while the command loads.

Until deploy.app.cli.main installs the handlers that unwind a running command, a signal ends the
process at once with its documented code (128 + number) and one line: nothing has been
written yet, so there is nothing to clean up, and no traceback from inside an import. (Before
this module runs, Python imports the deploy package, torch included, about a second; a signal
then kills the process by the default action, which shells report with the same code.)
"""

from __future__ import annotations

import os
import signal
import sys

from qat_deploy.deploy.common.errors import Interrupted

#: signals that end a command with a report saying so (SIGKILL cannot be caught)
HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def exit_now(signum: int, frame: object) -> None:
    interrupted = Interrupted(signum)
    os.write(2, f"{interrupted}\n".encode())
    os._exit(interrupted.exit_code)


def run() -> None:
    """Console-script entry (`deploy`, `python -m deploy`)."""
    for signum in HANDLED_SIGNALS:
        signal.signal(signum, exit_now)
    from qat_deploy.deploy.app.cli import main

    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    else:
        code = 0
    # The result is written. Skip the interpreter's teardown of torch and the runtimes: it
    # takes a while, and Python restores default signal handling during it, so a signal then
    # would kill the process instead of exiting with its code.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
