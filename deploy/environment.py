"""Machine and library facts recorded in every report: latency means nothing without them."""

from __future__ import annotations

import os
import platform
from importlib import metadata

#: CPU features that decide int8 speed (VNNI/AMX dot products) or fp32 defaults (bf16).
ISA_FLAGS = (
    "avx2",
    "avx512f",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_int8",
    "amx_bf16",
    "amx_tile",
)
PACKAGES = (
    "qat-deploy",
    "torch",
    "onnx",
    "onnxscript",
    "onnxruntime",
    "openvino",
    "polygraphy",
    "tensorrt",
    "tensorrt-rtx-cu12-bindings",
    "numpy",
)


def _cpuinfo() -> tuple[str, set[str]]:
    model, flags = platform.processor() or "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    return model, flags


def has_int8_dot_product() -> bool:
    """Whether this x86 CPU multiplies int8 with VNNI (or AMX). Without it, int8 kernels use
    AVX2/AVX-512BW vpmaddubsw, which adds pairs of u8 x s8 products in saturating int16.
    Non-x86 CPUs are taken to have it (their int8 dot products accumulate in int32)."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return True
    _, flags = _cpuinfo()
    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})


def environment(threads: int | None = None) -> dict:
    """CPU model and ISA from /proc/cpuinfo, versions from package metadata: cheap to call."""
    model, flags = _cpuinfo()
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return {
        "cpu": model,
        "isa": {flag: flag in flags for flag in ISA_FLAGS},
        "logical_cpus": os.cpu_count(),
        "threads": threads,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
    }
