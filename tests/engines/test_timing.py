"""Timing logic on a fake clock: what gets timed, when measuring stops, how engines alternate.

No assertion here depends on how fast this machine is.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from qat_deploy.deploy.common.errors import BadInputError
from qat_deploy.deploy.engines.timing import (
    TimingConfig,
    paired_ratio,
    runner_call,
    summarize,
    time_callable,
    time_interleaved,
)


class FakeClock:
    """Nanoseconds that advance only when a fake engine 'runs'."""

    def __init__(self) -> None:
        self.ns = 0
        self.calls: list[str] = []

    def __call__(self) -> int:
        return self.ns

    def engine(self, name: str, ms: Callable[[int], float]) -> Callable[[], None]:
        """A callable whose n-th call (counted over all engines) takes ms(n) milliseconds."""

        def run() -> None:
            self.ns += round(ms(len(self.calls)) * 1e6)
            self.calls.append(name)

        return run


def test_warmup_is_untimed_and_runs_stop_at_the_block_boundary_after_min_runs():
    clock = FakeClock()
    warm_then_fast = clock.engine("a", lambda n: 100.0 if n < 3 else 2.0)
    config = TimingConfig(warmup=3, block=4, min_runs=10, min_time_s=0)
    latencies = time_callable(warm_then_fast, config, clock)
    assert latencies == [2.0] * 12  # 3 blocks of 4: the first block boundary past 10 runs
    assert len(clock.calls) == 3 + 12  # a lone engine is not re-warmed between blocks


def test_min_time_keeps_measuring_past_min_runs():
    clock = FakeClock()
    config = TimingConfig(warmup=0, block=5, min_runs=1, min_time_s=0.023)
    latencies = time_callable(clock.engine("a", lambda n: 1.0), config, clock)
    assert len(latencies) == 25  # 23 ms of 1 ms runs, rounded up to whole blocks


def test_interleaved_alternates_order_and_rewarms_each_block():
    clock = FakeClock()
    fns = {"A": clock.engine("A", lambda n: 1.0), "B": clock.engine("B", lambda n: 1.0)}
    config = TimingConfig(warmup=1, rewarm=1, block=2, min_runs=4, min_time_s=0)
    latencies = time_interleaved(fns, config, clock)
    assert {name: len(ms) for name, ms in latencies.items()} == {"A": 4, "B": 4}
    # round 1: A (warm + 2), B (warm + 2); round 2 reversed: B (rewarm + 2), A (rewarm + 2)
    assert clock.calls == ["A"] * 3 + ["B"] * 6 + ["A"] * 3


def test_three_engines_rotate_so_none_is_spared_the_cost_of_switching():
    """A call runs 1 ms slower while another engine ran within the last 3 calls (a cost that
    lingers past the re-warm: caches, sleeping worker threads). Three identical engines must
    measure alike. Alternating A B C, C B A put B after another engine in every round and
    A, C after themselves in every other one: B's p50 read 1.33x theirs."""
    clock = FakeClock()

    def switching_cost(name: str) -> Callable[[int], float]:
        return lambda n: 1.0 + any(other != name for other in clock.calls[max(0, n - 3) : n])

    fns = {name: clock.engine(name, switching_cost(name)) for name in "ABC"}
    config = TimingConfig(warmup=1, rewarm=1, block=2, min_runs=12, min_time_s=0)
    latencies = time_interleaved(fns, config, clock)
    p50 = {name: summarize(ms).p50 for name, ms in latencies.items()}
    assert p50["A"] == p50["B"] == p50["C"]
    starts = [name for i, name in enumerate(clock.calls) if i == 0 or clock.calls[i - 1] != name]
    assert len(starts) == len(clock.calls) // 3  # no block follows one of its own engine's


def test_interleaving_cancels_linear_drift_that_sequential_timing_suffers():
    drift = lambda n: 1.0 + 0.01 * n  # noqa: E731 - the machine slows down call by call
    config = TimingConfig(warmup=1, rewarm=1, block=2, min_runs=4, min_time_s=0)

    clock = FakeClock()
    fns = {"A": clock.engine("A", drift), "B": clock.engine("B", drift)}
    interleaved = time_interleaved(fns, config, clock)
    assert summarize(interleaved["A"]).mean == pytest.approx(summarize(interleaved["B"]).mean)

    clock = FakeClock()
    first = time_callable(clock.engine("A", drift), config, clock)
    second = time_callable(clock.engine("B", drift), config, clock)
    assert summarize(second).mean > summarize(first).mean  # same engine, "slower" for going last


def test_every_engine_gets_the_same_number_of_blocks():
    clock = FakeClock()
    fns = {
        "fast": clock.engine("fast", lambda n: 1.0),
        "slow": clock.engine("slow", lambda n: 10.0),
    }
    config = TimingConfig(warmup=0, rewarm=0, block=2, min_runs=1, min_time_s=0.05)
    latencies = time_interleaved(fns, config, clock)
    assert len(latencies["fast"]) == len(latencies["slow"]) == 50  # until "fast" has 50 ms
    assert sum(latencies["fast"]) >= 50 and sum(latencies["slow"]) >= 50


def test_summary_percentiles_interpolate_between_order_statistics():
    summary = summarize([4.0, 1.0, 3.0, 2.0, 5.0])
    assert summary.runs == 5 and summary.mean == 3.0 and summary.p50 == 3.0
    assert summary.p90 == pytest.approx(4.6)  # position 0.9 * 4 = 3.6 between 4 and 5
    assert summary.p99 == pytest.approx(4.96)
    assert summarize([7.0]).to_dict() == {
        "p50": 7.0,
        "p90": 7.0,
        "p99": 7.0,
        "mean": 7.0,
        "runs": 1,
    }


def test_runner_call_runs_one_inference_without_input_checks():
    class Runner:
        def __init__(self) -> None:
            self.seen: list[tuple[dict, bool]] = []

        def infer(self, feed, check_inputs=True):
            self.seen.append((feed, check_inputs))

    runner, feed = Runner(), {"x": 1}
    config = TimingConfig(warmup=1, block=1, min_runs=2, min_time_s=0)
    time_callable(runner_call(runner, feed), config)
    assert runner.seen == [(feed, False)] * 3


def test_real_clock_returns_one_latency_per_timed_run():
    config = TimingConfig(warmup=0, block=3, min_runs=3, min_time_s=0)
    latencies = time_callable(lambda: None, config)
    assert len(latencies) >= 3 and min(latencies) >= 0


@pytest.mark.parametrize(
    "field, value",
    [
        ("block", 0),
        ("min_runs", 0),
        ("warmup", -1),
        ("rewarm", 1.5),
        ("block", True),
        ("min_time_s", float("nan")),
        ("min_time_s", -1),
    ],
)
def test_bad_config_is_bad_input(field, value):
    with pytest.raises(BadInputError, match=field):
        TimingConfig(**{field: value})


def test_nothing_to_time_or_summarize_is_bad_input():
    with pytest.raises(BadInputError):
        time_interleaved({})
    with pytest.raises(BadInputError):
        summarize([])


def test_paired_ratio_is_the_median_of_per_round_block_ratios():
    """Load that slows a whole round scales both engines' blocks and cancels in their ratio;
    one disturbed round (a neighbour's burst during one block) moves the median ratio not at
    all, where a ratio of overall medians mixes blocks from different rounds."""
    load = [1.0, 1.0, 3.0, 3.0, 3.0]  # the machine got busy after round 2
    fp32 = [2.0 * x for x in load]
    int8 = list(load)
    int8[2] *= 5  # a burst hit int8's block in round 3 only
    blocks = 4
    fp32_ms = [v for v in fp32 for _ in range(blocks)]
    int8_ms = [v for v in int8 for _ in range(blocks)]
    assert paired_ratio(fp32_ms, int8_ms, block=blocks) == pytest.approx(2.0)
    int8_ms = [v for v in [1.0, 1.0, 1.0, 3.0, 15.0] for _ in range(blocks)]  # other rounds
    assert paired_ratio(fp32_ms, int8_ms, block=blocks) == pytest.approx(2.0)
    assert sorted(fp32_ms)[10] / sorted(int8_ms)[10] == pytest.approx(6.0)  # unpaired: 3x off
    assert paired_ratio([1.0] * 12, [2.0] * 12, block=5) == pytest.approx(0.5)  # whole blocks


def test_paired_ratio_needs_a_whole_block():
    with pytest.raises(BadInputError, match="no whole block"):
        paired_ratio([1.0, 2.0], [1.0, 2.0], block=5)
