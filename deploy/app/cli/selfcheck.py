"""`deploy selfcheck`: the core's integer math against onnxruntime, on this install."""

from __future__ import annotations

from rich.table import Table

from qat_deploy.deploy.app.cli.app import app, console
from qat_deploy.deploy.common import errors


@app.command()
def selfcheck(seed: int = 0) -> None:
    """Check the quantization core bit for bit against onnxruntime's QuantizeLinear."""
    from qat_deploy.deploy.app.selfcheck import run_selfcheck

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
