"""Latency measured in blocks, so caches, clocks and a noisy machine bias every engine alike.

Each iteration is timed on its own (perf_counter_ns) so percentiles are real per-inference
latencies. Measuring stops at a block boundary once both `min_runs` iterations and `min_time_s`
of measured time are reached. Interleaved mode times several engines block by block, re-warming
each before its block (timing engines round-robin one inference at a time evicts their caches
and inflated fp32 times about 2x here) and rotating the order (A B C, B C A, C A B, ...): every
engine takes every place in a round equally often, so linear drift of the machine cancels out
instead of favouring whichever engine runs first. With two engines that is A B, B A, and each
follows itself at every other round boundary; with three or more no engine ever follows itself,
so none is spared the cost of switching engines that the others pay (alternating A B C, C B A
put B after another engine every time and A, C only half the time).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from qat_deploy.deploy.common.errors import BadInputError

Clock = Callable[[], int]  # nanoseconds, monotonic


@dataclass(frozen=True)
class TimingConfig:
    warmup: int = 10  # untimed iterations before the first block
    block: int = 10  # iterations per timed block
    min_runs: int = 50
    min_time_s: float = 1.0
    rewarm: int = 2  # untimed iterations before each later block (interleaved mode)

    def __post_init__(self) -> None:
        minimum = {"warmup": 0, "rewarm": 0, "block": 1, "min_runs": 1}
        for key, low in minimum.items():
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise BadInputError(f"bad timing {key} {value!r}; expected an integer >= {low}")
        t = self.min_time_s
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t >= 0:  # NaN fails too
            raise BadInputError(f"bad timing min_time_s {self.min_time_s!r}; expected >= 0")


@dataclass(frozen=True)
class TimingSummary:
    p50: float
    p90: float
    p99: float
    mean: float
    runs: int

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def time_callable(
    fn: Callable[[], object],
    config: TimingConfig | None = None,
    clock: Clock = time.perf_counter_ns,
) -> list[float]:
    """Per-iteration latencies in ms of a zero-argument callable."""
    return time_interleaved({"fn": fn}, config, clock)["fn"]


def runner_call(runner, feed: Mapping[str, object]) -> Callable[[], object]:
    """A zero-argument callable running one inference on an activated polygraphy runner.

    Input checking is skipped: it is per-call Python work that is not the engine's latency.
    """
    return lambda: runner.infer(feed, check_inputs=False)


def time_interleaved(
    fns: Mapping[str, Callable[[], object]],
    config: TimingConfig | None = None,
    clock: Clock = time.perf_counter_ns,
) -> dict[str, list[float]]:
    """Latencies in ms per engine, timed block by block in rotating order until each has enough.

    All engines get the same number of blocks, so each sees the same stretch of machine time.
    """
    if not fns:
        raise BadInputError("nothing to time: no engines given")
    config = config or TimingConfig()
    names = list(fns)
    latencies: dict[str, list[float]] = {name: [] for name in names}
    rewarm = config.rewarm if len(names) > 1 else 0  # alone, nothing evicts the engine's caches
    round_index = 0
    while not all(_enough(latencies[name], config) for name in names):
        shift = round_index % len(names)
        order = names[shift:] + names[:shift]
        for name in order:
            warm = config.warmup if not latencies[name] else rewarm
            for _ in range(warm):
                fns[name]()
            latencies[name].extend(_block(fns[name], config.block, clock))
        round_index += 1
    return latencies


def _block(fn: Callable[[], object], iterations: int, clock: Clock) -> list[float]:
    out = []
    for _ in range(iterations):
        start = clock()
        fn()
        out.append((clock() - start) / 1e6)
    return out


def _enough(latencies_ms: list[float], config: TimingConfig) -> bool:
    return len(latencies_ms) >= config.min_runs and sum(latencies_ms) >= config.min_time_s * 1e3


def summarize(latencies_ms: list[float]) -> TimingSummary:
    """Percentiles (linear interpolation between order statistics, as numpy's default) and mean."""
    if not latencies_ms:
        raise BadInputError("no latencies to summarize")
    ordered = sorted(latencies_ms)
    return TimingSummary(
        p50=_percentile(ordered, 50),
        p90=_percentile(ordered, 90),
        p99=_percentile(ordered, 99),
        mean=sum(ordered) / len(ordered),
        runs=len(ordered),
    )


def _percentile(ordered: list[float], q: float) -> float:
    pos = q / 100 * (len(ordered) - 1)
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def block_medians(latencies_ms: Sequence[float], block: int) -> np.ndarray:
    """Median of each timed block (time_interleaved fills whole blocks, in time order)."""
    values = np.asarray(latencies_ms, dtype=np.float64)
    count = len(values) // block
    return np.median(values[: count * block].reshape(count, block), axis=1)


def fastest_block_ratio(a_ms: Sequence[float], b_ms: Sequence[float], block: int) -> float:
    """a / b as the ratio of each engine's fastest block median: for decisions made from a
    few seconds of timing on a shared machine (deploy.tune). Interference only ever adds time,
    and on a shared 2-core EPYC block medians of one engine ranged 5.4-16.6 ms within 2 s, so
    per-round paired ratios of an engine against itself swung 0.57-1.94; the fastest blocks
    agreed within 2% (A/A 1.007 over the same timings)."""
    a, b = block_medians(a_ms, block), block_medians(b_ms, block)
    if len(a) == 0 or len(b) == 0:
        raise BadInputError(f"no whole block of {block} timings to compare")
    return float(a.min() / b.min())


def paired_ratio(a_ms: Sequence[float], b_ms: Sequence[float], block: int) -> float:
    """a / b as the median over rounds of (a's block median / b's block median): the one
    speedup every entry point reports (speedup = paired_ratio(fp32, int8)). time_interleaved
    runs one block of each engine per round, so each ratio compares blocks timed
    milliseconds apart, and load that comes and goes between rounds cancels out; a ratio of
    two overall medians could take each from a different stretch of a shared machine."""
    a, b = block_medians(a_ms, block), block_medians(b_ms, block)
    rounds = min(len(a), len(b))
    if rounds == 0:
        raise BadInputError(f"no whole block of {block} timings to compare")
    return float(np.median(a[:rounds] / b[:rounds]))
