"""Observer statistics shared across data-parallel ranks.

Each rank of a data-parallel run sees its own shard of every global batch. Observers reduce
what they saw over all ranks before they update (min and max by MIN/MAX, histogram counts by
SUM), so every rank holds the statistics a single process would have on the whole global batch:
the same scales everywhere, and the same as one process. Active only inside `ranks_synced`,
because a collective that one rank never reaches would hang the others.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist

_active: list[object] = []  # the process group of the innermost ranks_synced block


@contextlib.contextmanager
def ranks_synced(group: object | None = None) -> Iterator[None]:
    """For the block, observers reduce their statistics over `group` (default: the world)."""
    _active.append(group)
    try:
        yield
    finally:
        _active.pop()


def _group() -> tuple[bool, object | None]:
    if not _active or not dist.is_initialized():
        return False, None
    group = _active[-1]
    return dist.get_world_size(group) > 1, group


def reduce_range(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch's (min, max) from each rank's own."""
    synced, group = _group()
    if not synced:
        return lo, hi
    lo, hi = lo.detach().clone().contiguous(), hi.detach().clone().contiguous()
    dist.all_reduce(lo, dist.ReduceOp.MIN, group=group)
    dist.all_reduce(hi, dist.ReduceOp.MAX, group=group)
    return lo, hi


def reduce_counts(counts: torch.Tensor) -> torch.Tensor:
    """Histogram counts summed over ranks (float64 integers: exact in any order)."""
    synced, group = _group()
    if synced:
        dist.all_reduce(counts, dist.ReduceOp.SUM, group=group)
    return counts
