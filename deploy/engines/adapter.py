"""The contract every backend adapter fulfils (QDQ/fp32 ONNX -> engine artifact -> runner).

Shaped after polygraphy: an adapter builds an artifact on disk and hands out a polygraphy
runner (activate / infer(feed_dict) -> outputs / deactivate) for it, so comparison and timing
code is written once. Adapters live in backends/<name>/adapter.py as ADAPTER.
"""

from __future__ import annotations

import importlib
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import ClassVar

from qat_deploy.deploy.common.errors import (
    BackendUnavailableError,
    BadInputError,
    interruption,
    one_line,
)
from qat_deploy.deploy.rules.backend import get_rules

PRECISIONS = ("int8", "fp32")


@dataclass(frozen=True)
class LayerPrecision:
    """One layer of the built engine as the backend itself reports it."""

    name: str
    layer_type: str  # the backend's own name: QLinearConv, Convolution, CaskConvolution, ...
    precision: str  # "int8" or "float" (fp32/fp16/bf16 are all "float" here)
    compute_kind: str | None = None  # one of deploy.rules.ops.COMPUTE_KINDS, else None


@dataclass
class KernelReport:
    """Which compute layers really run int8 kernels, from the backend's own report."""

    layers: list[LayerPrecision]
    source: str  # how it was obtained, e.g. "optimized model graph", "exec graph rt_info"
    #: compute nodes of the QDQ model the backend's rules keep in float on purpose
    #: (deploy.lint.float_by_rule): the int8 claim is about the others
    float_by_rule: list[str] = field(default_factory=list)
    #: compute nodes of the QDQ model the rules quantize (deploy.lint.quantized_by_rule); None
    #: when not read, and then every compute layer the backend reports counts as planned
    quantized_by_rule: list[str] | None = None

    @property
    def compute_layers(self) -> list[LayerPrecision]:
        return [layer for layer in self.layers if layer.compute_kind is not None]

    @property
    def int8_compute(self) -> list[str]:
        return [lp.name for lp in self.compute_layers if lp.precision == "int8"]

    @property
    def fallback_layers(self) -> list[str]:
        """Compute layers left in float: each one is int8 speed not gained."""
        return [lp.name for lp in self.compute_layers if lp.precision != "int8"]

    @property
    def int8_fraction(self) -> float:
        total = len(self.compute_layers)
        return len(self.int8_compute) / total if total else 0.0

    @property
    def planned_int8(self) -> int:
        """How many compute layers should run int8. Counted on the QDQ model where known: the
        backend's layers need not map one to one onto ONNX nodes (OpenVINO fuses attention,
        so 32 kept-float Linears and their attention MatMuls outnumbered the 38 layers it
        reported for all-MiniLM-L6-v2 while 4 Linears still ran int8)."""
        if self.quantized_by_rule is not None:
            return len(self.quantized_by_rule)
        return max(0, len(self.compute_layers) - len(self.float_by_rule))

    @property
    def int8_fraction_of_quantized(self) -> float:
        """int8 compute layers over those the rules quantize."""
        planned = self.planned_int8
        return min(1.0, len(self.int8_compute) / planned) if planned > 0 else 0.0

    def to_dict(self) -> dict:
        return {
            "int8": len(self.int8_compute),
            "float": len(self.fallback_layers),
            "int8_fraction": self.int8_fraction,
            "float_by_rule": self.float_by_rule,
            "int8_fraction_of_quantized": self.int8_fraction_of_quantized,
            "planned_int8": self.planned_int8,
            "fallback_layers": self.fallback_layers,
            "source": self.source,
            "layers": [asdict(layer) for layer in self.layers],
        }


@dataclass(frozen=True)
class BuiltEngine:
    backend: str
    artifact: Path  # the engine file on disk (optimized ONNX, OpenVINO blob, TensorRT plan)
    onnx_path: Path
    precision: str  # "int8" (from a QDQ model) or "fp32"
    threads: int
    info: dict[str, str] = field(default_factory=dict)  # versions, precision hints, builder


class Adapter(ABC):
    """One backend: build, run, and report precision. Subclasses set `name` and implement the
    hooks; build() does what every backend needs once (argument checks, availability, the
    output folder, the build's timing), in the spirit of polygraphy's BaseRunner *_impl.
    Backend build options are dataclass fields of the adapter, set with with_options()."""

    name: ClassVar[str]

    @abstractmethod
    def unavailable_reason(self) -> str | None:
        """None when the backend can build here; otherwise what is missing, in one line."""

    def require_available(self) -> None:
        reason = self.unavailable_reason()
        if reason is not None:
            raise BackendUnavailableError(f"{self.name} backend unavailable: {reason}")

    def with_options(self, **options: object) -> Adapter:
        """A copy with backend build options set (TensorRT's `sm`); an option this backend
        does not have is bad input, never silently ignored."""
        known = {f.name for f in fields(self)} if is_dataclass(self) else set()
        unknown = sorted(set(options) - known)
        if unknown:
            raise BadInputError(
                f"{self.name} has no build option {', '.join(unknown)}"
                + (f"; it takes {', '.join(sorted(known))}" if known else "")
            )
        return replace(self, **options) if options else self

    def options(self) -> dict[str, object]:
        """The backend build options this adapter builds with (see with_options)."""
        return {f.name: getattr(self, f.name) for f in fields(self)} if is_dataclass(self) else {}

    def build(self, onnx_path: Path, out_dir: Path, *, precision: str, threads: int) -> BuiltEngine:
        """Build the engine artifact into out_dir (the hook writes it atomically)."""
        onnx_path, out_dir = Path(onnx_path), Path(out_dir)
        check_build_args(onnx_path, precision, threads)
        self.require_available()
        out_dir.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        engine = self._build(onnx_path, out_dir, precision=precision, threads=threads)
        engine.info["build_seconds"] = f"{time.perf_counter() - started:.2f}"
        return engine

    @abstractmethod
    def _build(
        self, onnx_path: Path, out_dir: Path, *, precision: str, threads: int
    ) -> BuiltEngine:
        """The backend's build from checked arguments into an existing out_dir; writes its
        artifacts atomically (deploy.common.artifacts)."""

    @abstractmethod
    def runner(self, engine: BuiltEngine):
        """A polygraphy runner (polygraphy.backend.base.BaseRunner) for the built engine.
        Raises BackendUnavailableError where running needs hardware this machine lacks."""

    @abstractmethod
    def kernel_report(self, engine: BuiltEngine) -> KernelReport:
        """Per-layer precision from the backend's own view of the built engine."""


def check_build_args(onnx_path: Path, precision: str, threads: int) -> None:
    """Arguments every adapter's build() takes, checked once for all of them."""
    if not Path(onnx_path).is_file():
        raise BadInputError(f"ONNX model not found: {onnx_path}")
    if precision not in PRECISIONS:
        raise BadInputError(f"bad precision '{precision}'; expected one of {', '.join(PRECISIONS)}")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise BadInputError(f"bad thread count {threads!r}; expected a positive integer")


def get_adapter(target: str) -> Adapter:
    """The ADAPTER of backends/<target>/adapter.py."""
    get_rules(target)  # unknown targets fail here with the list of known ones
    name = f"qat_deploy.backends.{target}.adapter"
    try:
        module = importlib.import_module(name)
    except ImportError as exc:  # the adapter itself, or the runtime it imports
        signalled = interruption(exc)
        if signalled is not None:
            raise signalled from exc
        if exc.name == name:
            raise BackendUnavailableError(f"target '{target}' has no engine adapter yet") from exc
        raise BackendUnavailableError(
            f"{target} backend unavailable: cannot import {exc.name or 'its runtime'} "
            f"({one_line(exc)}); install or repair that package"
        ) from exc
    return module.ADAPTER
