"""model -> prepared -> calibrated (-> QAT) -> QDQ ONNX: the one recipe every entry point uses.

`deploy build`, `deploy bench` and `deploy check` (through deploy.app.bench.export_model) call
these functions with the same defaults, so the int8 model CI gates is byte for byte the one a
build ships: same trained weights, same calibration data, same example input.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from qat_deploy.deploy.common.environment import available_memory
from qat_deploy.deploy.common.errors import (
    BackendUnavailableError,
    BadInputError,
    EnvironmentFaultError,
)
from qat_deploy.deploy.data import Dataset, default_dataset, input_pairs, load_calibration_data
from qat_deploy.deploy.engines.adapter import get_adapter
from qat_deploy.deploy.export.qdq import export, export_fp32
from qat_deploy.deploy.frontend.prepare import OBSERVERS, PreparedModel, prepare
from qat_deploy.deploy.rules.backend import get_rules
from qat_deploy.deploy.training import distributed
from qat_deploy.deploy.training.calibrate import calibrate, call_model, first_tensor
from qat_deploy.deploy.training.choice import choose_observer, use_observer
from qat_deploy.deploy.training.qat import distillation_loss, train_qat
from qat_deploy.deploy.training.smooth import choose_alpha, smooth_linear_inputs
from qat_deploy.deploy.tune.cache import TimingCache, default_cache_path
from qat_deploy.deploy.tune.search import EngineTimer, gain, search
from qat_deploy.deploy.verify.sensitivity import choose_keep_float
from qat_deploy.models import ModelSpec, load_model
from qat_deploy.models.inputs import InputSpec

DEFAULT_MODEL = "digits_resnet"
#: Recipe.calibration that chooses the activation observer on the calibration data
AUTO = "auto"
QAT_LOSSES = ("auto", "cross_entropy", "distill")
#: Distillation nudges the model toward its own float outputs: small steps, ranges frozen at
#: calibration. 3 epochs on 32 real sentences, pretrained MiniLM embedding cosine vs fp32 on 64
#: held out: OpenVINO 0.9971 -> 0.9975 at 1e-5, 0.990 at 1e-4 (its loss rose); mnist_cnn on
#: 128 unlabelled digits: error (1 - cosine) 2.4e-5 -> 0.6e-5 at 1e-5, 1.3e-5 at 1e-4.
DISTILL_LR = 1e-5
#: seconds of latency tuning: MobileNetV3-Large's 64 regions take about 2 minutes on 2 cores
DEFAULT_TUNE_BUDGET_S = 300.0
FP32_NAME = "model.fp32.onnx"
QDQ_NAME = "model.qdq.onnx"
CHECKPOINT_NAME = "qat_checkpoint.pt"
TUNE_NOT_PARALLEL = (
    "--tune-latency times engines in one process; tune without --nproc, then pass the layers "
    "it kept float with --keep-float"
)


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the bytes of the QDQ model."""

    target: str
    model: str | None = None  # registry name or package.module:factory; None = embedded default
    input_shape: tuple[int, ...] | None = None
    inputs: tuple[InputSpec, ...] | None = None  # named input specs; win over input_shape
    data: Path | None = None  # .npz file or image folder; None = the model's default data
    calib_batches: int = 8
    batch_size: int = 16  # calibration / QAT batch size
    #: activation range observer (deploy.frontend.prepare.OBSERVERS), or AUTO: the one of
    #: the target's BackendRules.auto_observers closest to fp32 on held-out calibration samples
    calibration: str = AUTO
    #: module-path globs of Conv/Linear layers that stay float (deploy.frontend.prepare keep_float)
    keep_float: tuple[str, ...] = ()
    #: keep the fewest layers float for the fake-quant output to reach this mean cosine vs
    #: fp32 on the calibration data (deploy.verify.sensitivity.choose_keep_float)
    accuracy_budget: float | None = None
    #: keep float the layers that time faster float on the target runtime (deploy.tune)
    tune_latency: bool = False
    tune_budget_s: float = DEFAULT_TUNE_BUDGET_S
    #: the tuner's timing cache; None = deploy.tune.cache.default_cache_path()
    tune_cache: Path | None = None
    #: inference threads: engines are timed (--tune-latency) and built with this many
    threads: int = 2
    qat_epochs: int = 0
    #: QAT loss (QAT_LOSSES): "auto" = cross-entropy on labels where the data has them, else
    #: distillation toward the float model's outputs
    qat_loss: str = "auto"
    #: QAT state saved after each epoch; with qat_resume, QAT continues from it
    qat_checkpoint: Path | None = None
    qat_resume: bool = False
    eval_samples: int = 1000


@dataclass(frozen=True)
class Loaded:
    """The model in eval mode with its data: calibration rows, and held-out evaluation rows
    (None when the caller only exports)."""

    model: nn.Module
    spec: ModelSpec
    calib: Dataset
    evaluation: Dataset | None

    @property
    def example(self) -> torch.Tensor | dict[str, torch.Tensor]:
        """The first calibration batch at the model's batch size: what capture and export see."""
        return tensors(self.spec, self.calib.arrays(self.spec.inputs), 0, self.spec.input_shape[0])


def check(recipe: Recipe) -> None:
    """Bad recipe fields as one line naming the option, before any work; every entry point
    that takes them from a user calls this."""
    get_rules(recipe.target)  # unknown targets fail first, with the list of known ones
    budget = recipe.accuracy_budget
    if budget is not None and not 0 < budget <= 1:  # NaN fails too
        raise BadInputError(f"bad --accuracy-budget {budget}; expected a cosine in (0, 1]")
    if recipe.calibration not in (AUTO, *OBSERVERS):
        known = ", ".join((AUTO, *OBSERVERS))
        raise BadInputError(f"unknown calibration '{recipe.calibration}'; known: {known}")
    for name in ("calib_batches", "batch_size", "eval_samples"):
        value = getattr(recipe, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise BadInputError(f"--{name.replace('_', '-')} must be a positive integer")
    budget = recipe.tune_budget_s
    if isinstance(budget, bool) or not isinstance(budget, int | float) or not budget > 0:
        raise BadInputError(f"bad --tune-budget {budget!r}; expected seconds > 0")
    threads = recipe.threads
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise BadInputError("--threads must be a positive integer")
    if recipe.qat_epochs < 0:
        raise BadInputError("--qat-epochs must be >= 0")
    if recipe.qat_resume and not (recipe.qat_epochs and recipe.qat_checkpoint):
        raise BadInputError("--resume continues QAT from its checkpoint: add --qat-epochs")
    if recipe.qat_loss not in QAT_LOSSES:
        raise BadInputError(
            f"unknown --qat-loss '{recipe.qat_loss}'; known: {', '.join(QAT_LOSSES)}"
        )


def load(recipe: Recipe, *, evaluation: bool = True) -> Loaded:
    torch.manual_seed(0)
    model, spec = load_model(
        recipe.model or DEFAULT_MODEL,
        input_shape=recipe.input_shape,
        inputs=recipe.inputs,
        pretrained=True,
    )
    needed = recipe.calib_batches * recipe.batch_size
    _check_memory(spec, needed + (recipe.eval_samples if evaluation else 0))
    calib, held_out = _datasets(recipe, spec, needed, evaluation)
    return Loaded(model, spec, calib, held_out)


def quantize(
    loaded: Loaded, recipe: Recipe, on_stage: Callable[[str], None] = lambda name: None
) -> PreparedModel:
    """prepare for the target's rules, calibrate, tune the placement and fine-tune when
    asked; on_stage(name) after each of "prepare", "calibrate", "tune", "qat"."""
    spec, size = loaded.spec, recipe.batch_size
    arrays = loaded.calib.arrays(spec.inputs)
    batches = [tensors(spec, arrays, i, i + size) for i in range(0, len(loaded.calib), size)]
    batches = batches[: recipe.calib_batches]
    prepared = _prepare(loaded, recipe, recipe.keep_float)
    on_stage("prepare")
    auto = None
    if recipe.calibration == AUTO:
        observer, scores = choose_observer(prepared, loaded.model, batches)
        auto = {"observer": observer, "cosine": scores}
        recipe = dataclasses.replace(recipe, calibration=observer)  # for every later prepare
        use_observer(prepared, observer)
    _calibrate(prepared, loaded.model, batches)
    if recipe.accuracy_budget is not None:
        # chosen on the calibration data, so every entry point picks the same layers
        choice = choose_keep_float(prepared, loaded.model, batches, recipe.accuracy_budget)
        if choice.layers:
            prepared = _prepare(loaded, recipe, (*recipe.keep_float, *choice.layers))
            _calibrate(prepared, loaded.model, batches)
        prepared.plan.accuracy_budget = choice.to_dict()
    on_stage("calibrate")
    if recipe.tune_latency:
        if distributed.world().parallel:
            raise BadInputError(TUNE_NOT_PARALLEL)
        prepared = _tune(loaded, recipe, prepared, batches)
        on_stage("tune")
    if recipe.qat_epochs:
        _qat(prepared, loaded, recipe)
        on_stage("qat")
    distributed.leave()  # rank 0 goes on alone
    prepared.plan.calibration = {"observer": recipe.calibration, "auto": auto}
    return prepared


def _calibrate(prepared: PreparedModel, model: nn.Module, batches: list) -> None:
    """Observe ranges; where the target's rules offer SmoothQuant for a transformer, apply
    the strength (if any) that brings the fake-quant output closest to `model`'s on the same
    batches, and observe again."""
    calibrate(prepared, batches, progress=False)
    alphas = prepared.rules.smooth_quant_alphas
    if not alphas or prepared.plan.mode != "transformer":
        return
    alpha, cosines = choose_alpha(prepared, model, batches, alphas)
    smoothed = []
    if alpha is not None:
        smoothed = smooth_linear_inputs(prepared, batches, alpha)
        calibrate(prepared, batches, progress=False)
    prepared.plan.smooth_quant = {"alpha": alpha, "cosine": cosines, "quantizers": len(smoothed)}


def _tune(loaded: Loaded, recipe: Recipe, prepared: PreparedModel, batches: list) -> PreparedModel:
    """Time placements of the calibrated model on the target runtime (deploy.tune.search);
    when some layers run faster float, prepare again with them kept float, and keep that
    model only if its own export times faster than the untuned one, with the search's own
    standard (deploy.tune.search.gain: a second timing with the roles swapped must agree)."""
    adapter = get_adapter(recipe.target)
    cache = TimingCache(recipe.tune_cache or default_cache_path())
    with tempfile.TemporaryDirectory(prefix="qat_deploy_tune_") as work:
        untuned = onnx.load(str(export(prepared, Path(work) / QDQ_NAME, loaded.example)))
        names = [i.name for i in untuned.graph.input]
        batch = loaded.spec.input_shape[0]  # the example's rows: what the export takes
        arrays = {k: a[:batch] for k, a in loaded.calib.arrays(loaded.spec.inputs).items()}
        feed = {e: arrays[a] for e, a in input_pairs(names, arrays)}
        timer = EngineTimer(adapter, feed, recipe.threads, Path(work) / "engines", cache)
        try:
            result = search(untuned, prepared.rules, timer, recipe.tune_budget_s)
            tuned = prepared
            if result.float_layers:
                tuned = _prepare(loaded, recipe, (*prepared.plan.kept_float, *result.float_layers))
                _calibrate(tuned, loaded.model, batches)
                tuned.plan.accuracy_budget = prepared.plan.accuracy_budget
                final = export(tuned, Path(work) / "tuned" / QDQ_NAME, loaded.example)
                before = timer.contended
                ratio, faster = gain(
                    timer, final.read_bytes(), untuned.SerializeToString(), result.threshold
                )
                result.time_ratio, result.contended = ratio, timer.contended
                result.retimed = timer.retimed
                busy = timer.contended > before
                if not faster:  # the rewrite's gain did not hold, or was timed on a busy CPU
                    result.reverted = {
                        "float_layers": result.float_layers,
                        "time_ratio": ratio,
                        "contended": busy,
                    }
                    result.float_layers, result.time_ratio, tuned = [], 1.0, prepared
        except BackendUnavailableError as exc:
            raise BackendUnavailableError(
                f"--tune-latency times engines on the target runtime, which cannot run here: {exc}"
            ) from exc
        finally:
            timer.close()
            cache.save()
    result.cache = cache.to_dict()  # after saving: a cache that could not be written says so
    tuned.plan.latency_tuning = result.to_dict()
    return tuned


def _prepare(loaded: Loaded, recipe: Recipe, keep_float: tuple[str, ...]) -> PreparedModel:
    return prepare(
        loaded.model,
        recipe.target,
        loaded.example,
        observer=(
            get_rules(recipe.target).auto_observers[0]
            if recipe.calibration == AUTO
            else recipe.calibration
        ),
        keep_float=keep_float,
    )


def export_onnx(
    loaded: Loaded,
    prepared: PreparedModel | None,
    out_dir: Path,
    precisions: Iterable[str] = ("fp32", "int8"),
    qdq_name: str = QDQ_NAME,
    float_weights: dict[str, np.ndarray] | None = None,
) -> dict[str, Path]:
    """fp32 and/or QDQ ONNX in out_dir (atomically), by precision; `float_weights` as in
    deploy.export.qdq.export."""
    paths = {}
    if "fp32" in precisions:
        paths["fp32"] = export_fp32(loaded.model, Path(out_dir) / FP32_NAME, loaded.example)
    if "int8" in precisions:
        if prepared is None:
            raise ValueError("int8 export needs the prepared model")
        paths["int8"] = export(
            prepared, Path(out_dir) / qdq_name, loaded.example, float_weights=float_weights
        )
    return paths


def tensors(
    spec: ModelSpec, arrays: Mapping[str, np.ndarray], start: int, stop: int
) -> torch.Tensor | dict[str, torch.Tensor]:
    """Samples start:stop as the model takes them: one tensor, or keyword tensors by name."""
    by_name = {name: torch.from_numpy(a[start:stop]) for name, a in arrays.items()}
    return by_name if spec.by_keyword else next(iter(by_name.values()))


def _check_memory(spec: ModelSpec, samples: int) -> None:
    """Refuse inputs whose data alone would not fit: past that the kernel's OOM killer ends
    the run with SIGKILL, which leaves no report saying why. Twice the raw arrays: the data and
    the outputs and copies the stages make of it."""
    per_sample = sum(math.prod(i.shape[1:]) * np.dtype(i.dtype).itemsize for i in spec.inputs)
    need, available = 2 * per_sample * samples, available_memory()
    if need > available:
        shapes = ", ".join("x".join(map(str, i.shape)) for i in spec.inputs)
        raise EnvironmentFaultError(
            f"{samples} samples of {spec.name}'s inputs ({shapes}) need about "
            f"{need / 2**30:.1f} GiB; {available / 2**30:.1f} GiB of memory is available: "
            "use a smaller input shape, --calib-batches or --eval-samples"
        )


def _datasets(
    recipe: Recipe, spec: ModelSpec, needed: int, evaluation: bool
) -> tuple[Dataset, Dataset | None]:
    if recipe.data is None:
        calib = default_dataset(spec, needed, split="calib")
        held_out = default_dataset(spec, recipe.eval_samples, split="eval") if evaluation else None
        return calib, held_out
    data = load_calibration_data(recipe.data, inputs=spec.inputs)
    if len(data) < 2:
        raise BadInputError(f"{recipe.data}: need at least 2 samples (calibration and evaluation)")
    # calibrate on the head, evaluate on what calibration never saw
    split = min(needed, len(data) // 2)
    n_eval = min(recipe.eval_samples, len(data) - split)
    return (
        data.rows(0, split, f"{data.source} (first {split} samples)"),
        data.rows(split, None, f"{data.source} (last {n_eval} samples, held out of calibration)"),
    )


def _qat(prepared: PreparedModel, loaded: Loaded, recipe: Recipe) -> None:
    """Fine-tune on the calibration rows: on their labels, or (no labels, or --qat-loss
    distill) toward the float model's outputs with its BatchNorm statistics frozen and Dropout
    off."""
    calib, spec, size = loaded.calib, loaded.spec, recipe.batch_size
    distill = recipe.qat_loss == "distill" or (recipe.qat_loss == "auto" and calib.labels is None)
    if not distill and calib.labels is None:
        raise BadInputError(
            "--qat-loss cross_entropy needs labelled data (an .npz with 'y' or 'labels')"
        )
    arrays = calib.arrays(spec.inputs)
    w, starts = distributed.world(), range(0, len(calib), size)
    # each rank trains on its share of every global batch (DistributedSampler's deal)
    inputs = [distributed.shard(tensors(spec, arrays, i, i + size), w) for i in starts]
    if distill:
        with torch.no_grad():
            targets = [first_tensor(call_model(loaded.model, batch)) for batch in inputs]
    else:
        targets = [
            distributed.shard(torch.from_numpy(calib.labels[i : i + size]), w) for i in starts
        ]
    history = train_qat(
        prepared,
        list(zip(inputs, targets, strict=True)),
        epochs=recipe.qat_epochs,
        lr=DISTILL_LR if distill else 1e-4,
        loss_fn=distillation_loss if distill else None,
        # toward the float model: its BatchNorm statistics and no Dropout noise
        freeze_bn_after=0 if distill else None,
        freeze_observers_after=0 if distill else None,
        dropout=not distill,
        progress=False,
        checkpoint=recipe.qat_checkpoint,
        resume=recipe.qat_resume,
    )
    prepared.plan.qat = {
        "epochs": recipe.qat_epochs,
        "loss": "distill" if distill else "cross_entropy",
        "loss_per_epoch": list(history),
        "ranks": w.size,
        "resumed_from_epoch": history.resumed_from_epoch,
    }
