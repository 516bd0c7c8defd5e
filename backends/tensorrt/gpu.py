"""Is there an NVIDIA GPU here? Asked of the CUDA driver itself (libcuda via ctypes).

torch is a CPU build in this project, so torch.cuda cannot answer. The driver library is what
TensorRT needs at run time: if it does not load, or it finds no device, no engine can run.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

_CUDA_SUCCESS = 0
_ATTR_CC_MAJOR = 75  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
_ATTR_CC_MINOR = 76  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR


@dataclass(frozen=True)
class GpuProbe:
    """Device 0's name and compute capability, or why there is no usable GPU."""

    name: str | None = None
    compute_capability: tuple[int, int] | None = None
    missing: str | None = None  # set exactly when no GPU was found

    @property
    def sm(self) -> str | None:
        """Compute capability in TensorRT's spelling, e.g. "SM89"."""
        if self.compute_capability is None:
            return None
        major, minor = self.compute_capability
        return f"SM{major}{minor}"


@functools.cache
def probe_gpu() -> GpuProbe:
    """Load the CUDA driver, initialise it and read device 0 (once per process)."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return GpuProbe(missing="no NVIDIA driver: libcuda.so.1 not found")
    status = cuda.cuInit(0)
    if status != _CUDA_SUCCESS:
        return GpuProbe(missing=f"the CUDA driver found no usable device (cuInit error {status})")
    count = ctypes.c_int(0)
    if cuda.cuDeviceGetCount(ctypes.byref(count)) != _CUDA_SUCCESS or count.value == 0:
        return GpuProbe(missing="the CUDA driver reports no device")
    device = ctypes.c_int(0)
    cuda.cuDeviceGet(ctypes.byref(device), 0)
    name = ctypes.create_string_buffer(256)
    cuda.cuDeviceGetName(name, len(name), device)
    major, minor = ctypes.c_int(0), ctypes.c_int(0)
    cuda.cuDeviceGetAttribute(ctypes.byref(major), _ATTR_CC_MAJOR, device)
    cuda.cuDeviceGetAttribute(ctypes.byref(minor), _ATTR_CC_MINOR, device)
    return GpuProbe(
        name=name.value.decode(errors="replace"), compute_capability=(major.value, minor.value)
    )
