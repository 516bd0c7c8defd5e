"""A figure a run took, or the reason it could not take it (TensorRT without a GPU, a backend
that is not installed): one shape for latency, accuracy and speedup in report.json and
bench.json, so readers test `measured` instead of guessing from a value's type, and a figure
that was not taken can never be read as a number."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar


@dataclass(frozen=True)
class Measured:
    values: Mapping[str, Any] = field(default_factory=dict)
    measured: ClassVar[bool] = True

    def to_dict(self) -> dict[str, Any]:
        return {"measured": True, **self.values}


@dataclass(frozen=True)
class NotMeasured:
    reason: str
    measured: ClassVar[bool] = False

    def to_dict(self) -> dict[str, Any]:
        return {"measured": False, "reason": self.reason}


Result = Measured | NotMeasured
