"""`deploy build`: the whole pipeline for one target, with progress and a summary table."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from qat_deploy.deploy import recipe
from qat_deploy.deploy.app.cli.app import app, console
from qat_deploy.deploy.app.pipeline import STAGES, BuildOptions, build
from qat_deploy.deploy.common import errors
from qat_deploy.deploy.common.environment import INT8_DOT_PRODUCT_FLAGS
from qat_deploy.deploy.recipe import (
    CHECKPOINT_NAME,
    DEFAULT_MODEL,
    DEFAULT_TUNE_BUDGET_S,
    QDQ_NAME,
)
from qat_deploy.deploy.rules.backend import available_targets
from qat_deploy.deploy.training import distributed
from qat_deploy.deploy.verify.closeness import DEFAULT_THRESHOLDS, Thresholds
from qat_deploy.models.inputs import InputSpec, check_batch, check_dtype, load_spec_file


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    """'1x3x224x224' -> (1, 3, 224, 224)."""
    if text is None:
        return None
    try:
        shape = tuple(int(d) for d in text.lower().split("x"))
    except ValueError:
        shape = ()
    if not shape or any(d < 1 for d in shape):
        raise errors.BadInputError(f"bad --input-shape '{text}'; expected e.g. 1x3x224x224")
    return shape


def parse_inputs(
    shapes: list[str] | None, spec_file: Path | None
) -> tuple[tuple[int, ...] | None, tuple[InputSpec, ...] | None]:
    """--input-shape (repeatable) and --input-spec as (unnamed shape, named input specs).

    '1x3x224x224' is the single-input form; 'NAME:1x128:int64' (dtype default float32) names
    one input of a multi-input model. Names are checked against forward() in load_model."""
    shapes = shapes or []
    if spec_file is not None:
        if shapes:
            raise errors.BadInputError("give --input-shape or --input-spec, not both")
        return None, load_spec_file(spec_file)
    if not any(":" in text for text in shapes):
        if len(shapes) > 1:
            raise errors.BadInputError(
                "several --input-shape values need names, e.g. --input-shape input_ids:1x128:int64"
            )
        return parse_shape(shapes[0] if shapes else None), None
    return None, check_batch(tuple(_named(text) for text in shapes), "--input-shape")


def _named(text: str) -> InputSpec:
    name, _, rest = text.partition(":")
    dims, _, dtype = rest.partition(":")
    if not name.isidentifier():
        raise errors.BadInputError(
            f"bad --input-shape '{text}'; expected NAME:SHAPE[:DTYPE], e.g. input_ids:1x128:int64"
        )
    where = f"--input-shape '{text}'"
    try:
        shape = parse_shape(dims)
    except errors.BadInputError:
        raise errors.BadInputError(
            f"bad dims in {where}; expected e.g. input_ids:1x128:int64"
        ) from None
    return InputSpec(name, shape, check_dtype(where, dtype or "float32"))


Opt = typer.Option
DEFAULT = DEFAULT_THRESHOLDS["int8_vs_fakequant"]
#: the model and data options every command that runs the recipe takes
TargetOption = Annotated[str, Opt("--target", "-t", help="tensorrt, openvino or onnxruntime")]
CalibrationOption = Annotated[
    str,
    Opt(
        help="Activation ranges: auto (minmax, mse or, on tensorrt, entropy: whichever is closer "
        "to fp32 on held-out calibration samples), minmax, percentile, mse or entropy (these "
        "clip outliers), ema."
    ),
]
ModelOption = Annotated[str | None, Opt(help="Zoo name (resnet18, ...) or pkg.module:factory.")]
InputShapeOption = Annotated[
    list[str] | None,
    Opt(help="Input shape (1x3x224x224), or per input NAME:SHAPE:DTYPE; repeatable."),
]
InputSpecOption = Annotated[
    Path | None, Opt(help="JSON: {name: {shape, dtype, range}} for each model input.")
]
DataOption = Annotated[Path | None, Opt(help="Calibration data: .npz file or image folder.")]
CalibBatchesOption = Annotated[int, Opt(help="Calibration batches.")]


@app.command("build")
def build_command(
    target: TargetOption,
    model: ModelOption = None,
    input_shape: InputShapeOption = None,
    input_spec: InputSpecOption = None,
    data: DataOption = None,
    calib_batches: CalibBatchesOption = 8,
    calibration: CalibrationOption = "auto",
    keep_float: Annotated[
        list[str] | None,
        Opt(help="Conv/Linear layers to keep float, module-path glob (classifier, *.attn.*)."),
    ] = None,
    accuracy_budget: Annotated[
        float | None,
        Opt(help="Keep the fewest layers float for this output cosine vs fp32 (e.g. 0.99)."),
    ] = None,
    tune_latency: Annotated[
        bool, Opt(help="Keep float the layers that time faster float on the target runtime.")
    ] = False,
    tune_budget: Annotated[
        float, Opt(help="Seconds --tune-latency may spend timing placements.")
    ] = DEFAULT_TUNE_BUDGET_S,
    tune_cache: Annotated[
        Path | None, Opt(help="Timing cache of --tune-latency (default ~/.cache/qat_deploy/...).")
    ] = None,
    qat_epochs: Annotated[int, Opt(help="QAT fine-tuning epochs on the calibration data.")] = 0,
    qat_loss: Annotated[
        str,
        Opt(help="auto (labels if the data has them, else distill), cross_entropy or distill."),
    ] = "auto",
    nproc: Annotated[
        int, Opt(help="QAT data-parallel over this many processes (gloo: trains on the CPU).")
    ] = 1,
    resume: Annotated[
        bool, Opt(help=f"Continue QAT from OUT/{CHECKPOINT_NAME}, saved after every epoch.")
    ] = False,
    out: Annotated[Path, Opt("--out", help="Output directory.")] = Path("out"),
    export_only: Annotated[bool, Opt(help="Stop after the linted QDQ model.")] = False,
    threads: Annotated[int, Opt(help="Inference threads.")] = 2,
    eval_samples: Annotated[int, Opt(help="Held-out samples for the accuracy check.")] = 1000,
    sm: Annotated[str | None, Opt(help="TensorRT compute capability for AOT builds.")] = None,
    debug_layers: Annotated[
        bool,
        Opt(help="Per quantizer: error entering vs arrived, engine vs fake-quant; layers.png."),
    ] = False,
    min_agreement: Annotated[
        float, Opt(help="Accuracy check: min int8-vs-fake-quant top-1 agreement.")
    ] = DEFAULT.min_top1_agreement,
    min_cosine: Annotated[
        float, Opt(help="Accuracy check: min int8-vs-fake-quant cosine.")
    ] = DEFAULT.min_cosine,
    max_err_steps: Annotated[
        float, Opt(help="Accuracy check: max p99.9 int8-vs-fake-quant error, output steps.")
    ] = DEFAULT.max_p999_err_steps,
) -> None:
    """Prepare, calibrate, (QAT), export, lint, build, verify kernels, check accuracy, time."""
    if nproc != 1 and not distributed.is_worker():
        if nproc < 1 or not qat_epochs:
            raise errors.BadInputError(
                "--nproc N (N >= 2) trains QAT data-parallel; add --qat-epochs"
            )
        if tune_latency:
            raise errors.BadInputError(recipe.TUNE_NOT_PARALLEL)
        raise typer.Exit(distributed.launch(nproc, sys.argv[1:]))
    w = distributed.join()
    shape, inputs = parse_inputs(input_shape, input_spec)
    options = BuildOptions(
        target=target,
        model=model,
        input_shape=shape,
        inputs=inputs,
        data=data,
        calib_batches=calib_batches,
        calibration=calibration,
        keep_float=tuple(keep_float or ()),
        accuracy_budget=accuracy_budget,
        tune_latency=tune_latency,
        tune_budget_s=tune_budget,
        tune_cache=tune_cache,
        qat_epochs=qat_epochs,
        qat_loss=qat_loss,
        qat_checkpoint=out / CHECKPOINT_NAME if qat_epochs else None,
        qat_resume=resume,
        out_dir=out,
        export_only=export_only,
        threads=threads,
        eval_samples=eval_samples,
        sm=sm,
        debug_layers=debug_layers,
        thresholds=Thresholds(min_agreement, min_cosine, max_err_steps),
    )
    if w.rank > 0:  # a data-parallel helper: trains with rank 0, which builds and reports
        recipe.check(options)
        recipe.quantize(recipe.load(options, evaluation=False), options)
        return
    columns = (TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("building", total=len(STAGES))
        report = build(options, lambda stage: bar.update(task, advance=1, description=stage))
    console.print(summary_table(report))
    console.print(f"report: {out / 'report.json'}")
    lines = "\n".join(f"  {line}" for line in next_commands(options))
    console.print(f"next:\n{lines}", markup=False, highlight=False, soft_wrap=True)


def next_commands(options: BuildOptions) -> list[str]:
    """What a user runs after a first build: the other targets, their own model, the linter,
    a side-by-side benchmark and the CI gate."""
    out, model = options.out_dir, options.model or DEFAULT_MODEL
    others = [t for t in available_targets() if t != options.target]
    same = f" --model {model}" if options.model else ""
    return [
        *(
            f"deploy build --target {t}{same} --out {_sibling(out, options.target, t)}"
            for t in others
        ),
        f"deploy build --target {options.target} --model package.module:factory "
        "--input-shape 1x3x224x224 --data images/   # your own model and data",
        f"deploy lint {out / QDQ_NAME} --target {options.target}",
        f"deploy bench -m {model} -t {options.target} -o {_sibling(out, options.target, 'bench')}",
        f"deploy check --baseline ci/baselines/{_file_name(model)}-{options.target}.json "
        f"--update-baseline --model {model} --target {options.target}   # CI latency gate",
    ]


def _sibling(out: Path, target: str, name: str) -> Path:
    """out/onnxruntime -> out/openvino; out -> out-openvino."""
    return out.parent / name if out.name == target else out.with_name(f"{out.name}-{name}")


def _file_name(model: str) -> str:
    return model.rsplit(":", 1)[-1].rsplit(".", 1)[-1]


def _calibration_row(report: dict) -> str:
    """The observer used, and with --calibration auto the scores it was chosen by."""
    choice = report.get("calibration_choice")
    if not choice:
        return report["calibration"]
    scores = ", ".join(f"{name} {cosine:.4f}" for name, cosine in choice["cosine"].items())
    return f"{report['calibration']} (auto; held-out fake-quant cosine vs fp32: {scores})"


def summary_table(report: dict) -> Table:
    table = Table(title=f"{report['model']['name']} on {report['target']}")
    table.add_column("item")
    table.add_column("value")
    kernels = report.get("kernels")
    if kernels:
        total = kernels["int8"] + kernels["float"]
        table.add_row("int8 compute layers", f"{kernels['int8']}/{total}")
    if "calibration" in report:
        table.add_row("calibration", _calibration_row(report))
    if report.get("kept_float"):
        table.add_row("kept float", ", ".join(report["kept_float"]))
    budget = report.get("accuracy_budget")
    if budget:
        table.add_row(
            "accuracy budget",
            f"cosine {budget['min_cosine']}: {budget['cosine_all_quantized']:.5f} all int8 -> "
            f"{budget['cosine']:.5f} with {len(budget['kept_float'])} layer(s) float "
            "(fake-quant, calibration data)",
        )
        if "latency" in budget:
            cost = budget["latency"]
            table.add_row(
                "accuracy budget cost",
                f"int8 speedup {cost['speedup_all_int8']:.2f}x all int8 -> "
                f"{cost['speedup']:.2f}x chosen ({cost['slowdown_vs_all_int8']:.2f}x the "
                "all-int8 engine's time, same run)",
            )
    tuning = report.get("latency_tuning")
    if tuning:
        table.add_row("latency tuning", _tuning_row(tuning))
    latency, speedup = report.get("latency_ms"), report.get("speedup")
    if latency and latency["measured"]:
        for precision in ("fp32", "int8"):
            row = latency[precision]
            table.add_row(
                f"{precision} latency p50 / p99", f"{row['p50']:.3f} / {row['p99']:.3f} ms"
            )
        table.add_row("int8 speedup (paired)", f"{speedup['value']:.2f}x")
        if speedup["value"] < 1.0:
            table.add_row("int8 slower because", _slower_int8_reason(report))
    elif latency:
        table.add_row("latency", f"not measured: {latency['reason']}")
    accuracy = report.get("accuracy")
    if accuracy and accuracy["measured"]:
        for label in ("int8_vs_fakequant", "reference_floor", "int8_vs_fp32"):
            m = accuracy[label]
            table.add_row(
                "fake-quant fp64 vs fp32" if label == "reference_floor" else label,
                f"top-1 agree {m['top1_agreement']:.4f}, cosine {m['cosine']:.5f}, "
                f"p99.9 err {m['p999_err_steps']:.2f} steps ({m['samples']} samples)",
            )
        if "int8_vs_fakequant_per_layer" in accuracy:
            v = accuracy["int8_vs_fakequant_per_layer"]
            table.add_row(
                "int8_vs_fakequant per layer",
                f"{'faithful' if v['faithful'] else 'DIFFERS'}: <= {v['worst_max_steps']:g} step "
                f"in <= {v['worst_mismatch']:.3%} of codes over {v['quantizers']} quantizers",
            )
        if "top1" in accuracy:
            t = accuracy["top1"]
            table.add_row(
                "top-1 accuracy",
                f"fp32 {t['fp32']:.4f}, fake-quant {t['fakequant']:.4f}, int8 {t['int8']:.4f}",
            )
    elif accuracy:
        table.add_row("accuracy", f"not measured: {accuracy['reason']}")
    if "fakequant_vs_fp32" in report:  # what could be checked where the engine cannot run
        m = report["fakequant_vs_fp32"]
        table.add_row(
            "fake-quant vs fp32",
            f"cosine {m['cosine']:.5f}, top-1 agree {m['top1_agreement']:.4f} "
            f"({m['samples']} samples; the engine it was built from could not run here)",
        )
    if "layers" in report:
        table.add_row("most error enters at", _worst_layers(report["layers"]))
        flagged = report["layers"]["flagged"]
        table.add_row(
            "flagged layers",
            f"{len(flagged)} quantizer(s) 12+ dB below the median" if flagged else "none",
        )
        engine = report["layers"]["engine"]
        if engine["measured"] and (
            engine["int8_compute_layers_marked"] != engine["int8_compute_layers"]
        ):
            table.add_row(
                "debug engine",
                f"marking changed fusions: {engine['int8_compute_layers_marked']} int8 layers "
                f"marked, {engine['int8_compute_layers']} unmarked",
            )
    table.add_row("status", report["status"])
    return table


def _slower_int8_reason(report: dict) -> str:
    """What a user can do when int8 lost to fp32: the usual cause on x86 is a CPU without int8
    dot-product instructions, where int8 convolutions gain little over fp32 FMA."""
    isa = report.get("environment", {}).get("isa", {})
    x86 = isa.get("avx2") or isa.get("avx512f")
    if x86 and not any(isa.get(flag) for flag in INT8_DOT_PRODUCT_FLAGS):
        cause = (
            "this CPU has no int8 dot-product instructions (VNNI/AMX), so int8 kernels gain "
            "little here"
        )
    else:
        cause = "this model's int8 kernels and Q/DQ transitions cost more than they save here"
    if report.get("latency_tuning"):
        return f"{cause}; even the tuned placement loses: fp32 is the faster engine to ship here"
    return f"{cause}; --tune-latency keeps float the layers that run faster float"


def _tuning_row(tuning: dict) -> str:
    """e.g. "12 of 54 layers float: 0.81x the untuned int8 time (3 changes, 58 s)"."""
    float_layers, ratio = tuning["float_layers"], tuning["time_ratio"]
    reverted = tuning["reverted"]
    if not tuning["regions"]:
        head = "no quantized weighted layer to move"
    elif not float_layers:
        if reverted and reverted["contended"]:
            why = "other processes took the CPU while the re-prepared placement was timed: reverted"
        elif reverted:
            why = f"the re-prepared placement timed {reverted['time_ratio']:.2f}x: reverted"
        else:
            why = f"no placement beat the untuned one by {tuning['threshold']:.0%}"
        head = f"all {tuning['regions']} layers int8 ({why})"
    else:
        head = (
            f"{len(float_layers)} of {tuning['regions']} layers float: {ratio:.2f}x the untuned "
            f"int8 time ({len(tuning['taken'])} change(s) taken)"
        )
    budget = ", budget spent" if tuning["exhausted"] else ""
    if tuning["retimed"]:
        budget += f", {tuning['retimed']} timing(s) retaken on a busy CPU"
    if tuning["contended"]:
        budget += f", {tuning['contended']} timed on a busy CPU (not cached, no gain taken)"
    cache = tuning["cache"]
    return f"{head}; {tuning['comparisons']} comparisons, {tuning['seconds']:.0f} s{budget}, " + (
        f"cache {cache['hits']} hit(s) / {cache['misses']} miss(es)"
    )


def _worst_layers(layers: dict, shown: int = 3) -> str:
    """The first rows of --debug-layers' ranking, e.g. "layer2.conv2 output 35.5 dB"."""
    rows = {row["tensor"]: row for row in layers["quantizers"]}
    worst = [rows[tensor] for tensor in layers["ranked"][:shown]]
    return ", ".join(
        f"{r['layer']} {'weight' if r['kind'] == 'weight' else 'output'} "
        + ("exact" if r["entering_db"] is None else f"{r['entering_db']:.1f} dB")
        for r in worst
    )
