"""The pretrained all-MiniLM-L6-v2 sentence embedding on real English sentences, int8 vs fp32.

Sentences are the first sentences of the Python standard library's docstrings (real English,
on every machine, no download), tokenized by the model's own tokenizer into an .npz with
input_ids and attention_mask; `deploy build` calibrates on the first 32 and checks the engine
on the next 64 (the protocol of the issue that measured NNCF at 0.9945 mean cosine on
OpenVINO). The model is the embedding users call: mean pooling under the mask, L2-normalised.

    python -m benchmarks.minilm_sentences [--target openvino] [--out out/minilm] [--qat-epochs N]
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import re
from pathlib import Path

import numpy as np

from qat_deploy.deploy.pipeline import BuildOptions, build
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", action="append", dest="targets")
    parser.add_argument("--out", type=Path, default=Path("out/minilm"))
    parser.add_argument("--qat-epochs", type=int, default=0, help="distillation QAT epochs")
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
                out_dir=args.out / target,
            )
        )
        accuracy = report["accuracy"]["int8_vs_fp32"]
        rows.append(
            {
                "target": target,
                "cosine_mean": accuracy["cosine"],
                "samples": accuracy["samples"],
                "speedup": report["speedup"]["value"],
                "int8_layers": f"{report['kernels']['int8']}/"
                f"{report['kernels']['int8'] + report['kernels']['float']}",
                "smooth_quant": report.get("smooth_quant"),
                "qat": report.get("qat"),
            }
        )
        print(json.dumps(rows[-1]))
    (args.out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
