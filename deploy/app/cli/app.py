"""The typer app every command module registers on, and the consoles they print to."""

from __future__ import annotations

import typer
from rich.console import Console

HELP = (
    "One QAT front end for int8 engines on TensorRT, OpenVINO and onnxruntime.\n\n"
    "Exit codes: 0 ok, 1 internal error, 2 bad input, 3 backend unavailable, "
    "4 check failed, 5 latency regression, 6 environment fault (disk, permissions, memory, "
    "folder in use), 130/143 interrupted by SIGINT/SIGTERM."
)

app = typer.Typer(add_completion=False, no_args_is_help=True, help=HELP)
console = Console()
err_console = Console(stderr=True, soft_wrap=True)
_state = {"debug": False}


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors.")):
    _state["debug"] = debug
