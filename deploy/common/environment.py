"""Machine and library facts recorded in every report: latency means nothing without them.

A CPU is identified by its vendor, family and model number plus the ISA flags that decide int8
speed, not by its name string: the same part reports "... @ 2.10GHz" on one host and a bare
marketing name on another, while two CPUs with one name can differ in AMX or VNNI.
"""

from __future__ import annotations

import os
import platform
import re
from collections.abc import Mapping
from importlib import metadata

#: CPU features that decide int8 speed (VNNI/AMX dot products, AVX-512BW vpmaddubsw, Arm
#: dot-product and matrix-multiply instructions) or fp32 defaults (bf16).
ISA_FLAGS = (
    "avx2",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_int8",
    "amx_bf16",
    "amx_tile",
    "asimddp",
    "i8mm",
)
#: /proc/cpuinfo fields naming the part: x86 first, then their Arm counterparts.
_ID_FIELDS = {
    "vendor": ("vendor_id", "CPU implementer"),
    "family": ("cpu family", "CPU architecture"),
    "model": ("model", "CPU part"),
}
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


def parse_cpuinfo(text: str) -> dict[str, object]:
    """The first processor's fields of /proc/cpuinfo text: `name`, `id` (vendor, family,
    model; only those found) and `flags` (x86 "flags" or Arm "Features")."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break  # later processors repeat the first one
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    ident = {}
    for name, keys in _ID_FIELDS.items():
        found = [fields[k] for k in keys if fields.get(k)]
        if found:
            ident[name] = found[0]
    return {
        "name": fields.get("model name") or platform.processor() or "unknown",
        "id": ident,
        "flags": set((fields.get("flags") or fields.get("Features") or "").split()),
    }


def _cpuinfo() -> dict[str, object]:
    try:
        with open("/proc/cpuinfo") as f:
            return parse_cpuinfo(f.read())
    except OSError:
        return parse_cpuinfo("")


#: x86 ISA flags of int8 dot products that accumulate in int32
INT8_DOT_PRODUCT_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


def has_int8_dot_product() -> bool:
    """Whether this x86 CPU multiplies int8 with VNNI (or AMX). Without it, int8 kernels use
    AVX2/AVX-512BW vpmaddubsw, which adds pairs of u8 x s8 products in saturating int16.
    Non-x86 CPUs are taken to have it (their int8 dot products accumulate in int32)."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return True
    return bool(_cpuinfo()["flags"] & INT8_DOT_PRODUCT_FLAGS)


def environment(threads: int | None = None) -> dict:
    """CPU name, identity and ISA from /proc/cpuinfo, versions from package metadata: cheap
    to call."""
    cpu = _cpuinfo()
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return {
        "cpu": cpu["name"],
        "cpu_id": cpu["id"],
        "isa": {flag: flag in cpu["flags"] for flag in ISA_FLAGS},
        "logical_cpus": os.cpu_count(),
        "threads": threads,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
    }


# ---- comparing two machines ------------------------------------------------------------------


def normalise_cpu_name(name: str) -> str:
    """A name without its clock ("@ 2.10GHz", "3.5 GHz") and with whitespace collapsed: the
    only comparison possible for records made before `cpu_id` existed."""
    name = re.sub(r"@?\s*\d+(?:\.\d+)?\s*[GM]Hz\b", " ", name, flags=re.IGNORECASE)
    return " ".join(name.split()).casefold()


def cpu_difference(baseline: Mapping, here: Mapping) -> str | None:
    """What differs between the CPU recorded in `baseline` and `here` (two environment()
    dicts) that could change int8 speed, e.g. "baseline CPU lacks amx_int8"; None if nothing.

    Vendor, family and model are compared when both records have them, else the normalised
    names; ISA flags only where both records say whether the flag is present."""
    differences = []
    then_id, now_id = baseline.get("cpu_id") or {}, here.get("cpu_id") or {}
    if then_id and now_id:
        if any(then_id.get(k) != now_id.get(k) for k in _ID_FIELDS):
            differences.append(f"baseline CPU is {_describe(then_id)}, this is {_describe(now_id)}")
    else:
        then_name, now_name = str(baseline.get("cpu", "")), str(here.get("cpu", ""))
        if then_name and normalise_cpu_name(then_name) != normalise_cpu_name(now_name):
            differences.append(f"baseline CPU is '{then_name}', this is '{now_name}'")
    then_isa, now_isa = baseline.get("isa") or {}, here.get("isa") or {}
    common = [f for f in ISA_FLAGS if f in then_isa and f in now_isa]
    common += sorted(f for f in then_isa.keys() & now_isa.keys() if f not in ISA_FLAGS)
    lacks_then = [f for f in common if now_isa[f] and not then_isa[f]]
    lacks_now = [f for f in common if then_isa[f] and not now_isa[f]]
    if lacks_then:
        differences.append(f"baseline CPU lacks {', '.join(lacks_then)}")
    if lacks_now:
        differences.append(f"this CPU lacks {', '.join(lacks_now)}")
    return "; ".join(differences) or None


def _describe(ident: Mapping) -> str:
    return " ".join(f"{k} {ident[k]}" for k in _ID_FIELDS if k in ident) or "unidentified"


def available_memory() -> int:
    """Bytes the kernel can hand out without swapping (MemAvailable), else free pages."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
