"""A tiny greedy stand-in for ``run_cycle``: FIFO by submit time, first fit, whole GPUs only.

Used only by tests, so engine tests do not depend on the real scheduler's policy details.
It never evicts; ``backfill`` in the config decides whether a blocked job blocks the rest.
"""

from __future__ import annotations

from aifab.core.decisions import Bind, CycleResult
from aifab.core.nodes import NodeState
from aifab.core.snapshot import ClusterSnapshot
from aifab.core.workloads import WorkloadPhase
from aifab.scheduler.config import SchedulerConfig


def greedy_cycle(snapshot: ClusterSnapshot, config: SchedulerConfig) -> CycleResult:
    states = [NodeState(n, i) for i, n in enumerate(snapshot.nodes)]
    by_name = {s.node.name: s for s in states}
    for w in snapshot.workloads:
        for p in w.placements:
            task = w.tasks[p.task_index]
            by_name[p.node].allocate(
                p.devices, p.gpu_milli, p.gpu_memory_mib, task.cpu_milli, task.memory_mib
            )
    binds: list[Bind] = []
    pending = sorted(
        (w for w in snapshot.workloads if w.phase is WorkloadPhase.PENDING),
        key=lambda w: (w.submit_time, w.id),
    )
    for w in pending:
        trial = [s.copy() for s in states]
        mine: list[Bind] = []
        for ti, task in enumerate(w.tasks):
            need = task.gpu.count
            for s in trial:
                if not s.node.schedulable:
                    continue
                free = [d for d, m in enumerate(s.gpu_free_milli) if m == 1000]
                if len(free) >= need:
                    devs = tuple(free[:need])
                    s.allocate(devs, 1000, 0, task.cpu_milli, task.memory_mib)
                    mine.append(Bind(w.id, ti, s.node.name, devs, 1000, 0))
                    break
            else:
                break
        if len(mine) == len(w.tasks):
            states = trial
            binds.extend(mine)
        elif not config.backfill:
            break
    return CycleResult(binds=tuple(binds))
