"""`deploy lint`: check a QDQ ONNX graph against a target's rules."""

from __future__ import annotations

import typer
from rich.table import Table

from qat_deploy.deploy.app.cli.app import app, console
from qat_deploy.deploy.common import errors


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

    from qat_deploy.deploy.lint import lint

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
