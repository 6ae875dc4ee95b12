"""What this machine offers: CPUs, memory and GPUs (real ones via NVML, or declared virtual ones)."""

from __future__ import annotations

import contextlib
import os
import socket
from typing import Any

import psutil

from aifab.backends.base import BackendError, GpuInfo, NodeInfo

MIB = 1024 * 1024
BACKEND_LABEL = {"aifab.io/backend": "local"}


def detect_inventory(
    node_name: str | None = None,
    gpus: int | None = None,
    gpu_model: str = "virtual-gpu",
    gpu_memory_mib: int = 16384,
) -> NodeInfo:
    """This machine as a node. ``gpus`` declares that many virtual GPUs (for running the whole
    stack on a laptop or CI); without it, the real GPUs NVML reports (none if NVML is absent)."""
    if gpus is not None:
        if gpus < 0:
            raise BackendError(f"the number of virtual GPUs must be >= 0, got {gpus}")
        devices = tuple(GpuInfo(index=i, model=gpu_model, memory_mib=gpu_memory_mib) for i in range(gpus))
    else:
        devices = nvml_gpus()
    return NodeInfo(
        name=node_name or socket.gethostname(),
        cpu_milli=usable_cpus() * 1000,
        memory_mib=psutil.virtual_memory().total // MIB,
        gpus=devices,
        labels=dict(BACKEND_LABEL),
        topology={},
        virtual_gpus=gpus is not None,
    )


def usable_cpus() -> int:
    """The CPUs this process may run on (a cpuset or taskset can be smaller than the machine)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not available on macOS
        return os.cpu_count() or 1


def nvml_gpus() -> tuple[GpuInfo, ...]:
    """The GPUs NVML sees, by NVML index (PCI bus order); () when there is no driver or library."""
    try:
        import pynvml  # optional dependency (nvidia-ml-py)
    except ImportError:
        return ()
    try:
        pynvml.nvmlInit()
    except Exception:  # NVMLError subclasses, or OSError from a broken driver install
        return ()
    try:
        return tuple(_nvml_gpu(pynvml, i) for i in range(pynvml.nvmlDeviceGetCount()))
    except Exception:  # a GPU that fell off the bus mid-query: report none rather than crash
        return ()
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()


def _nvml_gpu(pynvml: Any, index: int) -> GpuInfo:
    device = pynvml.nvmlDeviceGetHandleByIndex(index)
    name = pynvml.nvmlDeviceGetName(device)
    if isinstance(name, bytes):  # older nvidia-ml-py releases return bytes
        name = name.decode()
    memory = pynvml.nvmlDeviceGetMemoryInfo(device).total // MIB
    return GpuInfo(index=index, model=str(name), memory_mib=int(memory))
