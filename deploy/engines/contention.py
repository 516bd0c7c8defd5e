"""How much CPU other processes took from the cores this process may run on, while it timed.

A timing taken while another process competes for the engine's cores is slow by an amount that
has nothing to do with the engine, and the latency tuner must neither act on it nor keep it in
its cache (a build next to a test run once floated 6 of Swin's 37 layers, and every later run
replayed that from the cache). The 1-minute load average lags by a minute and counts this
process too; the kernel's per-CPU counters (/proc/stat) less this process's own CPU time
(os.times) say what others used in exactly the timed interval. The hypervisor's steal time
counts as used: a vCPU lent to another guest is as busy for us as one a neighbour took.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

#: other processes may use this much CPU (in cores) beyond the cores the engine leaves idle
#: before a timing counts as contended: an idle Linux box's daemons use about 0.02
TOLERATED_CORES = 0.25
_STAT = Path("/proc/stat")
#: /proc/stat fields after the CPU name that are busy time: user nice system (idle iowait)
#: irq softirq steal; guest time is already in user
_BUSY_FIELDS = (0, 1, 2, 5, 6, 7)


@dataclass(frozen=True)
class Snapshot:
    wall_s: float
    busy_s: float  # all processes on this process's CPUs
    own_s: float  # this process, every thread


def cpu_set() -> set[int]:
    """The CPUs this process may run on."""
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return set(range(os.cpu_count() or 1))


def snapshot() -> Snapshot | None:
    """Counters now; None where the kernel does not expose /proc/stat (not Linux)."""
    cpus = cpu_set()
    try:
        lines = _STAT.read_text().splitlines()
    except OSError:
        return None
    ticks = 0
    for line in lines:
        name, _, rest = line.partition(" ")
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            fields = rest.split()
            ticks += sum(int(fields[i]) for i in _BUSY_FIELDS if i < len(fields))
    own = os.times()
    return Snapshot(time.monotonic(), ticks / os.sysconf("SC_CLK_TCK"), own.user + own.system)


def others_cores(before: Snapshot | None, after: Snapshot | None) -> float | None:
    """Average cores other processes used between two snapshots (None: not measurable)."""
    if before is None or after is None or after.wall_s <= before.wall_s:
        return None
    others = (after.busy_s - before.busy_s) - (after.own_s - before.own_s)
    return max(0.0, others / (after.wall_s - before.wall_s))


class Watch:
    """`with Watch() as w:` ... then `w.others`: cores other processes used meanwhile."""

    others: float | None = None

    def __enter__(self) -> Watch:
        self._before = snapshot()
        return self

    def __exit__(self, *exc: object) -> None:
        self.others = others_cores(self._before, snapshot())


def is_contended(others: float | None, threads: int, cpus: int | None = None) -> bool:
    """Others used more than the cores `threads` leave idle, plus TOLERATED_CORES; unknown
    (None) is not contended, so timing works as before where it cannot be measured."""
    if others is None:
        return False
    idle = max(0, (len(cpu_set()) if cpus is None else cpus) - threads)
    return others > idle + TOLERATED_CORES
