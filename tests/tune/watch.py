"""A stand-in for deploy.engines.contention.Watch whose verdicts a test chooses
(tests/engines/test_contention.py checks the real one against real processes)."""

from __future__ import annotations


class ScriptedWatch:
    """Other processes used 2 cores during the first `busy` timings, none after; also its
    own factory, so EngineTimer(watch=ScriptedWatch(n)) counts every timing in one place."""

    def __init__(self, busy: int) -> None:
        self.busy, self.timings, self.others = busy, 0, None

    def __call__(self) -> ScriptedWatch:
        return self

    def __enter__(self) -> ScriptedWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.others = 2.0 if self.timings < self.busy else 0.0
        self.timings += 1
