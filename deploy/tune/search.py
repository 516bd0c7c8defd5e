"""Which regions of a QDQ graph run faster float on the target runtime, found by timing.

Every decision compares two engines built from candidate graphs, timed interleaved in blocks
on the runtime itself (deploy.engines.timing.fastest_block_ratio). A change is taken only when it
saves more than the noise an A/A comparison of the untuned engine measures (and at least MIN_GAIN),
and a second comparison with the roles swapped agrees: on a shared machine one comparison of
a few seconds can be off by 10% or more.
Two passes, the first cheap and coarse:
1. float prefixes: the first k regions in graph order float, k on a grid of eighths. Early
   layers see the largest feature maps, where int8 kernels lose on some runtimes (3x3
   depthwise, 3-channel stems), and one float run with a single Q/DQ transition at its end
   costs less than several short ones.
2. one toggle per region, in graph order, against the best placement so far, until the time
   budget is spent.
At least one region stays int8. Nothing is random: the same timing cache gives the same
placement, and a warm cache needs no engine at all.
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx

from qat_deploy.deploy.common.environment import environment
from qat_deploy.deploy.engines.adapter import Adapter
from qat_deploy.deploy.engines.contention import Watch, is_contended
from qat_deploy.deploy.engines.timing import (
    TimingConfig,
    fastest_block_ratio,
    runner_call,
    time_interleaved,
)
from qat_deploy.deploy.rules.backend import BackendRules
from qat_deploy.deploy.tune.cache import TimingCache, digest
from qat_deploy.deploy.tune.regions import regions, with_float

#: the smallest saving a change must show, whatever the measured noise (3%: below that a
#: shared 2-core machine's paired ratios wander between runs)
MIN_GAIN = 0.03
#: per comparison: 0.6 s of each engine in blocks of 10 after a warm-up (a fresh onnxruntime
#: session of MobileNetV3-S ran 8.6 ms for its first second, 5.5 ms after)
TUNING_TIMING = TimingConfig(warmup=30, block=10, min_runs=60, min_time_s=0.6, rewarm=3)
PREFIX_STEPS = 8
#: a timing that other processes' CPU use spoilt is taken again this many times
CONTENDED_RETRIES = 2
#: activated engines kept for reuse (the best placement is compared again and again)
_KEPT_RUNNERS = 4


@dataclass(frozen=True)
class Change:
    """One comparison: regions moved (to "float" or back to "int8"), the candidate's time
    over the placement it was compared with, and whether it was taken."""

    layers: tuple[str, ...]
    to: str
    time_ratio: float
    taken: bool


@dataclass
class TuneResult:
    regions: int
    float_layers: list[str]
    #: the tuned graph's time over the untuned one's (paired, same run or cache)
    time_ratio: float
    noise: float  # |1 - A/A ratio| of the untuned engine against itself
    threshold: float  # a change is taken below 1 - threshold
    budget_s: float
    seconds: float = 0.0
    exhausted: bool = False  # the budget ran out before every region was tried
    #: comparisons that stayed contended (deploy.engines.contention): no gain, not cached
    contended: int = 0
    retimed: int = 0  # timings taken again because other processes took the cores
    #: the re-prepared model's own export did not time faster than the untuned one (or was
    #: timed while other processes took the cores), which was kept: the float layers it had,
    #: its measured time ratio and whether that timing was contended
    reverted: dict | None = None
    changes: list[Change] = field(default_factory=list)
    cache: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["taken"] = [asdict(c) for c in self.changes if c.taken]
        out["comparisons"] = len(self.changes)
        del out["changes"]
        return out


class EngineTimer:
    """Builds engines of candidate graphs on one backend and times two at a time.

    Ratios go through the cache, keyed by the runtime, this machine, the thread count, the
    timing settings and both graphs' bytes; only those timed with the cores to themselves
    (deploy.engines.contention) are kept."""

    def __init__(
        self,
        adapter: Adapter,
        feed: Mapping[str, np.ndarray],
        threads: int,
        work_dir: Path,
        cache: TimingCache,
        config: TimingConfig = TUNING_TIMING,
        watch: Callable[[], Watch] = Watch,
        retry_pause_s: float = 1.0,
    ) -> None:
        self.adapter, self.feed, self.threads = adapter, dict(feed), threads
        self.work_dir, self.cache, self.config = Path(work_dir), cache, config
        self.watch = watch  # measures other processes' CPU use around each timing
        self.retry_pause_s = retry_pause_s
        self.contended = 0  # comparisons timed while others took our cores, not cached
        self.retimed = 0  # timings taken again because others took our cores
        env = environment(threads)
        identity = {
            "runtime": adapter.name,
            "options": adapter.options(),  # onnxruntime's QDQ propagation, TensorRT's sm
            "cpu": [env["cpu"], env["cpu_id"], env["isa"]],
            "versions": env["versions"],
            "threads": threads,
            "timing": asdict(config),
        }
        self.identity = digest(json.dumps(identity, sort_keys=True, default=str))
        self._runners: OrderedDict[tuple[str, int], object] = OrderedDict()

    def ratio(self, candidate: bytes, reference: bytes) -> float:
        """candidate time / reference time; the same bytes twice is an A/A comparison of
        two separately built engines. A timing during which other processes took this
        process's cores is taken again (CONTENDED_RETRIES times, `retry_pause_s` apart); one that
        stays contended is returned but not cached, and counted in `contended`."""
        key = digest(self.identity, digest(candidate), digest(reference))
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        a = self._runner(candidate, 0)
        b = self._runner(reference, 1 if reference == candidate else 0)
        calls = {"candidate": runner_call(a, self.feed), "reference": runner_call(b, self.feed)}
        for attempt in range(CONTENDED_RETRIES + 1):
            if attempt:
                self.retimed += 1
                time.sleep(self.retry_pause_s)
            with self.watch() as watch:
                latencies = time_interleaved(calls, self.config)
            value = fastest_block_ratio(
                latencies["candidate"], latencies["reference"], self.config.block
            )
            if not is_contended(watch.others, self.threads):
                self.cache.put(key, value)
                return value
        self.contended += 1
        return value

    def _runner(self, graph: bytes, slot: int):
        name = (digest(graph)[:16], slot)
        if name in self._runners:
            self._runners.move_to_end(name)
            return self._runners[name]
        folder = self.work_dir / f"{name[0]}-{slot}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "candidate.qdq.onnx"
        path.write_bytes(graph)
        engine = self.adapter.build(path, folder, precision="int8", threads=self.threads)
        runner = self.adapter.runner(engine)
        runner.activate()
        self._runners[name] = runner
        while len(self._runners) > _KEPT_RUNNERS:
            _, old = self._runners.popitem(last=False)
            old.deactivate()
        return runner

    def close(self) -> None:
        while self._runners:
            _, runner = self._runners.popitem()
            runner.deactivate()


def search(
    model: onnx.ModelProto,
    rules: BackendRules,
    timer: EngineTimer,
    budget_s: float,
    clock: Callable[[], float] = time.monotonic,
) -> TuneResult:
    """The placement (layers to keep float) the timings favour, within `budget_s` seconds."""
    started = clock()
    names = [r.layer for r in regions(model, rules)]
    untuned = model.SerializeToString()

    @functools.lru_cache(maxsize=8)  # the best placement is compared again and again
    def graph(layers: frozenset[str]) -> bytes:
        return (
            untuned if not layers else with_float(model, sorted(layers), rules).SerializeToString()
        )

    noise = abs(1.0 - timer.ratio(untuned, untuned))
    threshold = max(MIN_GAIN, 2 * noise)
    result = TuneResult(len(names), [], 1.0, noise, threshold, budget_s)
    best: frozenset[str] = frozenset()
    if len(names) > 1:
        best = _best_prefix(names, graph, timer, result)
        _toggle_each(names, best, graph, timer, result, lambda: clock() - started > budget_s)
        best = frozenset(result.float_layers)
    result.time_ratio = gain(timer, graph(best), untuned, 0.0)[0] if best else 1.0
    result.contended, result.retimed = timer.contended, timer.retimed
    result.seconds = round(clock() - started, 2)
    result.cache = timer.cache.to_dict()
    return result


def gain(
    timer: EngineTimer, candidate: bytes, reference: bytes, threshold: float
) -> tuple[float, bool]:
    """(candidate / reference time, whether it saves more than `threshold`). Where one
    comparison says it does, the ratio is the geometric mean with a second one, roles swapped,
    and both must agree; a comparison that other processes spoilt shows no gain."""
    before = timer.contended
    ratio = timer.ratio(candidate, reference)
    if ratio < 1 - threshold and timer.contended == before:
        ratio = math.sqrt(ratio / timer.ratio(reference, candidate))
    return ratio, ratio < 1 - threshold and timer.contended == before


def _best_prefix(
    names: Sequence[str], graph, timer: EngineTimer, result: TuneResult
) -> frozenset[str]:
    untuned = graph(frozenset())
    sizes = sorted({math.ceil(len(names) * j / PREFIX_STEPS) for j in range(1, PREFIX_STEPS + 1)})
    measured = []
    for k in (k for k in sizes if 0 < k < len(names)):
        layers = frozenset(names[:k])
        ratio = timer.ratio(graph(layers), untuned)
        measured.append((ratio, k, layers))
        result.changes.append(Change(tuple(names[:k]), "float", ratio, False))
    ratio, k, layers = min(measured, default=(1.0, 0, frozenset()))
    if ratio >= 1 - result.threshold:
        return frozenset()
    ratio, taken = gain(timer, graph(layers), untuned, result.threshold)
    if not taken:
        return frozenset()
    result.changes = [
        Change(c.layers, c.to, ratio if len(c.layers) == k else c.time_ratio, len(c.layers) == k)
        for c in result.changes
    ]
    result.float_layers = [n for n in names if n in layers]
    return layers


def _toggle_each(
    names: Sequence[str],
    best: frozenset[str],
    graph,
    timer: EngineTimer,
    result: TuneResult,
    out_of_time: Callable[[], bool],
) -> None:
    for name in names:
        if out_of_time():
            result.exhausted = True
            break
        candidate = best ^ {name}
        if len(candidate) == len(names):  # at least one region stays int8
            continue
        ratio, taken = gain(timer, graph(candidate), graph(best), result.threshold)
        result.changes.append(
            Change((name,), "float" if name in candidate else "int8", ratio, taken)
        )
        if taken:
            best = candidate
    result.float_layers = [n for n in names if n in best]
