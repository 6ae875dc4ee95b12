"""Builders for scheduler tests: compact workloads, snapshots, and applying a cycle's decisions."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from aifab.core import (
    GPU_MILLI,
    ClusterSnapshot,
    CycleResult,
    GpuRequest,
    Node,
    QueueTree,
    TaskPlacement,
    TaskRequest,
    TopologyConstraint,
    TopologyMode,
    Workload,
    WorkloadPhase,
    uniform_node,
)
from aifab.core.resources import gpu_milli_for_memory, memory_for_gpu_milli


def gpu_request(gpus: float = 0, gpu_memory: int = 0) -> GpuRequest:
    if gpu_memory:
        return GpuRequest.memory(gpu_memory)
    return GpuRequest.parse(gpus)


def workload(
    id: str,
    queue: str,
    gpus: float = 1,
    *,
    tasks: int = 1,
    gpu_memory: int = 0,
    cpu: int = 0,
    memory: int = 0,
    topology: Mapping[str, str] | None = None,
    models: Iterable[str] = (),
    **kw: Any,
) -> Workload:
    task = TaskRequest(gpu_request(gpus, gpu_memory), cpu_milli=cpu, memory_mib=memory)
    topo = None
    if topology:
        topo = TopologyConstraint(topology["level"], TopologyMode(topology.get("mode", "required")))
    return Workload(
        id=id, queue=queue, tasks=(task,) * tasks, topology=topo, gpu_models=frozenset(models), **kw
    )


class Placer:
    """Tracks free devices while a test lays out running workloads by hand."""

    def __init__(self, nodes: Sequence[Node]) -> None:
        self.nodes = {n.name: n for n in nodes}
        self.free = {n.name: [GPU_MILLI] * len(n.gpus) for n in nodes}

    def place(self, w: Workload, on: Sequence[str]) -> tuple[TaskPlacement, ...]:
        out = []
        for i, node in enumerate(on):
            t = w.tasks[i]
            free = self.free[node]
            dev_mem = self.nodes[node].gpus[0].memory_mib if self.nodes[node].gpus else 0
            if t.gpu.count:
                devs = tuple(d for d, m in enumerate(free) if m == GPU_MILLI)[: t.gpu.count]
                assert len(devs) == t.gpu.count, f"no room for {w.id} on {node}"
                milli, mem = GPU_MILLI, dev_mem
            elif t.gpu.is_shared:
                milli = t.gpu.milli or gpu_milli_for_memory(t.gpu.memory_mib, dev_mem)
                mem = t.gpu.memory_mib or memory_for_gpu_milli(milli, dev_mem)
                devs = (next(d for d, m in enumerate(free) if m >= milli),)
            else:
                devs, milli, mem = (), 0, 0
            for d in devs:
                free[d] -= milli
            out.append(TaskPlacement(i, node, devs, milli, mem))
        return tuple(out)


def running(w: Workload, placer: Placer, on: str | Sequence[str], start: float = 0.0) -> Workload:
    nodes = [on] * len(w.tasks) if isinstance(on, str) else list(on)
    return replace(
        w, phase=WorkloadPhase.RUNNING, placements=placer.place(w, nodes), start_time=w.start_time or start
    )


def nodes(count: int, gpus: int = 8, prefix: str = "n", **kw: Any) -> tuple[Node, ...]:
    return tuple(uniform_node(f"{prefix}{i}", gpus, **kw) for i in range(count))


def apply(snapshot: ClusterSnapshot, result: CycleResult, now: float | None = None) -> ClusterSnapshot:
    """Evictions first (the workload goes back to pending), then binds (it starts running)."""
    now = snapshot.now if now is None else now
    evicted = {e.workload_id for e in result.evictions}
    binds: dict[str, list[TaskPlacement]] = {}
    for b in result.binds:
        binds.setdefault(b.workload_id, []).append(
            TaskPlacement(b.task_index, b.node, b.devices, b.gpu_milli, b.gpu_memory_mib)
        )
    out = []
    for w in snapshot.workloads:
        if w.id in evicted:
            w = replace(w, phase=WorkloadPhase.PENDING, placements=(), start_time=None)
        if w.id in binds:
            w = replace(
                w,
                phase=WorkloadPhase.RUNNING,
                placements=tuple(sorted(binds[w.id], key=lambda p: p.task_index)),
                start_time=now,
            )
        out.append(w)
    return replace(snapshot, workloads=tuple(out), now=now)


def tree(*queues: Any) -> QueueTree:
    return QueueTree(queues)
