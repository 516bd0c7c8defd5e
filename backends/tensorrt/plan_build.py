"""What either TensorRT build path hands back to the adapter."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PlanBuild:
    plan: bytes  # the serialized engine
    layer_info: str  # the engine layer information as the builder reported it
    layer_info_format: str  # "text" (RTX build log) or "json" (engine inspector)
    builder: str  # e.g. "TensorRT-RTX 1.7.1.116" or "TensorRT 10.13.0 (datacenter)"
    compute_capability: str  # e.g. "SM89"
    seconds: float
    warnings: tuple[str, ...] = ()
