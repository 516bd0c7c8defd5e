"""`deploy sensitivity`: rank a model's layers by the accuracy their quantization costs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from qat_deploy.deploy.app.cli.app import app, console
from qat_deploy.deploy.app.cli.build import (
    CalibBatchesOption,
    CalibrationOption,
    DataOption,
    InputShapeOption,
    InputSpecOption,
    ModelOption,
    TargetOption,
    parse_inputs,
)
from qat_deploy.deploy.common import errors

Opt = typer.Option
RESULT = "sensitivity.json"
#: part of the cache key: a result cached by an older analysis is computed again
ANALYSIS_VERSION = 2  # 2: alone-float emulates --keep-float (shared inputs, rounding)


@app.command("sensitivity")
def sensitivity_command(
    target: TargetOption,
    model: ModelOption = None,
    input_shape: InputShapeOption = None,
    input_spec: InputSpecOption = None,
    data: DataOption = None,
    calib_batches: CalibBatchesOption = 8,
    calibration: CalibrationOption = "auto",
    samples: Annotated[int, Opt(help="Held-out samples the layers are scored on.")] = 64,
    out: Annotated[Path, Opt("--out", help="Folder for sensitivity.json (the cache).")] = Path(
        "out-sensitivity"
    ),
) -> None:
    """Score each Conv/Linear layer quantized alone and kept float alone in the calibrated
    fake-quant model (output SQNR vs fp32), the layer whose keeping float helps most first;
    the result is cached in OUT/sensitivity.json per model, weights, data and settings."""
    import torch

    from qat_deploy.deploy import recipe
    from qat_deploy.deploy.common.artifacts import write_atomic
    from qat_deploy.deploy.verify.sensitivity import analyse

    if samples < 1:
        raise errors.BadInputError(f"bad --samples {samples}; expected a positive integer")
    shape, inputs = parse_inputs(input_shape, input_spec)
    plan = recipe.Recipe(
        target=target,
        model=model,
        input_shape=shape,
        inputs=inputs,
        data=data,
        calib_batches=calib_batches,
        calibration=calibration,
        eval_samples=samples,
    )
    recipe.check(plan)
    loaded = recipe.load(plan)
    key = _cache_key(plan, loaded.model)
    cached = _read(out / RESULT)
    if cached is not None and cached.get("key") == key:
        result, source = cached, f"cached in {out / RESULT}"
    else:
        prepared = recipe.quantize(loaded, plan)
        spec, evaluation = loaded.spec, loaded.evaluation
        arrays, size = evaluation.arrays(spec.inputs), plan.batch_size
        n = len(evaluation)
        batches = [recipe.tensors(spec, arrays, i, min(i + size, n)) for i in range(0, n, size)]
        with torch.no_grad():
            result = {"key": key, "model": spec.name, "target": target, "samples": n}
            result |= analyse(prepared, loaded.model, batches).to_dict()
        write_atomic(out / RESULT, (json.dumps(result, indent=2) + "\n").encode())
        source = f"written to {out / RESULT}"
    console.print(_table(result))
    console.print(f"{source}", markup=False, soft_wrap=True)
    worst = result["layers"][0]["layer"]
    console.print(
        f"next: deploy build --target {target}"
        + (f" --model {model}" if model else "")
        + f" --keep-float {worst}   # the layer whose keeping float helps most",
        markup=False,
        soft_wrap=True,
    )


def _cache_key(plan, model) -> str:
    """Everything that changes the result: the recipe, and the weights themselves."""
    digest = hashlib.sha256(f"{ANALYSIS_VERSION}{sorted(vars(plan).items())!r}".encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # no cache, or one this run will replace


def _table(result: dict) -> Table:
    table = Table(
        title=f"{result['model']} on {result['target']}: all layers quantized "
        f"{result['all_quantized_sqnr_db']:.1f} dB SQNR vs fp32 ({result['samples']} samples)"
    )
    table.add_column("layer", overflow="fold")  # long module paths stay whole
    for col in ("this layer float, dB", "only this quantized, dB", "quantizers"):
        table.add_column(col)
    for row in result["layers"]:
        table.add_row(
            row["layer"],
            f"{row['alone_float_sqnr_db']:.1f}",
            f"{row['alone_quantized_sqnr_db']:.1f}",
            str(row["quantizers"]),
        )
    return table
