"""The latency search: its decisions against a cost model whose best placement is known, and
on a real onnxruntime engine, that a warm timing cache gives the same placement without
building or timing anything."""

from __future__ import annotations

import json
import time

import onnx
import pytest
import torch
from torch import nn

from qat_deploy.deploy.engines.adapter import get_adapter
from qat_deploy.deploy.engines.timing import TimingConfig
from qat_deploy.deploy.export.qdq import export
from qat_deploy.deploy.frontend.prepare import prepare
from qat_deploy.deploy.rules.backend import get_rules
from qat_deploy.deploy.rules.ops import FLOAT_KEY, layer_of
from qat_deploy.deploy.training.calibrate import calibrate
from qat_deploy.deploy.tune.cache import TimingCache
from qat_deploy.deploy.tune.regions import regions
from qat_deploy.deploy.tune.search import MIN_GAIN, EngineTimer, search
from tests.tune.watch import ScriptedWatch

IMG = torch.randn(1, 8, 16, 16, generator=torch.Generator().manual_seed(0))
#: brief timings: the cache test is about what a second search does, not about speed
QUICK = TimingConfig(warmup=2, block=5, min_runs=10, min_time_s=0.05, rewarm=1)


class Chain(nn.Module):
    """Five convs in a row, ReLU between them."""

    def __init__(self, c=8, depth=5):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(c, c, 3, padding=1) for _ in range(depth))

    def forward(self, x):
        for conv in self.convs:
            x = torch.relu(conv(x))
        return x


@pytest.fixture(scope="module")
def untuned(tmp_path_factory) -> onnx.ModelProto:
    prepared = prepare(Chain().eval(), "onnxruntime", IMG, reduce_range=False)
    calibrate(prepared, [IMG], progress=False)
    return onnx.load(export(prepared, tmp_path_factory.mktemp("chain") / "chain.onnx", IMG))


class CostModel:
    """A timer that reads the placement off each graph: a layer costs `int8[layer]` or
    `float_[layer]`, each QuantizeLinear `transition`. The search sees ratios only, as from
    real engines."""

    def __init__(self, int8: dict, float_: dict, transition: float = 0.0) -> None:
        self.int8, self.float_, self.transition = int8, float_, transition
        self.cache = TimingCache(None)
        self.comparisons = self.contended = self.retimed = 0
        self.busy = False  # every comparison contended, as EngineTimer counts them

    def cost(self, graph: bytes) -> float:
        model = onnx.load_from_string(graph)
        total = 0.0
        for node in model.graph.node:
            layer = layer_of(node)
            if node.op_type == "Conv":
                is_float = any(p.key == FLOAT_KEY for p in node.metadata_props)
                total += (self.float_ if is_float else self.int8)[layer]
            total += self.transition * (node.op_type == "QuantizeLinear")
        return total

    def ratio(self, candidate: bytes, reference: bytes) -> float:
        self.comparisons += 1
        self.contended += self.busy
        return self.cost(candidate) / self.cost(reference)


def layers(untuned):
    return [r.layer for r in regions(untuned, get_rules("onnxruntime"))]


def test_slow_int8_layers_at_the_front_go_float_and_fast_ones_stay(untuned):
    names = layers(untuned)
    assert len(names) == 5
    # the first two run 3x slower in int8, the others 3x faster
    int8 = {n: 3.0 if i < 2 else 1.0 for i, n in enumerate(names)}
    float_ = {n: 1.0 if i < 2 else 3.0 for i, n in enumerate(names)}
    result = search(untuned, get_rules("onnxruntime"), CostModel(int8, float_), budget_s=60)
    assert result.float_layers == names[:2]
    assert result.time_ratio == pytest.approx((1 + 1 + 3 * 1) / (3 + 3 + 3 * 1))
    assert all(
        change.time_ratio < 1 - result.threshold for change in result.changes if change.taken
    )


def test_a_middle_layer_alone_is_found_by_the_toggle_pass(untuned):
    names = layers(untuned)
    int8 = dict.fromkeys(names, 1.0) | {names[3]: 4.0}
    float_ = dict.fromkeys(names, 2.0)
    result = search(untuned, get_rules("onnxruntime"), CostModel(int8, float_), budget_s=60)
    assert result.float_layers == [names[3]]


def test_nothing_moves_when_int8_is_faster_everywhere(untuned):
    names = layers(untuned)
    timer = CostModel(dict.fromkeys(names, 1.0), dict.fromkeys(names, 2.0))
    result = search(untuned, get_rules("onnxruntime"), timer, budget_s=60)
    assert result.float_layers == [] and result.time_ratio == 1.0


def test_one_layer_stays_int8_when_float_is_faster_everywhere(untuned):
    names = layers(untuned)
    timer = CostModel(dict.fromkeys(names, 2.0), dict.fromkeys(names, 1.0))
    result = search(untuned, get_rules("onnxruntime"), timer, budget_s=60)
    assert len(result.float_layers) == len(names) - 1


def test_a_gain_within_the_threshold_is_not_taken(untuned):
    names = layers(untuned)
    saving = MIN_GAIN / 2  # layer 4 float saves under MIN_GAIN of the total
    int8 = dict.fromkeys(names, 1.0)
    float_ = dict.fromkeys(names, 2.0) | {names[4]: 1.0 - saving * len(names)}
    result = search(untuned, get_rules("onnxruntime"), CostModel(int8, float_), budget_s=60)
    assert result.float_layers == []


def test_the_budget_stops_the_toggle_pass(untuned):
    names = layers(untuned)
    timer = CostModel(dict.fromkeys(names, 1.0), dict.fromkeys(names, 2.0))
    ticks = iter(range(0, 10_000, 100))  # every clock reading is 100 s later
    result = search(untuned, get_rules("onnxruntime"), timer, 150, clock=lambda: next(ticks))
    assert result.exhausted
    toggles = [c for c in result.changes if len(c.layers) == 1 and c.layers != (names[0],)]
    assert len(toggles) < len(names) - 1


def test_no_gain_is_taken_from_contended_comparisons(untuned):
    """The front layers' 3x gain of the first test, but other processes took the CPU during
    every comparison: nothing moves."""
    names = layers(untuned)
    int8 = {n: 3.0 if i < 2 else 1.0 for i, n in enumerate(names)}
    float_ = {n: 1.0 if i < 2 else 3.0 for i, n in enumerate(names)}
    timer = CostModel(int8, float_)
    timer.busy = True
    result = search(untuned, get_rules("onnxruntime"), timer, budget_s=60)
    assert result.float_layers == [] and result.contended == timer.comparisons > 0


def _timer(untuned, work, cache, watch) -> EngineTimer:
    adapter = get_adapter("onnxruntime")
    feed = {untuned.graph.input[0].name: IMG.numpy()}
    return EngineTimer(adapter, feed, 1, work, cache, QUICK, watch, retry_pause_s=0.0)


def _search_on_real_engines(untuned, tmp_path, busy: int) -> tuple:
    """A cold search on real onnxruntime engines, its CPU busy for the first `busy` timings."""
    cache, watch = TimingCache(tmp_path / "cache.json"), ScriptedWatch(busy)
    timer = _timer(untuned, tmp_path / "work", cache, watch)
    try:
        result = search(untuned, get_rules("onnxruntime"), timer, budget_s=120)
    finally:
        timer.close()
        cache.save()
    return result, watch


def test_a_timing_that_stays_contended_is_retried_then_neither_cached_nor_taken(untuned, tmp_path):
    """Other processes keep the CPU busy: every comparison is timed three times, none is
    cached, and the untuned placement stands."""
    result, watch = _search_on_real_engines(untuned, tmp_path, busy=10**6)
    misses = result.cache["misses"]
    assert result.contended == misses > 0 and watch.timings == 3 * misses
    assert result.retimed == 2 * misses
    assert result.float_layers == [] and not (tmp_path / "cache.json").exists()


def test_a_timing_contended_only_at_first_is_retried_and_cached(untuned, tmp_path):
    result, watch = _search_on_real_engines(untuned, tmp_path, busy=2)
    misses = result.cache["misses"]
    assert result.contended == 0 and watch.timings == misses + 2 and result.retimed == 2
    assert len(json.loads((tmp_path / "cache.json").read_text())["entries"]) == misses


def test_a_warm_cache_gives_the_same_placement_without_timing(untuned, tmp_path):
    """Real onnxruntime engines the first time; the second search reads every ratio from the
    cache file: no engine is built, and it is at least 10x faster."""
    rules = get_rules("onnxruntime")

    def run(work):
        cache = TimingCache(tmp_path / "cache.json")
        # a quiet CPU, so that other test workers cannot keep a timing out of the cache
        timer = _timer(untuned, work, cache, ScriptedWatch(busy=0))
        started = time.perf_counter()
        try:
            result = search(untuned, rules, timer, budget_s=120)
        finally:
            timer.close()
            cache.save()
        return result, time.perf_counter() - started

    cold, cold_s = run(tmp_path / "cold")
    assert cold.cache["misses"] > 0 and any((tmp_path / "cold").iterdir())
    warm, warm_s = run(tmp_path / "warm")
    assert warm.cache["misses"] == 0
    assert warm.cache["hits"] == cold.cache["hits"] + cold.cache["misses"]
    assert not (tmp_path / "warm").exists()
    assert warm.float_layers == cold.float_layers and warm.time_ratio == cold.time_ratio
    assert cold_s >= 10 * warm_s


def test_an_unreadable_cache_is_reported_and_replaced(tmp_path):
    path = tmp_path / "cache.json"
    path.write_text("{not json")
    cache = TimingCache(path)
    assert cache.problem is not None and "unreadable" in cache.problem
    cache.put("k", 0.5)
    cache.save()
    assert TimingCache(path).get("k") == 0.5


def test_a_cache_from_before_contention_checks_is_set_aside(tmp_path):
    """Version-1 files stored every timing, those taken under load too: none is replayed,
    and the next save writes only this run's entries."""
    path = tmp_path / "cache.json"
    path.write_text(json.dumps({"version": 1, "entries": {"old": 0.5}}))
    cache = TimingCache(path)
    assert cache.get("old") is None and "another format" in cache.problem
    cache.put("new", 0.9)
    cache.save()
    assert json.loads(path.read_text())["entries"] == {"new": 0.9}


def test_a_cache_that_cannot_be_written_is_reported_not_raised(tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the cache's folder would go")
    cache = TimingCache(blocker / "cache.json")
    cache.put("k", 0.5)
    cache.save()
    assert cache.problem is not None and "not saved" in cache.problem
