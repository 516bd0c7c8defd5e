"""Our QDQ placement against the vendor quantization tools, on onnxruntime and OpenVINO.

For each model, in one run: the fp32 ONNX; our QDQ model by the onnxruntime rules and by the
OpenVINO rules; onnxruntime's quantize_static (QDQ, per-channel, uint8 activations, int8
weights; quantize_dynamic too for transformers; without the pre-processing's symbolic shapes
where they fail); NNCF's quantize on the ONNX model (when nncf is installed; image models with
attention get its TRANSFORMER type too). Every int8 model is calibrated on the same samples.
Each model is built on both runtimes, all of one runtime's engines are timed together in
interleaved blocks (deploy.engines.timing: re-warm before each block, rotating order), and
every int8 engine's outputs are compared with the fp32 engine's on held-out inputs, so a fast
but broken model cannot win; ours are also held to `deploy build`'s own check against their
fake-quant model (deploy.verify.engine_check), which sees an engine its runtime compiled wrong
where a bound against fp32 cannot. A variant whose file is an earlier one's byte for byte (ours
tuned where the search kept every layer int8) gets its paired ratio to that one: the run's own
A/A noise. Speedups and ours/best-vendor ratios are paired: the median over rounds of the
ratio of two blocks timed back to back (robust to load that comes and goes on a shared box).
Results go to docs/vs_vendor_results.json (merged per model); docs/performance.md explains them.

    python -m benchmarks.vs_vendor --model resnet18 --model mobilenet_v2 --model bert_tiny
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing
import os
import signal
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import onnx

from qat_deploy.deploy import recipe
from qat_deploy.deploy.common.environment import environment
from qat_deploy.deploy.common.errors import CheckFailedError
from qat_deploy.deploy.data import default_dataset
from qat_deploy.deploy.engines.adapter import get_adapter
from qat_deploy.deploy.engines.timing import (
    TimingConfig,
    paired_ratio,
    runner_call,
    summarize,
    time_interleaved,
)
from qat_deploy.deploy.frontend.prepare import PreparedModel
from qat_deploy.deploy.verify import closeness, engine_check, layer_debug
from qat_deploy.models import load_model

RUNTIMES = ("onnxruntime", "openvino")
CALIB_SAMPLES = 32
CALIB_BATCH = 8
HELD_OUT = 16
MIN_COSINE = 0.9  # below this an int8 variant counts as broken and cannot be "best"
OUT = Path(__file__).resolve().parents[1] / "docs" / "vs_vendor_results.json"


@dataclass(frozen=True)
class FakeQuantTwin:
    """One of our variants' fake-quant model and its outputs on the held-out inputs: what
    `deploy build` holds that variant's engine to (deploy.verify.engine_check)."""

    prepared: PreparedModel
    references: engine_check.References
    held_out: Mapping[str, np.ndarray]  # by the model's input names


@dataclass(frozen=True)
class Variant:
    name: str
    onnx: Path
    precision: str  # "fp32" or "int8"
    ours_for: str | None = None  # the runtime whose rules made it (our models only)
    vendor: bool = False
    note: str = ""
    twin: FakeQuantTwin | None = None  # ours only


@dataclass
class Row:
    runtime: str
    variant: str
    p50: float
    p90: float
    speedup: float
    vs_best_vendor: float | None
    int8_layers: str
    cosine: float
    centred_cosine: float
    note: str = ""
    #: ours only: why the engine fails `deploy build`'s check against its fake-quant model
    #: ("" where it passes)
    build_check: str = ""
    #: where an earlier variant is the same file byte for byte (ours tuned, where the search
    #: kept every layer int8): this one's paired time over that one's, the run's own A/A noise
    same_file_ratio: float | None = None


# ---- models ---------------------------------------------------------------------------------


def our_variant(
    loaded: recipe.Loaded,
    target: str,
    out: Path,
    held_out: Mapping[str, np.ndarray],
    tuning: Tuning | None = None,
) -> Variant:
    """The QDQ model `deploy build` would ship (deploy.recipe), calibrated on the samples
    every vendor tool gets, in batches of CALIB_BATCH; with `tuning`, as `deploy build
    --tune-latency` ships it (placement timed on `target`'s runtime). Its fake-quant model's
    outputs on `held_out` come with it, for the build's engine check."""
    plan = recipe.Recipe(
        target=target,
        model=loaded.spec.name,
        batch_size=CALIB_BATCH,
        calib_batches=math.ceil(len(loaded.calib) / CALIB_BATCH),
        tune_latency=tuning is not None,
        tune_budget_s=tuning.budget_s if tuning else recipe.DEFAULT_TUNE_BUDGET_S,
        tune_cache=tuning.cache if tuning else None,
        threads=tuning.threads if tuning else 2,
    )
    prepared = recipe.quantize(loaded, plan)
    label = "ours tuned" if tuning else "ours"
    qdq_name = f"{label.replace(' ', '_')}_{target}.onnx"
    path = recipe.export_onnx(loaded, prepared, out, ["int8"], qdq_name=qdq_name)["int8"]
    note = tuning_note(prepared.plan.latency_tuning) if tuning else ""
    references = engine_check.references(loaded.model, prepared, loaded.spec, held_out)
    twin = FakeQuantTwin(prepared, references, held_out)
    return Variant(f"{label} ({target} rules)", path, "int8", target, note=note, twin=twin)


def tuning_note(t: dict) -> str:
    """What the latency search did, for the row: which layers it took float (by name, so a
    cold run that ends elsewhere can be told apart), its time, the gain it asked of a change
    (twice the noise it measured: a noisy run takes nothing), a placement its final timing
    reverted, and any contended timings."""
    floated = f" ({', '.join(t['float_layers'])})" if t["float_layers"] else ""
    note = f"tuned: {len(t['float_layers'])}/{t['regions']} layers float{floated}"
    note += f", {t['seconds']:.0f} s"
    if "threshold" in t:
        note += f", a change had to gain {t['threshold']:.1%}"
    if t.get("reverted"):
        back = t["reverted"]
        note += (
            f", reverted {len(back['float_layers'])} float layers "
            f"(time ratio {back['time_ratio']:.3f}{', contended' if back['contended'] else ''})"
        )
    if t["retimed"] or t["contended"]:  # other processes took the CPU while it timed
        note += f", {t['retimed']} timings retaken, {t['contended']} still contended"
    return note


@dataclass(frozen=True)
class Tuning:
    """--tuned: our variant with deploy build --tune-latency's search, on each runtime."""

    budget_s: float
    cache: Path | None
    threads: int


Inputs = np.ndarray | dict[str, np.ndarray]  # one input named "input", or inputs by name


def samples(inputs: Inputs) -> list[dict[str, np.ndarray]]:
    """The feeds of each sample (batch 1): token models (input_ids, attention_mask) too."""
    named = inputs if isinstance(inputs, dict) else {"input": inputs}
    count = len(next(iter(named.values())))
    return [{k: v[i : i + 1] for k, v in named.items()} for i in range(count)]


def ort_variants(fp32: Path, calib: Inputs, transformer: bool, out: Path) -> list[Variant]:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_dynamic,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(samples(calib))

        def get_next(self):
            return next(self.items, None)

    pre = out / "fp32_ort_pre.onnx"  # the tool's recommended pre-processing step
    note = ""
    try:
        quant_pre_process(str(fp32), str(pre))
    except Exception as exc:  # its symbolic shape inference fails on some graphs (EdgeNeXt)
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        note = f"pre-processed without symbolic shapes ({type(exc).__name__})"
    static = out / "ort_static.onnx"
    quantize_static(
        str(pre),
        str(static),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    variants = [Variant("ort quantize_static", static, "int8", vendor=True, note=note)]
    if transformer:
        dynamic = out / "ort_dynamic.onnx"
        quantize_dynamic(str(pre), str(dynamic), per_channel=True, weight_type=QuantType.QInt8)
        variants.append(Variant("ort quantize_dynamic", dynamic, "int8", vendor=True, note=note))
    return variants


def nncf_variant(fp32: Path, calib: Inputs, transformer: bool, out: Path) -> Variant:
    import nncf

    feeds = samples(calib)
    kind = {"model_type": nncf.ModelType.TRANSFORMER} if transformer else {}
    quantized = nncf.quantize(
        onnx.load(str(fp32)), nncf.Dataset(feeds), subset_size=len(feeds), **kind
    )
    path = out / ("nncf_transformer.onnx" if transformer else "nncf.onnx")
    onnx.save(quantized, str(path))
    name = "nncf quantize (transformer)" if transformer else "nncf quantize"
    return Variant(name, path, "int8", vendor=True)


def nncf_variants(fp32: Path, calib: Inputs, transformer: bool, out: Path) -> list[Variant]:
    return [nncf_variant(fp32, calib, kind, out) for kind in nncf_recipes(fp32, transformer)]


def nncf_recipes(fp32: Path, transformer: bool) -> tuple[bool, ...]:
    """Whether each NNCF run uses its TRANSFORMER type: an image model with attention (a
    Softmax) gets both NNCF's default and the type it documents for transformers, and the
    faster sound one counts."""
    hybrid = not transformer and has_op(fp32, "Softmax")
    return (False, True) if hybrid else (transformer,)


def has_op(path: Path, op_type: str) -> bool:
    return any(
        n.op_type == op_type for n in onnx.load(str(path), load_external_data=False).graph.node
    )


def make_variants(
    name: str, out: Path, tuning: Tuning | None = None
) -> tuple[list[Variant], Inputs, list[str]]:
    model, spec = load_model(name)
    loaded = recipe.Loaded(model, spec, default_dataset(spec, CALIB_SAMPLES, split="calib"), None)
    calib = loaded.calib.inputs
    evaluation = default_dataset(spec, HELD_OUT, split="eval")
    held_out, by_name = evaluation.inputs, evaluation.arrays(spec.inputs)
    # token models take the vendors' transformer recipes: quantize_dynamic, NNCF TRANSFORMER
    transformer = name.startswith("bert") or any(i.dtype.startswith("int") for i in spec.inputs)
    fp32 = recipe.export_onnx(loaded, None, out, ["fp32"])["fp32"]
    variants = [Variant("fp32", fp32, "fp32")]
    variants += [our_variant(loaded, t, out, by_name) for t in RUNTIMES]
    if tuning is not None:
        variants += [our_variant(loaded, t, out, by_name, tuning) for t in RUNTIMES]
    notes: list[str] = []
    for label, make in (
        ("onnxruntime.quantization", lambda: ort_variants(fp32, calib, transformer, out)),
        ("nncf", lambda: nncf_variants(fp32, calib, transformer, out)),
    ):
        try:
            variants += make()
        except Exception as exc:  # a vendor tool failing is a result, not a crash
            notes.append(f"{label} failed: {type(exc).__name__}: {exc}".splitlines()[0])
    return variants, held_out, notes


# ---- measurement ----------------------------------------------------------------------------


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine of the held-out outputs, all inputs stacked into one vector."""
    a, b = a.ravel(), b.ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def centred_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """The same after removing the fp32 mean output: only the input-dependent part, which on
    random-weight models is small, so int8 noise shows much more (reported, not gated)."""
    mean = b.mean(axis=0, keepdims=True)
    return cosine(a - mean, b - mean)


def timed_on(runtime: str, variants: list[Variant], own_rules_only: bool) -> list[Variant]:
    """The variants timed on `runtime`: all, or (--own-rules-only) none of ours made by the
    other runtime's rules, which the verdict never reads and which cost a third of the run."""
    if not own_rules_only:
        return variants
    return [v for v in variants if v.ours_for in (None, runtime)]


def died_of(target: Callable[..., object], *args) -> str | None:
    """Run target(*args) in a spawned child process: the name of the signal it died of, or
    None when it returned or raised (an exception shows again when the parent does the same)."""
    child = multiprocessing.get_context("spawn").Process(target=_quietly, args=(target, *args))
    child.start()
    child.join()
    code = child.exitcode
    return signal.Signals(-code).name if code is not None and code < 0 else None


def _quietly(target: Callable[..., object], *args) -> None:
    try:
        target(*args)
    except Exception:
        pass


def _build_and_run(runtime: str, onnx_path: Path, precision: str, threads: int, feed) -> None:
    adapter = get_adapter(runtime)
    with tempfile.TemporaryDirectory() as tmp:
        runner = adapter.runner(
            adapter.build(onnx_path, Path(tmp), precision=precision, threads=threads)
        )
        runner.activate()
        try:
            runner_call(runner, feed)()
        finally:
            runner.deactivate()


def survivors(
    runtime: str, variants: list[Variant], held_out: Inputs, threads: int
) -> tuple[list[Variant], list[str]]:
    """The variants `runtime` builds and runs without dying, with a note for each other one.
    A runtime crashing on a vendor's model (OpenVINO's CPU plugin segfaulted compiling
    quantize_static's MixNet-S) would end the whole run, so each vendor model is tried once in
    a child process; ours are built in-process, where a crash is our bug to see."""
    kept, notes = [], []
    feed = samples(held_out)[0]
    for v in variants:
        crash = v.vendor and died_of(_build_and_run, runtime, v.onnx, v.precision, threads, feed)
        if crash:
            notes.append(f"{runtime}: {v.name} does not build: {runtime} died of {crash}")
        else:
            kept.append(v)
    return kept, notes


def measure(
    runtime: str, variants: list[Variant], held_out: Inputs, threads: int, cfg: TimingConfig
) -> tuple[list[Row], list[str]]:
    adapter = get_adapter(runtime)
    built, reports, notes = {}, {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for v in variants:
            out = Path(tmp) / v.name.replace(" ", "_").replace("(", "").replace(")", "")
            out.mkdir()
            try:
                built[v.name] = adapter.build(v.onnx, out, precision=v.precision, threads=threads)
                reports[v.name] = adapter.kernel_report(built[v.name])
            except Exception as exc:
                notes.append(f"{runtime}: {v.name} does not build: {exc}".splitlines()[0])
        runners = {name: adapter.runner(engine) for name, engine in built.items()}
        for r in runners.values():
            r.activate()
        feeds = samples(held_out)
        try:
            outputs = {
                name: np.concatenate([first_output(r, feed) for feed in feeds])
                for name, r in runners.items()
            }
            feed = feeds[0]
            fns: dict[str, Callable[[], object]] = {
                name: runner_call(r, feed) for name, r in runners.items()
            }
            raw = time_interleaved(fns, cfg)
            times = {name: summarize(ms) for name, ms in raw.items()}
        finally:
            for r in runners.values():
                r.deactivate()
    cos = {name: cosine(out, outputs["fp32"]) for name, out in outputs.items()}
    centred = {name: centred_cosine(out, outputs["fp32"]) for name, out in outputs.items()}
    checks = {
        v.name: build_check(v, outputs[v.name], runtime, len(reports[v.name].int8_compute), threads)
        for v in variants
        if v.twin is not None and v.name in outputs
    }
    notes += [f"{runtime}: {name} {why}" for name, why in checks.items() if why]
    vendor = [
        v.name for v in variants if v.vendor and v.name in times and cos[v.name] >= MIN_COSINE
    ]
    best = min(vendor, key=lambda n: times[n].p50, default=None)
    same_file = same_files(variants)
    rows = []
    for v in variants:
        if v.name not in times:
            continue
        t, rep = times[v.name], reports[v.name]
        failed_check = checks.get(v.name, "")
        ok = v.precision == "fp32" or (cos[v.name] >= MIN_COSINE and not failed_check)
        rows.append(
            Row(
                runtime=runtime,
                variant=v.name,
                p50=t.p50,
                p90=t.p90,
                speedup=paired_ratio(raw["fp32"], raw[v.name], cfg.block),
                vs_best_vendor=paired_ratio(raw[v.name], raw[best], cfg.block)
                if v.ours_for and best
                else None,
                int8_layers=f"{len(rep.int8_compute)}/{len(rep.compute_layers)}",
                cosine=cos[v.name],
                centred_cosine=centred[v.name],
                build_check=failed_check,
                same_file_ratio=paired_ratio(raw[v.name], raw[same_file[v.name]], cfg.block)
                if same_file.get(v.name) in raw
                else None,
                note=("" if ok else "BROKEN (engine check)" if failed_check else "BROKEN (cosine)")
                + (f" {v.note}" if v.note and v.ours_for in (None, runtime) else "")
                + (" <- target runtime" if v.ours_for == runtime else "")
                + (" best vendor" if v.name == best else ""),
            )
        )
    return rows, notes


def same_files(variants: list[Variant]) -> dict[str, str]:
    """Each variant whose file is byte for byte an earlier variant's, mapped to that one."""
    first: dict[str, str] = {}
    same = {}
    for v in variants:
        digest = hashlib.sha256(v.onnx.read_bytes()).hexdigest()
        if digest in first:
            same[v.name] = first[digest]
        else:
            first[digest] = v.name
    return same


def build_check(
    v: Variant, engine_out: np.ndarray, runtime: str, int8_layers: int, threads: int
) -> str:
    """ "" where our engine passes `deploy build`'s check against its fake-quant model
    (deploy.verify.engine_check, the build's own bounds), else the check's failure: an engine
    its runtime compiled wrong is reported, not timed as a result."""
    twin = v.twin
    bounds = closeness.DEFAULT_THRESHOLDS[engine_check.FAKEQUANT]  # deploy build's default
    results, thresholds = engine_check.compare_engine(engine_out, twin.references, bounds)

    def per_layer():
        feeds = engine_check.layer_feeds(v.onnx, twin.held_out, 1, HELD_OUT)
        adapter = get_adapter(runtime)
        layers = layer_debug.analyse(v.onnx, {}, feeds, adapter, int8_layers, threads)
        return engine_check.per_layer_verdict(layers, v.onnx, twin.prepared)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", engine_check.EngineAmplificationWarning)
        try:
            engine_check.require_faithful(results, thresholds[engine_check.FAKEQUANT], per_layer)
        except CheckFailedError as exc:
            return f"fails deploy build's engine check: {exc}"
    return ""


def median_rows(runs: list[list[Row]]) -> list[Row]:
    """One row per variant: the median of each timing figure over the runs (the engines are
    rebuilt and re-timed each run), the other columns from the first run."""
    if len(runs) == 1:
        return runs[0]
    out = []
    for first in runs[0]:
        same = [r for run in runs for r in run if r.variant == first.variant]
        vs_best = [r.vs_best_vendor for r in same if r.vs_best_vendor is not None]
        aa = [r.same_file_ratio for r in same if r.same_file_ratio is not None]
        out.append(
            replace(
                first,
                p50=float(np.median([r.p50 for r in same])),
                p90=float(np.median([r.p90 for r in same])),
                speedup=float(np.median([r.speedup for r in same])),
                vs_best_vendor=float(np.median(vs_best)) if vs_best else None,
                same_file_ratio=float(np.median(aa)) if aa else None,
                note=f"{first.note} (median of {len(same)} runs)".strip(),
            )
        )
    return out


def first_output(runner, feed: dict[str, np.ndarray]) -> np.ndarray:
    return np.asarray(next(iter(runner.infer(feed).values())), dtype=np.float64)


# ---- machine and reporting ------------------------------------------------------------------


def machine() -> dict[str, object]:
    """The shared environment record, plus NNCF's version (a benchmark-only dependency)."""
    env = environment()
    try:
        import nncf

        env["versions"]["nncf"] = nncf.__version__
    except ImportError:
        env["versions"]["nncf"] = "not installed"
    return env


def wait_for_quiet(max_load: float, tries: int) -> float:
    """Wait (60 s at a time, `tries` times at most) for the 1-minute load to drop."""
    for _ in range(tries):
        if os.getloadavg()[0] <= max_load:
            break
        print(f"load {os.getloadavg()[0]:.2f} > {max_load}: waiting 60 s")
        time.sleep(60)
    return os.getloadavg()[0]


def table(rows: list[Row]) -> str:
    head = "| runtime | model variant | median ms | p90 ms | speedup vs fp32 | ours/best vendor"
    head += " | int8 compute layers | cosine vs fp32 | centred cosine | note |"
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        ratio = f"{r.vs_best_vendor:.2f}" if r.vs_best_vendor is not None else ""
        same = f" A/A {r.same_file_ratio:.3f}" if r.same_file_ratio is not None else ""
        lines.append(
            f"| {r.runtime} | {r.variant} | {r.p50:.2f} | {r.p90:.2f} | {r.speedup:.2f}x "
            f"| {ratio} | {r.int8_layers} | {r.cosine:.4f} | {r.centred_cosine:.3f} "
            f"| {r.note.strip()}{same} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", dest="models", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=3.0, help="min timed time per engine")
    parser.add_argument("--max-load", type=float, default=1.5)
    parser.add_argument("--load-tries", type=int, default=5)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--repeat", type=int, default=1, help="runs per runtime (medians)")
    parser.add_argument("--tuned", action="store_true", help="add ours with --tune-latency")
    parser.add_argument("--tune-budget", type=float, default=recipe.DEFAULT_TUNE_BUDGET_S)
    parser.add_argument("--tune-cache", type=Path, default=None)
    parser.add_argument(
        "--own-rules-only",
        action="store_true",
        help="time ours on each runtime only as built by that runtime's rules",
    )
    args = parser.parse_args()
    tuning = Tuning(args.tune_budget, args.tune_cache, args.threads) if args.tuned else None
    cfg = TimingConfig(warmup=20, block=20, min_runs=100, min_time_s=args.seconds, rewarm=5)
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results["machine"] = machine()
    warnings.filterwarnings("ignore")
    for name in args.models or ["resnet18"]:
        with tempfile.TemporaryDirectory() as tmp:
            variants, held_out, notes = make_variants(name, Path(tmp), tuning)
            rows: list[Row] = []
            loads = []
            for runtime in RUNTIMES:
                runs = []
                here = timed_on(runtime, variants, args.own_rules_only)
                here, crashed = survivors(runtime, here, held_out, args.threads)
                notes += crashed
                for _ in range(args.repeat):
                    before = wait_for_quiet(args.max_load, args.load_tries)
                    got, more = measure(runtime, here, held_out, args.threads, cfg)
                    runs.append(got)
                    notes += [n for n in more if n not in notes]
                    after = os.getloadavg()[0]
                    loads.append({"runtime": runtime, "before": before, "after": after})
                rows += median_rows(runs)
        print(f"\n## {name} (batch 1, {args.threads} threads)\n\n{table(rows)}")
        for line in notes:
            print(f"- {line}")
        print(f"- load average (1 min): {loads}")
        results[name] = {
            "threads": args.threads,
            "rows": [asdict(r) for r in rows],
            "notes": notes,
            "load": loads,
            "timing": asdict(cfg),
            "date": time.strftime("%Y-%m-%d %H:%M"),
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
