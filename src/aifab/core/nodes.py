"""Nodes, their GPU devices, and the mutable allocation state the scheduler works on."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from aifab.core.errors import ValidationError
from aifab.core.resources import GPU_MILLI, Resources


@dataclass(frozen=True, slots=True)
class GpuDevice:
    index: int
    model: str
    memory_mib: int


@dataclass(frozen=True, slots=True)
class Node:
    """A machine: CPU millicores, memory, GPU devices, a pool, labels and a topology path.

    ``topology`` maps level names to domains, e.g. ``{"zone": "z1", "rack": "r3"}``; the node
    itself is the innermost level. Two nodes share a rack if their ``rack`` entries are equal.
    """

    name: str
    cpu_milli: int
    memory_mib: int
    gpus: tuple[GpuDevice, ...] = ()
    pool: str = "default"
    labels: Mapping[str, str] = field(default_factory=dict)
    topology: Mapping[str, str] = field(default_factory=dict)
    schedulable: bool = True

    def __post_init__(self) -> None:
        if not self.name:
            raise ValidationError("must not be empty", field="node.name")
        if self.cpu_milli < 0:
            raise ValidationError(f"must be >= 0, got {self.cpu_milli}", field=f"node {self.name}: cpu")
        if self.memory_mib < 0:
            raise ValidationError(f"must be >= 0, got {self.memory_mib}", field=f"node {self.name}: memory")
        indices = [g.index for g in self.gpus]
        if len(set(indices)) != len(indices):
            raise ValidationError("GPU indices must be unique", field=f"node {self.name}: gpus")

    @property
    def gpu_count(self) -> int:
        return len(self.gpus)

    @property
    def capacity(self) -> Resources:
        return Resources(gpu=len(self.gpus) * GPU_MILLI, cpu=self.cpu_milli, memory=self.memory_mib)

    @property
    def gpu_model(self) -> str | None:
        """The model of the node's GPUs (nodes are homogeneous in practice), or None."""
        return self.gpus[0].model if self.gpus else None

    def domain(self, level: str) -> str:
        """The topology domain of this node at ``level`` ("node" is the node itself)."""
        if level == "node":
            return self.name
        return self.topology.get(level, "")


def uniform_node(
    name: str,
    gpus: int,
    *,
    gpu_model: str = "A100-80GB",
    gpu_memory_mib: int = 81920,
    cpu_milli: int = 64000,
    memory_mib: int = 512 * 1024,
    pool: str = "default",
    topology: Mapping[str, str] | None = None,
    labels: Mapping[str, str] | None = None,
) -> Node:
    """A node with ``gpus`` identical devices: the common case in tests and simulations."""
    devices = tuple(GpuDevice(i, gpu_model, gpu_memory_mib) for i in range(gpus))
    return Node(
        name=name,
        cpu_milli=cpu_milli,
        memory_mib=memory_mib,
        gpus=devices,
        pool=pool,
        labels=dict(labels or {}),
        topology=dict(topology or {}),
    )


class NodeState:
    """Free resources of one node, per GPU device, as the scheduler sees them in a cycle.

    Mutated only through :meth:`allocate` and :meth:`release`, which keep the invariant that
    nothing is oversubscribed: every device's free milli-GPU and free memory stay within
    ``[0, capacity]``; CPU and memory likewise.
    """

    __slots__ = ("free_cpu", "free_memory", "gpu_free_memory", "gpu_free_milli", "index", "node")

    def __init__(self, node: Node, index: int = 0) -> None:
        self.node = node
        self.index = index
        self.free_cpu = node.cpu_milli
        self.free_memory = node.memory_mib
        self.gpu_free_milli = [GPU_MILLI] * len(node.gpus)
        self.gpu_free_memory = [g.memory_mib for g in node.gpus]

    def copy(self) -> NodeState:
        other = NodeState.__new__(NodeState)
        other.node = self.node
        other.index = self.index
        other.free_cpu = self.free_cpu
        other.free_memory = self.free_memory
        other.gpu_free_milli = list(self.gpu_free_milli)
        other.gpu_free_memory = list(self.gpu_free_memory)
        return other

    @property
    def free_whole_gpus(self) -> int:
        return sum(1 for m in self.gpu_free_milli if m == GPU_MILLI)

    @property
    def free_gpu_milli(self) -> int:
        return sum(self.gpu_free_milli)

    @property
    def free(self) -> Resources:
        return Resources(gpu=self.free_gpu_milli, cpu=self.free_cpu, memory=self.free_memory)

    @property
    def used(self) -> Resources:
        return self.node.capacity - self.free

    def allocate(
        self, devices: tuple[int, ...], gpu_milli: int, gpu_memory_mib: int, cpu: int, memory: int
    ) -> None:
        """Take ``gpu_milli`` and ``gpu_memory_mib`` on each listed device plus CPU and memory.

        Raises ValueError if that would oversubscribe anything: callers check fit first, so a
        raise here is a bug, never a scheduling outcome.
        """
        if cpu > self.free_cpu or memory > self.free_memory:
            raise ValueError(f"node {self.node.name}: cpu/memory oversubscribed")
        for d in devices:
            if self.gpu_free_milli[d] < gpu_milli or self.gpu_free_memory[d] < gpu_memory_mib:
                raise ValueError(f"node {self.node.name}: GPU {d} oversubscribed")
        for d in devices:
            self.gpu_free_milli[d] -= gpu_milli
            self.gpu_free_memory[d] -= gpu_memory_mib
        self.free_cpu -= cpu
        self.free_memory -= memory

    def release(
        self, devices: tuple[int, ...], gpu_milli: int, gpu_memory_mib: int, cpu: int, memory: int
    ) -> None:
        """Give back what :meth:`allocate` took."""
        for d in devices:
            self.gpu_free_milli[d] += gpu_milli
            self.gpu_free_memory[d] += gpu_memory_mib
            if self.gpu_free_milli[d] > GPU_MILLI or self.gpu_free_memory[d] > self.node.gpus[d].memory_mib:
                raise ValueError(f"node {self.node.name}: GPU {d} released more than allocated")
        self.free_cpu += cpu
        self.free_memory += memory
        if self.free_cpu > self.node.cpu_milli or self.free_memory > self.node.memory_mib:
            raise ValueError(f"node {self.node.name}: released more cpu/memory than allocated")
