"""Workloads: gangs of tasks with resource requests, constraints, priority and progress."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from aifab.core.errors import ValidationError
from aifab.core.resources import GPU_MILLI, Resources, format_gpus


class GpuRequestKind(StrEnum):
    NONE = "none"
    WHOLE = "whole"  # a count of whole GPUs
    FRACTION = "fraction"  # a share (0 < f < 1) of one GPU
    MEMORY = "memory"  # GPU memory in MiB on one GPU


@dataclass(frozen=True, slots=True)
class GpuRequest:
    """What one task asks of GPUs: whole devices, a fraction of one, or memory on one."""

    kind: GpuRequestKind = GpuRequestKind.NONE
    count: int = 0  # WHOLE
    milli: int = 0  # FRACTION, 1..999
    memory_mib: int = 0  # MEMORY

    @staticmethod
    def none() -> GpuRequest:
        return GpuRequest()

    @staticmethod
    def whole(count: int) -> GpuRequest:
        if count < 0:
            raise ValidationError(f"must be >= 0, got {count}", field="gpus")
        return GpuRequest(GpuRequestKind.WHOLE, count=count) if count else GpuRequest()

    @staticmethod
    def fraction(value: float) -> GpuRequest:
        milli = round(value * GPU_MILLI)
        if not 0 < milli < GPU_MILLI:
            raise ValidationError(f"a GPU fraction must be in (0, 1), got {value}", field="gpus")
        return GpuRequest(GpuRequestKind.FRACTION, milli=milli)

    @staticmethod
    def memory(memory_mib: int) -> GpuRequest:
        if memory_mib <= 0:
            raise ValidationError(f"must be > 0, got {memory_mib}", field="gpu_memory_mib")
        return GpuRequest(GpuRequestKind.MEMORY, memory_mib=memory_mib)

    @staticmethod
    def parse(gpus: float) -> GpuRequest:
        """2 -> two whole GPUs, 0.5 -> half a GPU; 1.5 is refused (not a sharable shape)."""
        if gpus < 0:
            raise ValidationError(f"must be >= 0, got {gpus}", field="gpus")
        if gpus == 0:
            return GpuRequest()
        if gpus < 1:
            return GpuRequest.fraction(gpus)
        if float(gpus).is_integer():
            return GpuRequest.whole(int(gpus))
        raise ValidationError(f"must be a whole number or a fraction below 1, got {gpus}", field="gpus")

    @property
    def is_shared(self) -> bool:
        return self.kind in (GpuRequestKind.FRACTION, GpuRequestKind.MEMORY)

    @property
    def devices(self) -> int:
        """How many devices the task touches."""
        if self.kind is GpuRequestKind.WHOLE:
            return self.count
        return 1 if self.is_shared else 0

    def milli_nominal(self, device_memory_mib: int = 0) -> int:
        """Milli-GPUs this request accounts for (memory requests as their share of a device)."""
        if self.kind is GpuRequestKind.WHOLE:
            return self.count * GPU_MILLI
        if self.kind is GpuRequestKind.FRACTION:
            return self.milli
        if self.kind is GpuRequestKind.MEMORY:
            if device_memory_mib <= 0:
                return GPU_MILLI
            return min(GPU_MILLI, -(-self.memory_mib * GPU_MILLI // device_memory_mib))
        return 0

    def __str__(self) -> str:
        if self.kind is GpuRequestKind.WHOLE:
            return f"{self.count} GPU" + ("s" if self.count != 1 else "")
        if self.kind is GpuRequestKind.FRACTION:
            return f"{format_gpus(self.milli)} GPU"
        if self.kind is GpuRequestKind.MEMORY:
            return f"{self.memory_mib} MiB of GPU memory"
        return "no GPU"


@dataclass(frozen=True, slots=True)
class TaskRequest:
    """Resources of one task (one process / pod) of a workload."""

    gpu: GpuRequest = field(default_factory=GpuRequest)
    cpu_milli: int = 0
    memory_mib: int = 0

    def __post_init__(self) -> None:
        if self.cpu_milli < 0:
            raise ValidationError(f"must be >= 0, got {self.cpu_milli}", field="cpu")
        if self.memory_mib < 0:
            raise ValidationError(f"must be >= 0, got {self.memory_mib}", field="memory")

    def nominal(self, device_memory_mib: int = 0) -> Resources:
        return Resources(
            gpu=self.gpu.milli_nominal(device_memory_mib), cpu=self.cpu_milli, memory=self.memory_mib
        )


class TopologyMode(StrEnum):
    REQUIRED = "required"
    PREFERRED = "preferred"


@dataclass(frozen=True, slots=True)
class TopologyConstraint:
    """All tasks of a gang within one domain of ``level`` ("node", "rack", "zone", ...)."""

    level: str
    mode: TopologyMode = TopologyMode.REQUIRED


@dataclass(frozen=True, slots=True)
class PriorityClass:
    name: str
    value: int
    preemptible: bool


DEFAULT_PRIORITY_CLASSES: Mapping[str, PriorityClass] = {
    "inference": PriorityClass("inference", 125, preemptible=False),
    "interactive": PriorityClass("interactive", 100, preemptible=False),
    "train": PriorityClass("train", 50, preemptible=True),
    "batch": PriorityClass("batch", 25, preemptible=True),
}


class WorkloadPhase(StrEnum):
    PENDING = "pending"
    RUNNING = "running"


@dataclass(frozen=True, slots=True)
class TaskPlacement:
    """Where one task runs: a node, device positions, and the share taken on each device."""

    task_index: int
    node: str
    devices: tuple[int, ...] = ()
    gpu_milli: int = 0  # per device
    gpu_memory_mib: int = 0  # per device


@dataclass(frozen=True, slots=True)
class Workload:
    """A gang of tasks. It runs when at least ``min_available`` of them are placed together.

    ``priority`` and ``preemptible`` are resolved from the priority class when the workload is
    created (so the scheduler need not know the class table). ``placements`` is empty while
    pending. Times are seconds on whatever clock the caller uses (wall clock in production,
    virtual clock in the simulator): the scheduler only compares them with ``snapshot.now``.
    """

    id: str
    queue: str
    tasks: tuple[TaskRequest, ...]
    min_available: int = 0  # 0 means all tasks
    priority_class: str = "train"
    priority: int = 50
    preemptible: bool = True
    gpu_models: frozenset[str] = frozenset()
    node_pool: str | None = None
    node_selector: Mapping[str, str] = field(default_factory=dict)
    topology: TopologyConstraint | None = None
    submit_time: float = 0.0
    phase: WorkloadPhase = WorkloadPhase.PENDING
    placements: tuple[TaskPlacement, ...] = ()
    start_time: float | None = None
    last_checkpoint_time: float | None = None
    checkpoint_interval: float | None = None
    attained_gpu_seconds: float = 0.0
    expected_duration: float | None = None  # an oracle, for reference policies only
    min_runtime: float = 0.0  # guaranteed runtime before it may be preempted

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValidationError("a workload needs at least one task", field=f"workload {self.id}: tasks")
        if not 0 <= self.min_available <= len(self.tasks):
            raise ValidationError(
                f"must be between 1 and {len(self.tasks)}, got {self.min_available}",
                field=f"workload {self.id}: min_available",
            )

    @property
    def gang_size(self) -> int:
        return self.min_available or len(self.tasks)

    @property
    def is_running(self) -> bool:
        return self.phase is WorkloadPhase.RUNNING

    @property
    def gpu_milli_requested(self) -> int:
        """Nominal milli-GPUs of the whole gang (memory requests counted as one device each)."""
        return sum(t.gpu.milli_nominal() for t in self.tasks)

    @property
    def requested(self) -> Resources:
        total = Resources()
        for t in self.tasks:
            total = total + t.nominal()
        return total

    @property
    def allocated(self) -> Resources:
        """What the running placements hold."""
        gpu = cpu = mem = 0
        for p in self.placements:
            gpu += p.gpu_milli * len(p.devices)
            task = self.tasks[p.task_index]
            cpu += task.cpu_milli
            mem += task.memory_mib
        return Resources(gpu=gpu, cpu=cpu, memory=mem)

    def work_since_checkpoint(self, now: float) -> float:
        """Seconds of progress an eviction now would lose."""
        if self.start_time is None:
            return 0.0
        since = self.start_time
        if self.last_checkpoint_time is not None and self.last_checkpoint_time > since:
            since = self.last_checkpoint_time
        if self.checkpoint_interval and self.checkpoint_interval > 0 and now > since:
            # A job that checkpoints on a period has saved at the last multiple of it.
            since += ((now - since) // self.checkpoint_interval) * self.checkpoint_interval
        return max(0.0, now - since)
