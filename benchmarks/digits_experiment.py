"""The seed article's experiment on real data (scikit-learn digits), end to end.

fp32 mnist_cnn -> PTQ and QAT at 2..8 bits (weights and activations) under the TensorRT and
onnxruntime rule sets -> the 8-bit QAT models exported to QDQ ONNX and run as int8 engines on
onnxruntime and OpenVINO, scored on the held-out test split against the fake-quant model and fp32.
Writes digits_results.json, digits_experiment.md and digits_bits.png into --out (default docs/).

    python -m benchmarks.digits_experiment            # 2..8 bits, 3 seeds, 3 QAT epochs
    python -m benchmarks.digits_experiment --quick    # 2 and 8 bits, 1 seed, 1 QAT epoch
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from qat_deploy import deploy
from qat_deploy.deploy.data import digits_split
from qat_deploy.deploy.engines.adapter import get_adapter
from qat_deploy.deploy.export.qdq import export
from qat_deploy.models import load_model

RULE_SETS = ("tensorrt", "onnxruntime")
ENGINES = ("onnxruntime", "openvino")
#: uint8 activations: with int8 ones onnxruntime leaves most x86 convolutions in float.
DEPLOY_RULES = "onnxruntime"
PTQ_OBSERVERS = ("minmax", "mse")  # the PTQ, and the strongest range choice we have
BATCH = 64
CALIB_BATCH = 256
FP32_EPOCHS = 10
FP32_LR = 3e-3
THREADS = 1  # the machine's 2 cores are shared; one thread also keeps runs reproducible
DOCS = Path(__file__).resolve().parents[1] / "docs"
COMMAND = "python -m benchmarks.digits_experiment"


@dataclass(frozen=True)
class QatVariant:
    """One QAT recipe. The seed article's learning-rate trick is the lr/10 + cosine pair:
    fine-tune far more gently than the fp32 run trained, and anneal to zero."""

    name: str
    learnable: bool  # LSQ scales learned by gradient; else EMA-observed ranges with the STE
    lr: float
    cosine: bool


VARIANTS = (
    QatVariant("ema_lr3e-3", False, FP32_LR, False),
    QatVariant("ema_lr3e-4_cosine", False, FP32_LR / 10, True),
    QatVariant("lsq_lr3e-3", True, FP32_LR, False),
    QatVariant("lsq_lr3e-4_cosine", True, FP32_LR / 10, True),
)


@dataclass(frozen=True)
class Config:
    bits: tuple[int, ...]
    seeds: tuple[int, ...]
    qat_epochs: int
    deploy: tuple[str, ...]  # QAT variants exported and deployed at 8 bits (seed 0)


FULL = Config(
    bits=tuple(range(2, 9)), seeds=(0, 1, 2), qat_epochs=3, deploy=tuple(v.name for v in VARIANTS)
)
#: One variant per export path (observer-driven and LSQ): each export costs seconds.
QUICK = Config(
    bits=(2, 8), seeds=(0,), qat_epochs=1, deploy=("ema_lr3e-4_cosine", "lsq_lr3e-4_cosine")
)


class Digits(NamedTuple):
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits() -> Digits:
    """The project's fixed stratified split (1,437 train / 360 test), upsampled to 16x16."""
    d = digits_split(upsample_to=16)
    return Digits(*map(torch.from_numpy, (d.x_train, d.y_train, d.x_test, d.y_test)))


class Shuffled:
    """Train (x, y) mini-batches in a fresh seeded order every epoch: a shuffling DataLoader
    without its per-sample indexing and collation, which costs more than the tiny model."""

    def __init__(self, data: Digits, seed: int) -> None:
        self.x, self.y = data.x_train, data.y_train
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return -(-len(self.x) // BATCH)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(self.x), generator=self.generator)
        for idx in order.split(BATCH):
            yield self.x[idx], self.y[idx]


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def adam(params, lr: float, cosine_steps: int | None = None) -> torch.optim.Adam:
    """Adam, optionally cosine-annealed to zero over cosine_steps. train_qat takes no scheduler,
    so the schedule advances from the optimizer's own post-step hook."""
    optimizer = torch.optim.Adam(params, lr=lr)
    if cosine_steps:
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, cosine_steps)
        optimizer.register_step_post_hook(lambda *_: schedule.step())
    return optimizer


def train_fp32(data: Digits, seed: int) -> nn.Module:
    """The float baseline every quantized number is compared with (Adam + cosine, 10 epochs)."""
    model, _ = load_model("mnist_cnn", seed=seed)
    loader = Shuffled(data, seed)
    optimizer = adam(model.parameters(), FP32_LR, FP32_EPOCHS * len(loader))
    model.train()
    for _ in range(FP32_EPOCHS):
        for xb, yb in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            optimizer.step()
    return model.eval()


def calibrated(
    model: nn.Module, rules: str, bits: int, data: Digits, observer: str, learnable: bool = False
) -> deploy.PreparedModel:
    """Fake-quantized copy of `model` with ranges observed on the whole train split."""
    prepared = deploy.prepare(
        model, rules, data.x_train[:1], bits=bits, observer=observer, learnable=learnable
    )
    deploy.calibrate(prepared, data.x_train.split(CALIB_BATCH), progress=False)
    return prepared


def qat(
    model: nn.Module,
    rules: str,
    bits: int,
    variant: QatVariant,
    data: Digits,
    epochs: int,
    seed: int,
) -> deploy.PreparedModel:
    """PTQ-initialised QAT. BN statistics and EMA ranges freeze halfway, as Krishnamoorthi
    (2018) recommends, so the second half trains against the exact deployed arithmetic."""
    observer = "minmax" if variant.learnable else "ema"  # LSQ: the observer only initialises
    prepared = calibrated(model, rules, bits, data, observer, variant.learnable)
    loader = Shuffled(data, seed)
    steps = epochs * len(loader)
    optimizer = adam(prepared.parameters(), variant.lr, steps if variant.cosine else None)
    deploy.train_qat(
        prepared,
        loader,
        epochs=epochs,
        optimizer=optimizer,
        freeze_bn_after=steps // 2,
        freeze_observers_after=steps // 2,
        progress=False,
    )
    return prepared


def stats(values: list[float]) -> dict:
    """Mean, sample spread and per-seed values, all as accuracy fractions."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "per_seed": values}


def sweep_point(
    fp32: dict[int, nn.Module], rules: str, bits: int, data: Digits, cfg: Config
) -> tuple[dict, dict[str, deploy.PreparedModel]]:
    """PTQ and every QAT variant at one (rule set, bit width) over all seeds; also returns the
    first seed's QAT models, which the 8-bit deployment step exports."""
    ptq = {
        f"ptq_{obs}": stats(
            [accuracy(calibrated(fp32[s], rules, bits, data, obs), *data[2:]) for s in cfg.seeds]
        )
        for obs in PTQ_OBSERVERS
    }
    runs: dict[str, dict] = {}
    first: dict[str, deploy.PreparedModel] = {}
    for variant in VARIANTS:
        accs = []
        for seed in cfg.seeds:
            model = qat(fp32[seed], rules, bits, variant, data, cfg.qat_epochs, seed)
            accs.append(accuracy(model, *data[2:]))
            first.setdefault(variant.name, model)
        runs[variant.name] = stats(accs)
    best = max(runs, key=lambda name: runs[name]["mean"])
    return {**ptq, "qat": runs, "qat_best": best}, first


def deployed(
    prepared: deploy.PreparedModel, fp32_accuracy: float, data: Digits, workdir: Path
) -> dict:
    """Export to QDQ ONNX, build int8 engines, and score them on the test split."""
    onnx_path = export(prepared, workdir / "model.onnx", data.x_train[:1], dynamic_batch=True)
    with torch.no_grad():
        reference = prepared(data.x_test).argmax(1).numpy()
    fake_quant = float((reference == data.y_test.numpy()).mean())
    row = {"fp32": fp32_accuracy, "fake_quant": fake_quant}
    for name in ENGINES:
        adapter = get_adapter(name)
        engine = adapter.build(onnx_path, workdir / name, precision="int8", threads=THREADS)
        with adapter.runner(engine) as runner:
            pred = runner.infer({"input": data.x_test.numpy()})["output"].argmax(1)
        report = adapter.kernel_report(engine)
        row[name] = {
            "accuracy": float((pred == data.y_test.numpy()).mean()),
            "agreement_with_fake_quant": float((pred == reference).mean()),
            "int8_compute_layers": len(report.int8_compute),
            "compute_layers": len(report.compute_layers),
            "float_layers": report.fallback_layers,
        }
    return row


def environment() -> dict:
    names = ("torch", "onnx", "onnxscript", "onnxruntime", "openvino", "numpy", "scikit-learn")
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "engine_threads": THREADS,
        "versions": {name: metadata.version(name) for name in names},
    }


def acceptance(results: dict) -> dict:
    """The issue's acceptance figures, in points (1 test sample = 100/360 = 0.28 points)."""
    checks: dict = {"fp32_min_ge_97": min(results["fp32"]["per_seed"]) >= 0.97, "deployment": {}}
    for variant, row in results["deployment"].items():
        checks["deployment"][variant] = {}
        for engine in ENGINES:
            acc = row[engine]["accuracy"]
            checks["deployment"][variant][engine] = {
                "points_vs_fp32": 100 * (acc - row["fp32"]),
                "points_vs_fake_quant": 100 * (acc - row["fake_quant"]),
                "within_0.3_of_fp32": row["fp32"] - acc <= 0.003 + 1e-9,
                "within_0.2_of_fake_quant": abs(acc - row["fake_quant"]) <= 0.002 + 1e-9,
            }
    if 3 in results["config"]["bits"]:
        checks["qat_minus_ptq_at_3_bits"] = {}
        for rules in RULE_SETS:
            point = results["sweep"][rules]["3"]
            ptq = point["ptq_minmax"]["mean"]
            gain = point["qat"][point["qat_best"]]["mean"] - ptq
            checks["qat_minus_ptq_at_3_bits"][rules] = {
                "points": 100 * gain,
                "ge_10": gain >= 0.10,
                "ptq_loss_vs_fp32_points": 100 * (results["fp32"]["mean"] - ptq),
            }
    return checks


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Tiny convolutions gain nothing from more threads and suffer badly when the shared cores
    are busy; one thread also makes runs reproducible. Restored afterwards for callers."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run(cfg: Config, log: Callable[[str], None] = print) -> dict:
    """The whole experiment; returns every number (the dict written to digits_results.json)."""
    with torch_threads(THREADS):
        return _run(cfg, log)


def _run(cfg: Config, log: Callable[[str], None]) -> dict:
    start = time.perf_counter()
    data = load_digits()
    fp32 = {seed: train_fp32(data, seed) for seed in cfg.seeds}
    results: dict = {
        "config": {**asdict(cfg), "variants": [asdict(v) for v in VARIANTS]},
        "fp32": stats([accuracy(fp32[s], *data[2:]) for s in cfg.seeds]),
        "test_samples": len(data.y_test),
        "sweep": {rules: {} for rules in RULE_SETS},
    }
    log(f"fp32 {results['fp32']['per_seed']} ({time.perf_counter() - start:.0f} s)")
    to_deploy: dict[str, deploy.PreparedModel] = {}
    for rules in RULE_SETS:
        for bits in cfg.bits:
            point, first_seed = sweep_point(fp32, rules, bits, data, cfg)
            results["sweep"][rules][str(bits)] = point
            if rules == DEPLOY_RULES and bits == 8:
                to_deploy = first_seed
            best = point["qat"][point["qat_best"]]["mean"]
            log(
                f"{rules} {bits} bits: PTQ {point['ptq_minmax']['mean']:.4f} "
                f"QAT {best:.4f} ({time.perf_counter() - start:.0f} s)"
            )
    fp32_first = results["fp32"]["per_seed"][0]
    with tempfile.TemporaryDirectory() as tmp:
        results["deployment"] = {
            name: deployed(model, fp32_first, data, Path(tmp) / name)
            for name, model in to_deploy.items()
            if name in cfg.deploy
        }
    results["acceptance"] = acceptance(results)
    results["environment"] = environment()
    results["runtime_s"] = time.perf_counter() - start
    return results


def write_json(results: dict, out: Path) -> Path:
    path = out / "digits_results.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path


def pct(s: dict) -> str:
    return f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}"


def sweep_table(results: dict, rules: str) -> list[str]:
    names = [v.name for v in VARIANTS]
    head = ["bits", "PTQ min-max", "PTQ MSE", *(f"QAT {n}" for n in names), "best QAT", "gain"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for bits, point in results["sweep"][rules].items():
        best = point["qat"][point["qat_best"]]
        gain = 100 * (best["mean"] - point["ptq_minmax"]["mean"])
        cells = [
            bits,
            pct(point["ptq_minmax"]),
            pct(point["ptq_mse"]),
            *(pct(point["qat"][n]) for n in names),
            f"{pct(best)} ({point['qat_best']})",
            f"{gain:+.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def deployment_table(results: dict) -> list[str]:
    lines = [
        "| QAT variant (8 bits, seed 0) | fp32 | fake-quant | onnxruntime int8 | OpenVINO int8 "
        "| agreement with fake-quant (ORT / OV) | int8 compute layers (ORT / OV) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in results["deployment"].items():
        ort, ov = row["onnxruntime"], row["openvino"]
        lines.append(
            f"| {name} | {100 * row['fp32']:.2f} | {100 * row['fake_quant']:.2f} "
            f"| {100 * ort['accuracy']:.2f} | {100 * ov['accuracy']:.2f} "
            f"| {100 * ort['agreement_with_fake_quant']:.1f}% / "
            f"{100 * ov['agreement_with_fake_quant']:.1f}% "
            f"| {ort['int8_compute_layers']}/{ort['compute_layers']} / "
            f"{ov['int8_compute_layers']}/{ov['compute_layers']} |"
        )
    return lines


def lr_trick_table(results: dict) -> list[str]:
    """Per rule set and method: 3e-4 + cosine minus 3e-3 held constant, in points, per bit width."""
    bits = list(results["sweep"][RULE_SETS[0]])
    lines = [
        "| rule set, method | " + " | ".join(f"{b} bits" for b in bits) + " |",
        "|---|" + "---|" * len(bits),
    ]
    for rules in RULE_SETS:
        for method in ("ema", "lsq"):
            cells = [f"{lr_trick_gain(results, rules, method, b):+.1f}" for b in bits]
            lines.append(f"| {rules}, {method} | " + " | ".join(cells) + " |")
    return lines


def lr_trick_gain(results: dict, rules: str, method: str, bits: str) -> float:
    qat = results["sweep"][rules][bits]["qat"]
    return 100 * (qat[f"{method}_lr3e-4_cosine"]["mean"] - qat[f"{method}_lr3e-3"]["mean"])


def write_markdown(results: dict, out: Path, command: str) -> Path:
    """The report: numbers come from `results`; the prose says how to read them."""
    fp32, cfg = results["fp32"], results["config"]
    lines = [
        "# Digits: PTQ vs QAT at 2..8 bits, and int8 deployment",
        "",
        "The seed article's experiment on real data: scikit-learn's digits (1,437 train / "
        f"{results['test_samples']} test images, 16x16), the two-conv mnist_cnn, weights and "
        "activations at the same bit width. One test image is "
        f"{100 / results['test_samples']:.2f} points.",
        "",
        "Regenerate from the repository root (this run took "
        f"{results['runtime_s'] / 60:.1f} min on 2 shared cores):",
        "",
        f"    {command}",
        "",
        "Setup: fp32 = Adam lr 3e-3 with cosine decay, 10 epochs, batch 64. PTQ calibrates on the "
        "whole train split (activation ranges by min-max, the issue's PTQ, or by MSE; weights "
        "per-channel min-max). QAT starts from that PTQ model and fine-tunes "
        f"{cfg['qat_epochs']} epochs; BN statistics and EMA ranges freeze halfway. Variants: "
        "EMA ranges + STE (`ema`) or learned LSQ scales (`lsq`), each at the fp32 learning rate "
        "(3e-3) held constant or with the seed article's learning-rate trick, a 10x lower "
        "rate (3e-4) annealed to zero by a cosine schedule. Every cell is mean ± sample std "
        "over seeds "
        f"{cfg['seeds']} (the seed sets fp32 init, fp32 and QAT shuffles), test accuracy in %. "
        "`best QAT` is the variant with the best mean at that bit width, picked on the test "
        "split (there is no separate validation split), so it is optimistic by selection; every "
        "variant is shown beside it. `gain` = best QAT - PTQ min-max, in points.",
        "",
        f"fp32: {pct(fp32)} (per seed: "
        + ", ".join(f"{100 * a:.2f}" for a in fp32["per_seed"])
        + ")",
        "",
    ]
    for rules in RULE_SETS:
        lines += [f"## {rules} rule set", "", *sweep_table(results, rules), ""]
    lines += [
        "![accuracy vs bits](digits_bits.png)",
        "",
        f"## Deployment: 8-bit QAT ({DEPLOY_RULES} rules) as int8 engines",
        "",
        *deployment_table(results),
        "",
        *acceptance_lines(results),
        "",
        *discussion(results),
        "",
        "## Environment",
        "",
        "```",
        json.dumps(results["environment"], indent=2),
        "```",
    ]
    path = out / "digits_experiment.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def acceptance_lines(results: dict) -> list[str]:
    checks = results["acceptance"]
    lines = [
        "## Acceptance",
        "",
        f"- fp32 >= 97% on every seed: {'met' if checks['fp32_min_ge_97'] else 'NOT met'}.",
    ]
    for variant, engines in checks["deployment"].items():
        for engine, c in engines.items():
            lines.append(
                f"- {variant} on {engine}: {c['points_vs_fp32']:+.2f} points vs fp32 (within 0.3: "
                f"{'met' if c['within_0.3_of_fp32'] else 'NOT met'}), "
                f"{c['points_vs_fake_quant']:+.2f} vs fake-quant (within 0.2: "
                f"{'met' if c['within_0.2_of_fake_quant'] else 'NOT met'})."
            )
    for rules, gap in checks.get("qat_minus_ptq_at_3_bits", {}).items():
        lines.append(
            f"- QAT beats PTQ by >= 10 points at 3 bits ({rules} rules): {gap['points']:+.1f} "
            f"points, {'met' if gap['ge_10'] else 'not met'}; PTQ at 3 bits is only "
            f"{gap['ptq_loss_vs_fp32_points']:.1f} points below fp32, and QAT cannot win back "
            "more than PTQ lost."
        )
    return lines


def discussion(results: dict) -> list[str]:
    """How to read the tables. Numbers are computed; the explanations are structural facts of
    the rule sets and the data, except the one marked as this run's observation."""
    sweep, fp32 = results["sweep"], 100 * results["fp32"]["mean"]

    def per_rules(fn) -> str:
        return " / ".join(f"{fn(sweep[rules]):+.1f}" for rules in RULE_SETS)

    def gain(point: dict) -> float:
        return 100 * (point["qat"][point["qat_best"]]["mean"] - point["ptq_minmax"]["mean"])

    bits = [int(b) for b in sweep[RULE_SETS[0]]]
    high = [str(b) for b in bits if b >= 4]
    text = (
        "**QAT vs PTQ** (tensorrt / onnxruntime rules, best QAT minus PTQ min-max): "
        f"{per_rules(lambda s: gain(s['2']))} points at 2 bits"
    )
    if 3 in bits:
        text += (
            f", {per_rules(lambda s: gain(s['3']))} at 3 bits, where PTQ min-max is already at "
            f"{per_rules(lambda s: 100 * s['3']['ptq_minmax']['mean'] - fp32)} points vs fp32 "
            f"(PTQ MSE: {per_rules(lambda s: 100 * s['3']['ptq_mse']['mean'] - fp32)})"
        )
    if high:
        worst = max(abs(gain(sweep[r][b])) for r in RULE_SETS for b in high)
        text += f", and within ±{worst:.1f} points from 4 bits on, inside the seed spread"
    lines = [
        "## Reading the numbers",
        "",
        text + ". A gain of 10 points needs PTQ to lose more than 10 points first. On this "
        "easy, low-resolution data set, with per-channel weight scales (both rule sets) and "
        "ranges calibrated on the real train split, PTQ loses that much only at 2 bits.",
        "",
        "**tensorrt vs onnxruntime rules below 4 bits.** The tensorrt rule set quantizes "
        "activations signed and symmetric (TensorRT's int8 has zero point 0), so a ReLU output "
        "uses only the non-negative half of the grid: at 2 bits the codes are {-2, -1, 0, 1} "
        "and post-ReLU activations get {0, 1}, one effective bit; at 3 bits, 4 levels instead "
        "of 8. The onnxruntime rule set's unsigned affine activations keep all 2^b levels. "
        "Weights are the same in both (per-channel, narrow range: ternary at 2 bits). TensorRT "
        "itself only runs int8, so below 8 bits its rule set is a simulation.",
        "",
        "**The learning-rate trick**, 3e-4 with cosine decay minus 3e-3 held constant, in "
        "points (mean over seeds):",
        "",
        *lr_trick_table(results),
        "",
        "Observed in this run: the gentle, annealed rate helps where the quantized model starts "
        "near the fp32 solution and hurts at 2 bits, where PTQ starts far from it and a 10x "
        "lower, decaying rate cannot move the weights far enough in the same few epochs. Which "
        "recipe wins therefore depends on the bit width; the best-QAT column names it per row.",
        "",
        f"**Noise.** One test image is {100 / results['test_samples']:.2f} points and the seed "
        "spread is shown in every cell; differences well inside it (most cells from 4 bits on) "
        "are not evidence. Best QAT is picked among 4 variants on the test split itself.",
    ]
    deployed = [row[engine] for row in results["deployment"].values() for engine in ENGINES]
    agreement = min(d["agreement_with_fake_quant"] for d in deployed)
    floats = sorted({layer for d in deployed for layer in d["float_layers"]})
    lines += [
        "",
        f"**Deployment.** The int8 engines and the fake-quant model predict the same class for "
        f"{100 * agreement:.1f}% of the test images (lowest over variants and runtimes); by "
        "the runtimes' own kernel reports, "
        + (
            f"these compute layers stayed float: {', '.join(floats)}."
            if floats
            else "every compute layer (conv1, conv2, fc) runs an int8 kernel."
        ),
    ]
    return lines


def plot(results: dict, out: Path) -> Path:
    """Accuracy vs bits: PTQ and best-QAT lines per rule set, fp32 as a reference line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(RULE_SETS), figsize=(10, 4), sharey=True)
    for ax, rules in zip(axes, RULE_SETS, strict=True):
        sweep = results["sweep"][rules]
        bits = [int(b) for b in sweep]
        series = {
            "PTQ (min-max)": [p["ptq_minmax"] for p in sweep.values()],
            "PTQ (MSE)": [p["ptq_mse"] for p in sweep.values()],
            "QAT (best variant)": [p["qat"][p["qat_best"]] for p in sweep.values()],
        }
        for label, points in series.items():
            ax.errorbar(
                bits,
                [100 * p["mean"] for p in points],
                yerr=[100 * p["std"] for p in points],
                marker="o",
                capsize=3,
                label=label,
            )
        ax.axhline(100 * results["fp32"]["mean"], color="black", ls="--", lw=1, label="fp32")
        ax.set(title=f"{rules} rules", xlabel="bits (weights and activations)", xticks=bits)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("digits test accuracy (%)")
    axes[0].legend(loc="lower right")
    fig.tight_layout()
    path = out / "digits_bits.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 and 8 bits, 1 seed, 1 epoch")
    parser.add_argument("--out", type=Path, default=DOCS, help="output folder (default docs/)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results = run(QUICK if args.quick else FULL, log=lambda m: print(m, file=sys.stderr))
    command = COMMAND + (" --quick" if args.quick else "")
    for path in (
        write_json(results, args.out),
        write_markdown(results, args.out, command),
        plot(results, args.out),
    ):
        print(path)


if __name__ == "__main__":
    main()
