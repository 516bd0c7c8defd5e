"""`deploy` command line. Every user-facing failure is one line on stderr plus a documented
exit code (see deploy.errors); --debug shows the traceback instead."""

from __future__ import annotations

import sys

import typer
from rich.console import Console
from rich.table import Table

from deploy import errors

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console()
err_console = Console(stderr=True, soft_wrap=True)
_state = {"debug": False}


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors.")):
    _state["debug"] = debug


@app.command()
def selfcheck(seed: int = 0) -> None:
    """Check the quantization core bit for bit against onnxruntime's QuantizeLinear."""
    from deploy.selfcheck import run_selfcheck

    results = run_selfcheck(seed=seed)
    table = Table(title="quantize/dequantize vs onnxruntime QuantizeLinear/DequantizeLinear")
    for col in ("case", "values", "code mismatches", "float bit mismatches", "result"):
        table.add_column(col)
    for r in results:
        verdict = "[green]ok[/green]" if r.ok else "[red]MISMATCH[/red]"
        table.add_row(
            r.case, str(r.values), str(r.code_mismatches), str(r.float_bit_mismatches), verdict
        )
    console.print(table)
    if not all(r.ok for r in results):
        raise errors.CheckFailedError("quantization core disagrees with onnxruntime")


@app.command("lint")
def lint_command(
    model: str = typer.Argument(..., help="QDQ ONNX file, from this project or any tool."),
    target: str = typer.Option(..., "--target", "-t", help="Backend whose rules to check."),
    as_json: bool = typer.Option(False, "--json", help="Print violations as a JSON list."),
) -> None:
    """Check a QDQ ONNX graph against a target's rules; exit 4 when it breaks any."""
    import dataclasses
    import json

    from rich.text import Text

    from deploy.lint import lint

    violations = lint(model, target)
    if as_json:
        typer.echo(json.dumps([dataclasses.asdict(v) for v in violations], indent=2))
    elif violations:
        table = Table(title=f"{model} against the {target} rules")
        for col in ("rule", "node", "message"):
            table.add_column(col)
        for v in violations:
            table.add_row(v.rule, Text(v.node or "(model)"), Text(v.message))
        console.print(table)
    else:
        console.print(f"{model}: no violations of the {target} rules", markup=False, soft_wrap=True)
    if violations:
        raise errors.CheckFailedError(f"{len(violations)} violation(s) of the {target} rules")


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
