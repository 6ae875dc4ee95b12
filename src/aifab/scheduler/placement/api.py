"""Scheduler-facing placement API: pick the node (and GPU devices) for ONE task.

The scheduler's allocate action filters candidates for pool, model and topology, then asks a
:class:`PlacementPolicy` to choose among them. Policies re-check fit themselves (CPU, memory,
whole GPUs free, or one device with enough free milli-GPU for a shared task) so that a bad
candidate list can never lead to oversubscription.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from aifab.core.nodes import NodeState
from aifab.core.resources import GPU_MILLI
from aifab.core.workloads import GpuRequestKind, TaskRequest
from aifab.scheduler.placement.fragmentation import TargetWorkload
from aifab.scheduler.placement.view import ClusterView, PodShape


@dataclass(frozen=True, slots=True)
class PlacementContext:
    """What policies need besides the task and the candidates.

    ``seed`` and ``sequence`` drive the Random policy's deterministic hash (the scheduler
    package may not import ``random``); pass a different ``sequence`` per decision.
    ``target`` is FGD's expected workload (its 95 % most popular shapes); without one FGD uses
    the task's own shape. ``full_target`` has every shape, rare large ones included; aifab's
    look-ahead uses it (falling back to ``target``) so it never spends the few nodes that can
    host the biggest tasks. ``gpu_models`` are the models the task accepts (empty = any).
    """

    seed: int = 0
    sequence: int = 0
    target: TargetWorkload | None = None
    gpu_models: frozenset[str] = frozenset()
    full_target: TargetWorkload | None = None


@dataclass(frozen=True, slots=True)
class PlacementChoice:
    """Node ``node`` (position ``candidate`` in the list given), these device positions, and
    ``gpu_milli`` / ``gpu_memory_mib`` taken on each device."""

    node: str
    candidate: int
    devices: tuple[int, ...]
    gpu_milli: int
    gpu_memory_mib: int


@runtime_checkable
class PlacementPolicy(Protocol):
    """A node-scoring plugin."""

    name: str

    def choose(
        self, task: TaskRequest, candidates: Sequence[NodeState], ctx: PlacementContext
    ) -> PlacementChoice | None:
        """The best candidate for ``task``, or None if it fits none of them."""
        ...

    def place(
        self, view: ClusterView, pod: PodShape, ctx: PlacementContext, tick: int
    ) -> tuple[int, tuple[int, ...]] | None:
        """Vectorised form used by the simulator: (node row, devices) or None."""
        ...


_SHAPES: dict[tuple[int, int, frozenset[str]], tuple[TaskRequest, PodShape]] = {}


def task_shape(task: TaskRequest, device_memory_mib: int, models: frozenset[str]) -> PodShape:
    """The :class:`PodShape` of a task on devices with ``device_memory_mib`` of memory.

    Remembered per task object (requests are frozen): a scheduler asks again for every node
    choice, and equal shapes as one object keep the policies' per-shape caches cheap to hit."""
    key = (id(task), device_memory_mib, models)
    got = _SHAPES.get(key)
    if got is not None and got[0] is task:
        return got[1]
    if len(_SHAPES) > 65_536:  # tasks come and go; bound it
        _SHAPES.clear()
    shape = _shape(task, device_memory_mib, models)
    _SHAPES[key] = (task, shape)
    return shape


def _shape(task: TaskRequest, device_memory_mib: int, models: frozenset[str]) -> PodShape:
    gpu = task.gpu
    if gpu.kind is GpuRequestKind.WHOLE:
        return PodShape(task.cpu_milli, task.memory_mib, gpu.count, GPU_MILLI, models)
    if gpu.kind is GpuRequestKind.NONE:
        return PodShape(task.cpu_milli, task.memory_mib, 0, 0, models)
    milli = gpu.milli_nominal(device_memory_mib)
    if milli >= GPU_MILLI:
        return PodShape(task.cpu_milli, task.memory_mib, 1, GPU_MILLI, models)
    return PodShape(task.cpu_milli, task.memory_mib, 1, milli, models)
