"""Quantization-aware fine-tuning of a prepared (and calibrated) model.

BN folding uses batch statistics until `freeze_bn_after` steps, then frozen running statistics;
activation observers stop after `freeze_observers_after` steps (Krishnamoorthi 2018, sec. 3.2).
Weight observers keep following the weights, which change every step. Learnable (LSQ) scales
are nn.Parameters of the prepared model; an optimizer that misses them is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.progress import Progress
from torch import nn

from qat_deploy.deploy.common.errors import BadInputError
from qat_deploy.deploy.frontend.prepare import PreparedModel
from qat_deploy.deploy.frontend.quant_modules import QuantConvBn
from qat_deploy.deploy.quant.sync import ranks_synced
from qat_deploy.deploy.training import checkpoint as checkpoints
from qat_deploy.deploy.training import distributed
from qat_deploy.deploy.training.calibrate import call_model, first_tensor


def check_optimizer_covers(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """The classic silent bug: an optimizer built before prepare() never trains the scales."""
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [
        n for n, p in model.named_parameters() if p.requires_grad and id(p) not in in_optimizer
    ]
    if missing:
        raise BadInputError(
            f"the optimizer does not hold {len(missing)} trainable parameters of the prepared "
            f"model (e.g. {missing[0]}); build it from prepared_model.parameters()"
        )


class LossHistory(list):
    """The mean loss of each epoch (all of them, also those before a resume), and the epoch
    training resumed from (0: a fresh start)."""

    def __init__(self, losses: list[float], resumed_from_epoch: int = 0) -> None:
        super().__init__(losses)
        self.resumed_from_epoch = resumed_from_epoch


def train_qat(
    model: PreparedModel,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    epochs: int = 1,
    optimizer: torch.optim.Optimizer | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    lr: float = 1e-3,
    freeze_bn_after: int | None = None,
    freeze_observers_after: int | None = None,
    dropout: bool = True,
    progress: bool = True,
    checkpoint: Path | None = None,
    resume: bool = False,
    sync_batchnorm: bool = False,
) -> LossHistory:
    """Fine-tune with fake quantization on; returns the mean loss of each epoch.

    `batches` is re-iterated every epoch (a DataLoader or a list of (inputs, targets)); inputs
    may be a dict of keyword tensors, and the loss is on the model's first tensor output.
    Defaults: Adam over all prepared parameters, cross-entropy loss. dropout=False keeps
    Dropout layers off while training (distillation toward a deterministic teacher).

    Data-parallel when torch.distributed is initialized with more than one rank: `batches`
    is then this rank's shard, the model trains under DDP, observers reduce their statistics
    over the ranks and every epoch ends with a check that all ranks hold the same quantizers.
    `checkpoint`: written after each epoch; with `resume`, training continues from it.
    sync_batchnorm: BatchNorm batch statistics over all ranks (torch's SyncBatchNorm, GPUs
    only); otherwise each rank normalises by its shard and the running statistics are rank 0's.
    """
    if epochs < 1:
        raise BadInputError(f"epochs must be >= 1, got {epochs}")
    optimizer = optimizer or torch.optim.Adam(model.parameters(), lr=lr)
    check_optimizer_covers(model, optimizer)
    loss_fn = loss_fn or nn.functional.cross_entropy
    w = distributed.world()
    done = checkpoints.Progress()
    if resume and checkpoint is not None:
        done = checkpoints.load(checkpoint, model, optimizer, w)
    resumed_from = done.epoch
    if w.parallel and hasattr(batches, "__len__"):
        distributed.same_on_all_ranks(len(batches), "QAT batches")
    weight_ids = {id(m.weight_quant) for m in model.modules() if hasattr(m, "weight_quant")}
    activation_quantizers = [fq for fq in model.quantizers() if id(fq) not in weight_ids]
    for fq in model.quantizers():
        fq.enable_fake_quant(True)
        # LSQ scales learn by gradient; an observer would overwrite them every step
        fq.enable_observer(not fq.learnable)
    model.train()
    if not dropout:
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.eval()
    if w.parallel and sync_batchnorm:
        distributed.synced_batchnorm(model)
    trained = distributed.data_parallel(model) if w.parallel else model
    steps = _Steps(model, activation_quantizers, freeze_bn_after, freeze_observers_after)
    steps.replay(done.step)
    inputs = None
    with Progress(disable=not progress, transient=True) as bar, ranks_synced():
        task = bar.add_task("QAT", total=epochs, completed=done.epoch)
        for epoch in range(done.epoch, epochs):
            total, count = 0.0, 0
            for inputs, labels in batches:
                steps.before(done.step)
                optimizer.zero_grad()
                loss = loss_fn(first_tensor(call_model(trained, inputs)), labels)
                if not torch.isfinite(loss):
                    raise BadInputError(
                        f"QAT loss became {loss.item()} at step {done.step}; lower lr"
                    )
                loss.backward()
                optimizer.step()
                total, count, done.step = total + loss.item(), count + 1, done.step + 1
            if count == 0:
                raise BadInputError("no training batches: the QAT data is empty")
            done.history.append(_mean_over_ranks(total, count, w))
            done.epoch = epoch + 1
            if w.parallel:
                distributed.check_quantizers_identical(model, epoch)
            if checkpoint is not None:
                checkpoints.save(checkpoint, model, optimizer, done, w)
            bar.advance(task)
    if inputs is None:  # resumed after the last epoch: no step ran
        inputs = next(iter(batches))[0]
    _freeze_ranges(model, activation_quantizers, inputs)
    return LossHistory(done.history, resumed_from)


@dataclass
class _Steps:
    """The schedule of QAT's one-way switches: BN folding freezes its statistics and
    activation observers stop at the steps asked for. replay() puts a resumed run where the
    interrupted one was."""

    model: PreparedModel
    activation_quantizers: list
    freeze_bn_after: int | None
    freeze_observers_after: int | None

    def before(self, step: int) -> None:
        if step == self.freeze_bn_after:
            for m in self.model.modules():
                if isinstance(m, QuantConvBn):
                    m.freeze_bn()
                # every BN normalises by running statistics from now on: the one inside a
                # QuantConvBn (unused once frozen) and one no Conv folds (RepVGG's identity)
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        if step == self.freeze_observers_after:
            for fq in self.activation_quantizers:
                fq.enable_observer(False)

    def replay(self, steps_done: int) -> None:
        for step in (self.freeze_bn_after, self.freeze_observers_after):
            if step is not None and step < steps_done:
                self.before(step)


def _mean_over_ranks(total: float, count: int, w: distributed.World) -> float:
    if not w.parallel:
        return total / count
    sums = torch.tensor([total, float(count)], dtype=torch.float64)
    torch.distributed.all_reduce(sums)
    return float(sums[0] / sums[1])


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared error to the float model's outputs over their mean square: the same
    scale for logits, embeddings or hidden states, and no labels needed."""
    return nn.functional.mse_loss(student, teacher) / teacher.pow(2).mean().clamp_min(1e-12)


def _freeze_ranges(model: PreparedModel, activation_quantizers, inputs) -> None:
    """End as calibrate() ends: activation ranges fixed, so evaluating or exporting the model
    does not move them; weight ranges observed once more on the weights the last step left."""
    model.eval()
    for fq in activation_quantizers:
        fq.enable_observer(False)
    with torch.no_grad():
        call_model(model, inputs)
