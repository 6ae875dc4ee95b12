"""Large, seeded cluster snapshots for the scheduler speed benchmarks.

Built directly from core types (no simulator) so the benchmark times one ``run_cycle`` and nothing
else. Running workloads are given real placements that fill nodes without oversubscription.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from aifab.core import (
    ClusterSnapshot,
    GpuRequest,
    QueueTree,
    TaskPlacement,
    TaskRequest,
    Workload,
    WorkloadPhase,
    gpu_queue,
    uniform_node,
)
from aifab.core.resources import GPU_MILLI

# A typical mix of per-task GPU shapes (share of workloads): mostly 1 GPU, some multi-GPU, some fractional.
SHAPES: tuple[tuple[float, float], ...] = (
    (1, 0.55),
    (2, 0.15),
    (4, 0.1),
    (8, 0.05),
    (0.5, 0.1),
    (0.25, 0.05),
)
# Running work is smaller on average (0.94 GPU) so that 8,000 running workloads fit on 8,000 GPUs.
RUNNING_SHAPES: tuple[tuple[float, float], ...] = ((1, 0.6), (2, 0.1), (0.5, 0.25), (0.25, 0.05))


@dataclass(frozen=True)
class SnapshotSize:
    nodes: int
    running: int
    pending: int
    departments: int = 10
    projects_per_department: int = 5


def _queues(size: SnapshotSize, total_gpus: int) -> tuple[QueueTree, list[str]]:
    leaves = size.departments * size.projects_per_department
    per_project = total_gpus // leaves
    queues = []
    names = []
    for d in range(size.departments):
        dept = f"dept{d}"
        queues.append(gpu_queue(dept, per_project * size.projects_per_department))
        for p in range(size.projects_per_department):
            name = f"{dept}-proj{p}"
            names.append(name)
            queues.append(gpu_queue(name, per_project, parent=dept, weight=1 + p % 3))
    return QueueTree(queues), names


def _shape(rng: random.Random, shapes: tuple[tuple[float, float], ...] = SHAPES) -> float:
    x = rng.random()
    for gpus, share in shapes:
        if x < share:
            return gpus
        x -= share
    return 1


def _task(gpus: float) -> TaskRequest:
    return TaskRequest(gpu=GpuRequest.parse(gpus), cpu_milli=4000 * max(1, int(gpus)), memory_mib=16384)


def build_snapshot(size: SnapshotSize, seed: int = 7) -> ClusterSnapshot:
    """Nodes x 8 GPUs; ``running`` workloads placed first-fit; ``pending`` more waiting."""
    rng = random.Random(seed)
    nodes = tuple(
        uniform_node(
            f"n{i:05d}", 8, cpu_milli=128000, memory_mib=1024 * 1024, topology={"rack": f"r{i // 16}"}
        )
        for i in range(size.nodes)
    )
    tree, projects = _queues(size, size.nodes * 8)
    free = [[GPU_MILLI] * 8 for _ in nodes]
    workloads: list[Workload] = []
    cursor = 0
    for i in range(size.running):
        gpus = _shape(rng, RUNNING_SHAPES)
        placement = _place(free, gpus, cursor)
        if placement is None:
            raise ValueError(f"{size} does not fit: placed {i} running workloads")
        node_index, devices, milli = placement
        cursor = node_index
        workloads.append(
            Workload(
                id=f"run-{i:06d}",
                queue=projects[i % len(projects)],
                tasks=(_task(gpus),),
                submit_time=float(i),
                phase=WorkloadPhase.RUNNING,
                placements=(
                    TaskPlacement(0, nodes[node_index].name, devices, milli, (milli * 81920) // GPU_MILLI),
                ),
                start_time=float(i),
                checkpoint_interval=1800.0,
            )
        )
    for i in range(size.pending):
        gpus = _shape(rng)
        workloads.append(
            Workload(
                id=f"pend-{i:06d}",
                queue=projects[rng.randrange(len(projects))],
                tasks=(_task(gpus),),
                submit_time=float(size.running + i),
            )
        )
    return ClusterSnapshot(
        nodes=nodes, queues=tree, workloads=tuple(workloads), now=float(size.running + size.pending)
    )


def _place(free: list[list[int]], gpus: float, start: int) -> tuple[int, tuple[int, ...], int] | None:
    """First fit from ``start`` on (nodes before it are nearly full: skipping them keeps this linear)."""
    for i in range(start, len(free)):
        dev = free[i]
        if gpus >= 1:
            whole = [d for d in range(8) if dev[d] == GPU_MILLI]
            if len(whole) >= gpus:
                chosen = tuple(whole[: int(gpus)])
                for d in chosen:
                    dev[d] = 0
                return i, chosen, GPU_MILLI
        else:
            milli = round(gpus * GPU_MILLI)
            for d in range(8):
                if dev[d] >= milli:
                    dev[d] -= milli
                    return i, (d,), milli
    return None


def build_reclaim_snapshot(nodes: int = 1000, gang_tasks: int = 500, seed: int = 7) -> ClusterSnapshot:
    """Every GPU held by preemptible one-GPU jobs of a borrowing queue; one 8-GPU-per-task gang waits.

    Queue ``owner`` deserves the whole cluster and has nothing running; ``borrower`` holds all of it
    over quota. The gang (``gang_tasks`` x 8 GPUs) can only start by reclaiming.
    """
    del seed
    node_list = tuple(
        uniform_node(
            f"n{i:05d}", 8, cpu_milli=128000, memory_mib=1024 * 1024, topology={"rack": f"r{i // 16}"}
        )
        for i in range(nodes)
    )
    total = nodes * 8
    tree = QueueTree([gpu_queue("owner", total), gpu_queue("borrower", 0)])
    workloads: list[Workload] = []
    for i, node in enumerate(node_list):
        for d in range(8):
            workloads.append(
                Workload(
                    id=f"b-{i:05d}-{d}",
                    queue="borrower",
                    tasks=(_task(1),),
                    phase=WorkloadPhase.RUNNING,
                    placements=(TaskPlacement(0, node.name, (d,), GPU_MILLI, 81920),),
                    start_time=float(i),
                    submit_time=float(i),
                    checkpoint_interval=1800.0,
                )
            )
    gang = Workload(
        id="big-gang",
        queue="owner",
        tasks=tuple(_task(8) for _ in range(gang_tasks)),
        submit_time=float(nodes),
    )
    workloads.append(gang)
    return ClusterSnapshot(nodes=node_list, queues=tree, workloads=tuple(workloads), now=float(nodes + 10))
