"""`deploy` command line. Every user-facing failure is one line on stderr plus a documented
exit code (see deploy.errors); --debug shows the traceback instead. Each command lives in its
own module and registers on the shared app."""

from __future__ import annotations

import importlib
import pkgutil
import sys

import typer

from deploy import errors
from deploy.cli.app import _state, app, err_console

# every other module in this package defines commands on `app`; importing registers them
for _module in pkgutil.iter_modules(__path__):
    if _module.name not in ("app", "__main__"):
        importlib.import_module(f"{__name__}.{_module.name}")


def main() -> None:
    """Console-script entry: map DeployError to its exit code and a single line."""
    try:
        app(standalone_mode=False)
    except errors.DeployError as exc:
        if _state["debug"]:
            raise
        err_console.print(f"error: {exc}", markup=False, highlight=False)
        sys.exit(exc.exit_code)
    except (typer.Exit, SystemExit) as exc:
        sys.exit(getattr(exc, "exit_code", getattr(exc, "code", 0)) or 0)
    except typer.Abort:
        err_console.print("aborted", markup=False)
        sys.exit(errors.INTERNAL_ERROR)
    except typer.TyperException as exc:  # usage errors: unknown command/option, bad value
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        err_console.print(f"error: {message} (see 'deploy --help')", markup=False, highlight=False)
        sys.exit(errors.BAD_INPUT)
    except Exception as exc:
        if _state["debug"]:
            raise
        err_console.print(
            f"internal error: {type(exc).__name__}: {exc} (rerun with --debug)",
            markup=False,
            highlight=False,
        )
        sys.exit(errors.INTERNAL_ERROR)


if __name__ == "__main__":
    main()
