"""Data-parallel QAT: torch.distributed's process group, DistributedDataParallel and the
elastic launcher behind torchrun, not a home-made engine.

Every rank prepares and calibrates the same model; each trains on its shard of every global
batch under DDP (gloo for `deploy build`, which trains on the CPU; API users on GPUs bring
their own nccl group); observers reduce their statistics over the ranks
(deploy.quant.sync) and a check after each epoch proves the quantizers stayed identical. Only
rank 0 goes on to export and build. A rank that dies or hangs ends the job within the
collective timeout, naming the rank (exit code deploy.common.errors.RANK_FAILED).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from qat_deploy.deploy.common.errors import (
    RANK_FAILED,
    BadInputError,
    CheckFailedError,
    Interrupted,
    RankFailedError,
)
from qat_deploy.deploy.quant.fake_quant import FakeQuantize

#: seconds a rank waits in a collective for the others before the job fails (a hung rank)
RANK_TIMEOUT_S = 120.0
#: environment variables torchrun and the elastic agent set for each worker
_WORKER_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class World:
    """This process's place in the job: rank 0 of 1 when not data-parallel."""

    rank: int = 0
    size: int = 1

    @property
    def parallel(self) -> bool:
        return self.size > 1


def world() -> World:
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(dist.get_rank(), dist.get_world_size())


def is_worker() -> bool:
    """Started by torchrun or `deploy build --nproc` (the launcher set the worker variables)."""
    return all(name in os.environ for name in _WORKER_ENV)


def join(timeout_s: float = RANK_TIMEOUT_S) -> World:
    """Join the job the launcher started, over gloo: `deploy build` trains on the CPU. (API
    users with the model on GPUs initialise their own nccl group; train_qat follows it.)"""
    if not is_worker() or int(os.environ["WORLD_SIZE"]) < 2:
        return world()
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))
    return world()


def leave() -> None:
    """Wait for every rank, then drop the group: what runs after (rank 0's export and
    build) can never block on a rank that has gone."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def shard(batch, w: World):
    """This rank's rows of a global batch (a tensor, a tuple/list or a dict of them): the
    rows torch.tensor_split gives rank r of w.size, as DistributedSampler deals a dataset."""
    if torch.is_tensor(batch):
        if len(batch) < w.size:
            raise BadInputError(
                f"a batch of {len(batch)} rows cannot be shared by {w.size} ranks; "
                "use a batch size of at least the number of processes"
            )
        return torch.tensor_split(batch, w.size)[w.rank]
    if isinstance(batch, Mapping):
        return {name: shard(value, w) for name, value in batch.items()}
    if isinstance(batch, tuple | list):
        return type(batch)(shard(item, w) for item in batch)
    raise BadInputError(f"cannot shard a batch of type {type(batch).__name__}")


def same_on_all_ranks(value: int, what: str) -> None:
    """Refuse, on every rank, counts that differ between ranks (uneven data would hang DDP)."""
    counts = [None] * dist.get_world_size()
    dist.all_gather_object(counts, value)
    if len(set(counts)) > 1:
        per_rank = ", ".join(f"rank {r}: {c}" for r, c in enumerate(counts))
        raise BadInputError(f"ranks hold different numbers of {what} ({per_rank})")


def synced_batchnorm(model: nn.Module) -> nn.Module:
    """Every BatchNorm (those folded into quantized convs too) as torch's SyncBatchNorm: batch
    statistics over all ranks' shards, as one process sees the global batch. GPUs only."""
    if next(model.parameters()).device.type != "cuda":
        raise BadInputError(
            "sync_batchnorm needs the model on GPUs: torch's SyncBatchNorm has no CPU kernel "
            "(without it, BatchNorm statistics are rank 0's)"
        )
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def data_parallel(model: nn.Module) -> nn.Module:
    """DDP over the prepared model. It broadcasts rank 0's parameters and buffers at the
    start and its buffers (BN statistics, quantizer state) before each forward. Parameters
    the loss never reaches are expected: a Hugging Face encoder trained on its first output
    leaves its pooler out, and DDP without find_unused_parameters then fails the second step
    (seen on MiniLM-L6)."""
    device = next(model.parameters()).device
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)


def check_quantizers_identical(model: nn.Module, epoch: int) -> None:
    """After an epoch every rank must hold the same quantizer scales, zero points and
    observer statistics; names the first quantizer and rank that differ."""
    mine = {
        name: torch.cat([t.detach().double().reshape(-1).cpu() for t in _state(module)])
        for name, module in model.named_modules()
        if isinstance(module, FakeQuantize)
    }
    gathered: list[dict | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    reference = gathered[0]
    for rank, theirs in enumerate(gathered[1:], start=1):
        for name, values in reference.items():
            if not torch.equal(values, theirs[name]):
                raise CheckFailedError(
                    f"after epoch {epoch + 1} quantizer {name} differs between rank 0 and "
                    f"rank {rank}: data-parallel QAT diverged"
                )


def _state(quantizer: FakeQuantize) -> list[torch.Tensor]:
    scale, zero_point = quantizer.effective_qparams()
    observer = quantizer.observer
    return [scale, zero_point, observer.min_val, observer.max_val]


def launch(nproc: int, argv: Sequence[str]) -> int:
    """Run `deploy <argv>` in `nproc` worker processes through torch's elastic launcher (what
    torchrun runs); returns the job's exit code. A rank that fails with a documented code
    gives that code; one killed by a signal, or a hang, gives RANK_FAILED with one line
    naming the rank."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if nproc < 1:
        raise BadInputError(f"--nproc must be >= 1, got {nproc}")
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        run_id=str(uuid.uuid4()),
        max_restarts=0,
        monitor_interval=0.5,
    )
    # the agent logs every worker it stops; the job's outcome is our one line
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        elastic_launch(config, sys.executable)("-m", "qat_deploy.deploy", *argv)
    except SignalException as exc:
        raise Interrupted(int(exc.sigval)) from exc
    except ChildFailedError as exc:
        return _job_exit_code(exc.failures)
    return 0


def _job_exit_code(failures: Mapping) -> int:
    """The cause among the failed ranks: one killed by a signal other than the launcher's
    SIGTERM, else one that failed on its own, before those the launcher stopped or that only
    lost contact with the cause."""

    def signal_of(failure) -> str | None:
        if failure.exitcode < 0:
            return failure.signal_name()
        if failure.exitcode > 128:  # a rank that caught the signal exits 128 + its number
            with contextlib.suppress(ValueError):
                return signal.Signals(failure.exitcode - 128).name
        return None

    def rank_order(item) -> tuple[int, float]:
        failure = item[1]
        name = signal_of(failure)
        if name is not None and name != "SIGTERM":
            return 0, failure.timestamp
        if name is None and failure.exitcode != RANK_FAILED:
            return 1, failure.timestamp
        return 2, failure.timestamp

    rank, failure = min(failures.items(), key=rank_order)
    name = signal_of(failure)
    if name is None:
        return failure.exitcode  # the rank printed its own one-line error
    raise RankFailedError(f"rank {rank} was stopped by {name}; the other ranks were stopped")
