"""The pretrained all-MiniLM-L6-v2 sentence embedding on real English sentences, int8 vs fp32.

Sentences are the first sentences of the Python standard library's docstrings (real English,
on every machine, no download), tokenized by the model's own tokenizer into an .npz with
input_ids and attention_mask; `deploy build` calibrates on the first 32 and checks the engine
on the next 64 (the protocol of the issue that measured NNCF at 0.9945 mean cosine on
OpenVINO). The model is the embedding users call: mean pooling under the mask, L2-normalised.

With --vendors, the same run also quantizes the fp32 ONNX with NNCF (model_type=TRANSFORMER,
the same 32 calibration sentences) and onnxruntime's quantize_dynamic, and times every int8
engine beside fp32 and ours on each runtime (interleaved blocks, paired ratios), with the
embedding cosine vs the fp32 engine's, mean and worst over the 64 held-out sentences.

    python -m benchmarks.minilm_sentences [--target openvino] [--out out/minilm] [--qat-epochs N]
                                          [--calibration minmax|mse|percentile|entropy] [--vendors]
                                          [--keep-float GLOB ...] [--accuracy-budget COSINE]
                                          [--repeat N]
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import re
from pathlib import Path

import numpy as np

from qat_deploy.deploy.app.pipeline import BuildOptions, build
from qat_deploy.deploy.engines.adapter import get_adapter
from qat_deploy.deploy.engines.timing import (
    TimingConfig,
    paired_ratio,
    runner_call,
    time_interleaved,
)
from qat_deploy.models.thirdparty import minilm_sentence_transformer

MODULES = (
    "collections",
    "json",
    "pathlib",
    "os",
    "re",
    "argparse",
    "inspect",
    "logging",
    "subprocess",
    "threading",
    "functools",
    "itertools",
    "email",
    "http.client",
    "urllib.parse",
    "tarfile",
    "zipfile",
    "csv",
    "shutil",
    "tempfile",
    "datetime",
)
CALIBRATION, HELD_OUT, SEQ_LEN = 32, 64, 128


def sentences(count: int) -> list[str]:
    """First sentences (6+ words) of stdlib docstrings, deterministic order, no repeats."""
    found: dict[str, None] = {}
    for name in MODULES:
        module = importlib.import_module(name)
        for _, member in sorted(inspect.getmembers(module), key=lambda kv: kv[0]):
            doc = inspect.getdoc(member) if callable(member) else None
            if not doc:
                continue
            first = re.split(r"(?<=[.!?])\s", " ".join(doc.split()), maxsplit=1)[0]
            if len(first.split()) >= 6 and first[0].isupper():
                found.setdefault(first)
            if len(found) >= count:
                return list(found)
    return list(found)


def write_data(path: Path) -> Path:
    tokenizer = minilm_sentence_transformer().tokenizer
    text = sentences(CALIBRATION + HELD_OUT)
    tokens = tokenizer(
        text, padding="max_length", truncation=True, max_length=SEQ_LEN, return_tensors="np"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(
        path,
        input_ids=tokens["input_ids"].astype(np.int64),
        attention_mask=tokens["attention_mask"].astype(np.int64),
    )
    return path


def vendor_models(fp32: Path, calib: dict[str, np.ndarray], out: Path) -> dict[str, Path]:
    """NNCF (transformer mode) and onnxruntime quantize_dynamic of the same fp32 ONNX."""
    import nncf
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    samples = [{k: v[i : i + 1] for k, v in calib.items()} for i in range(CALIBRATION)]
    quantized = nncf.quantize(
        onnx.load(str(fp32)),
        nncf.Dataset(samples),
        subset_size=len(samples),
        model_type=nncf.ModelType.TRANSFORMER,
    )
    paths = {"nncf": out / "nncf.onnx", "ort quantize_dynamic": out / "ort_dynamic.onnx"}
    onnx.save(quantized, str(paths["nncf"]))
    quantize_dynamic(
        str(fp32), str(paths["ort quantize_dynamic"]), per_channel=True, weight_type=QuantType.QInt8
    )
    return paths


def compare(
    target: str,
    models: dict[str, Path],
    held_out: dict[str, np.ndarray],
    out: Path,
    repeat: int = 1,
):
    """Per model on `target`: embedding cosine vs fp32 (mean, worst), paired speedup over fp32
    and ours' time over this model's (below 1: ours is faster), each the median of `repeat`
    interleaved timing runs of the same engines (each run's value kept)."""
    adapter = get_adapter(target)
    runners = {}
    for name, path in models.items():
        folder = out / target / name.replace(" ", "_")
        precision = "fp32" if name == "fp32" else "int8"
        runners[name] = adapter.runner(adapter.build(path, folder, precision=precision, threads=2))
    for runner in runners.values():
        runner.activate()
    try:
        outputs = {
            name: np.concatenate(
                [
                    next(iter(r.infer({k: v[i : i + 1] for k, v in held_out.items()}).values()))
                    for i in range(HELD_OUT)
                ]
            )
            for name, r in runners.items()
        }
        feed = {k: v[:1] for k, v in held_out.items()}
        config = TimingConfig(min_time_s=3.0)
        calls = {n: runner_call(r, feed) for n, r in runners.items()}
        runs = [time_interleaved(calls, config) for _ in range(repeat)]
    finally:
        for runner in runners.values():
            runner.deactivate()
    reference = outputs["fp32"] / np.linalg.norm(outputs["fp32"], axis=1, keepdims=True)
    rows = []
    for name, emb in outputs.items():
        cos = np.sum(emb / np.linalg.norm(emb, axis=1, keepdims=True) * reference, axis=1)
        speedups = [paired_ratio(t["fp32"], t[name], config.block) for t in runs]
        ours_over = [paired_ratio(t["ours"], t[name], config.block) for t in runs]
        rows.append(
            {
                "runtime": target,
                "model": name,
                "cosine_mean": float(cos.mean()),
                "cosine_worst": float(cos.min()),
                "p50_ms": float(np.median([np.median(t[name]) for t in runs])),
                "speedup": float(np.median(speedups)),
                "speedup_runs": speedups,
                "ours_time_over_this": float(np.median(ours_over)),
                "ours_time_over_this_runs": ours_over,
            }
        )
        print(json.dumps(rows[-1]))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", action="append", dest="targets")
    parser.add_argument("--out", type=Path, default=Path("out/minilm"))
    parser.add_argument("--qat-epochs", type=int, default=0, help="distillation QAT epochs")
    parser.add_argument("--vendors", action="store_true", help="NNCF and quantize_dynamic too")
    parser.add_argument("--calibration", default="minmax", help="activation range observer")
    parser.add_argument("--keep-float", action="append", default=[], help="layer glob (repeat)")
    parser.add_argument("--accuracy-budget", type=float, help="fake-quant cosine to reach")
    parser.add_argument("--repeat", type=int, default=1, help="timing runs (medians)")
    args = parser.parse_args(argv)
    data = write_data(args.out / "sentences.npz")
    rows = []
    for target in args.targets or ["openvino", "onnxruntime"]:
        report = build(
            BuildOptions(
                target=target,
                model="qat_deploy.models.thirdparty:minilm_l6_embedding",
                data=data,
                calib_batches=CALIBRATION // 8,
                batch_size=8,
                eval_samples=HELD_OUT,
                qat_epochs=args.qat_epochs,
                calibration=args.calibration,
                keep_float=tuple(args.keep_float),
                accuracy_budget=args.accuracy_budget,
                out_dir=args.out / target,
            )
        )
        accuracy = report["accuracy"]["int8_vs_fp32"]
        rows.append(
            {
                "target": target,
                "calibration": args.calibration,
                "cosine_mean": accuracy["cosine"],
                "samples": accuracy["samples"],
                "speedup": report["speedup"]["value"],
                "int8_layers": f"{report['kernels']['int8']}/"
                f"{report['kernels']['int8'] + report['kernels']['float']}",
                "kept_float": report.get("kept_float", []),
                "accuracy_budget": report.get("accuracy_budget"),
                "smooth_quant": report.get("smooth_quant"),
                "qat": report.get("qat"),
            }
        )
        print(json.dumps(rows[-1]))
    if args.vendors:
        arrays = dict(np.load(data))
        calib = {k: v[:CALIBRATION] for k, v in arrays.items()}
        held_out = {k: v[CALIBRATION : CALIBRATION + HELD_OUT] for k, v in arrays.items()}
        first = args.out / (args.targets or ["openvino"])[0]
        vendors = vendor_models(first / "model.fp32.onnx", calib, args.out)
        for target in args.targets or ["openvino", "onnxruntime"]:
            models = {
                "fp32": args.out / target / "model.fp32.onnx",
                "ours": args.out / target / "model.qdq.onnx",
                **vendors,
            }
            rows += compare(target, models, held_out, args.out / "vendor_engines", args.repeat)
    (args.out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
