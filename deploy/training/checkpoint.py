"""QAT checkpoints: a preempted multi-hour run restarts from its last finished epoch and ends
where an uninterrupted run would have.

One file holds the prepared model's whole state (weights, BN statistics, quantizer scales,
observer statistics and switches), the optimizer, the epoch and step counters, the loss
history and every rank's RNG state. Rank 0 writes it atomically after each epoch (a kill
mid-write leaves the previous epoch's file); on resume rank 0 reads it and broadcasts it.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from qat_deploy.deploy.common.artifacts import write_atomic
from qat_deploy.deploy.common.errors import BadInputError
from qat_deploy.deploy.training.distributed import World

FORMAT = 1


@dataclass
class Progress:
    """Where training stands: finished epochs, optimizer steps, mean loss of each epoch."""

    epoch: int = 0
    step: int = 0
    history: list[float] = field(default_factory=list)


def fingerprint(model: nn.Module, w: World) -> str:
    """Names and shapes of the model's state and the number of ranks: a checkpoint of
    another model, another placement or another world size is refused, not half-loaded."""
    digest = hashlib.sha256(f"ranks={w.size}".encode())
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
    return digest.hexdigest()[:16]


def save(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, done: Progress, w: World
) -> None:
    """Every rank calls this (RNG states are gathered); rank 0 writes."""
    rng = [torch.get_rng_state()]
    if w.parallel:
        rng = [None] * w.size
        dist.all_gather_object(rng, torch.get_rng_state())
    if w.rank != 0:
        return
    state = {
        "format": FORMAT,
        "fingerprint": fingerprint(model, w),
        "epoch": done.epoch,
        "step": done.step,
        "history": done.history,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": rng,
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_atomic(Path(path), buffer.getvalue())


def load(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, w: World) -> Progress:
    """Restore model, optimizer and this rank's RNG from `path`; a missing file is a fresh
    start (epoch 0), so one command line serves the first run and every restart."""
    state = _read(Path(path), fingerprint(model, w)) if w.rank == 0 else None
    if w.parallel:
        box = [state]
        dist.broadcast_object_list(box, src=0)
        state = box[0]
    if isinstance(state, BadInputError):
        raise state
    if state is None:
        return Progress()
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"][w.rank])
    return Progress(state["epoch"], state["step"], list(state["history"]))


def _read(path: Path, expected: str) -> dict | BadInputError | None:
    """The checkpoint, or the error every rank raises (so none waits on the others)."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, not a torch file, unreadable
        return BadInputError(f"cannot read QAT checkpoint {path}: {type(exc).__name__}")
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        return BadInputError(f"{path} is not a QAT checkpoint of this version")
    if state["fingerprint"] != expected:
        return BadInputError(
            f"QAT checkpoint {path} was written for another model, placement or number of "
            "ranks; remove it or drop --resume"
        )
    return state
