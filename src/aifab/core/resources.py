"""Resource vectors and fractional-GPU arithmetic.

GPUs are counted in milli-GPUs (1 GPU = 1000) so that fractions add up exactly; CPU in
millicores; memory in MiB. Integers everywhere keep the scheduler deterministic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

GPU_MILLI = 1000
"""milli-GPUs in one whole GPU."""


class ResourceKind(StrEnum):
    GPU = "gpu"
    CPU = "cpu"
    MEMORY = "memory"


RESOURCE_KINDS: tuple[ResourceKind, ...] = (ResourceKind.GPU, ResourceKind.CPU, ResourceKind.MEMORY)


@dataclass(frozen=True, slots=True)
class Resources:
    """An amount of each resource: ``gpu`` in milli-GPU, ``cpu`` in millicores, ``memory`` in MiB."""

    gpu: int = 0
    cpu: int = 0
    memory: int = 0

    @staticmethod
    def of(gpus: float = 0.0, cpus: float = 0.0, memory_mib: int = 0) -> Resources:
        """Build from human units: whole or fractional GPUs, cores, MiB."""
        return Resources(gpu=round(gpus * GPU_MILLI), cpu=round(cpus * 1000), memory=memory_mib)

    def __add__(self, other: Resources) -> Resources:
        return Resources(self.gpu + other.gpu, self.cpu + other.cpu, self.memory + other.memory)

    def __sub__(self, other: Resources) -> Resources:
        return Resources(self.gpu - other.gpu, self.cpu - other.cpu, self.memory - other.memory)

    def scale(self, factor: int) -> Resources:
        return Resources(self.gpu * factor, self.cpu * factor, self.memory * factor)

    def get(self, kind: ResourceKind) -> int:
        if kind is ResourceKind.GPU:
            return self.gpu
        if kind is ResourceKind.CPU:
            return self.cpu
        return self.memory

    def fits_in(self, other: Resources) -> bool:
        """True if every component is at most the other's."""
        return self.gpu <= other.gpu and self.cpu <= other.cpu and self.memory <= other.memory

    def is_zero(self) -> bool:
        return self.gpu == 0 and self.cpu == 0 and self.memory == 0

    def clamp_min_zero(self) -> Resources:
        return Resources(max(self.gpu, 0), max(self.cpu, 0), max(self.memory, 0))

    @property
    def gpus(self) -> float:
        """GPUs as a float, for display."""
        return self.gpu / GPU_MILLI

    def __str__(self) -> str:
        return f"gpu={format_gpus(self.gpu)} cpu={self.cpu / 1000:g} mem={self.memory}Mi"


ZERO = Resources()


def resources_from(values: dict[ResourceKind, int]) -> Resources:
    return Resources(
        gpu=values.get(ResourceKind.GPU, 0),
        cpu=values.get(ResourceKind.CPU, 0),
        memory=values.get(ResourceKind.MEMORY, 0),
    )


def format_gpus(milli: int) -> str:
    """1000 -> '1', 2500 -> '2.5', 250 -> '0.25'."""
    if milli % GPU_MILLI == 0:
        return str(milli // GPU_MILLI)
    return f"{milli / GPU_MILLI:g}"


def gpu_milli_for_memory(memory_mib: int, device_memory_mib: int) -> int:
    """The compute share a GPU-memory request takes on a device: its memory share, rounded up."""
    if device_memory_mib <= 0:
        return GPU_MILLI
    return min(GPU_MILLI, math.ceil(memory_mib * GPU_MILLI / device_memory_mib))


def memory_for_gpu_milli(milli: int, device_memory_mib: int) -> int:
    """GPU memory that goes with a compute share (a 0.5 GPU gets half of the device's memory)."""
    return (milli * device_memory_mib) // GPU_MILLI


def dominant_share(used: Resources, total: Resources) -> float:
    """Dominant Resource Fairness: the largest share of any resource in use."""
    shares = [
        used.gpu / total.gpu if total.gpu > 0 else 0.0,
        used.cpu / total.cpu if total.cpu > 0 else 0.0,
        used.memory / total.memory if total.memory > 0 else 0.0,
    ]
    return max(shares)
