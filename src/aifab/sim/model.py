"""Inputs of a simulation: the jobs of a trace, the cluster, and the simulator's own knobs.

A :class:`SimJob` is a pending :class:`~aifab.core.workloads.Workload` (the very object the
scheduler will see while it waits) plus the seconds of work it needs. A :class:`Scenario`
is everything the policy-independent side of an experiment fixes: nodes, queues, jobs.
"""

from __future__ import annotations

from dataclasses import dataclass

from aifab.core.nodes import Node
from aifab.core.queues import QueueTree
from aifab.core.resources import GPU_MILLI
from aifab.core.workloads import Workload


@dataclass(frozen=True, slots=True)
class SimJob:
    """One job of a trace: its workload as submitted and how long it runs undisturbed."""

    workload: Workload
    work: float  # seconds of progress needed to finish (the trace's duration)

    @property
    def id(self) -> str:
        return self.workload.id

    @property
    def submit_time(self) -> float:
        return self.workload.submit_time

    @property
    def gpus(self) -> float:
        return self.workload.gpu_milli_requested / GPU_MILLI


@dataclass(frozen=True, slots=True)
class FailureModel:
    """Seeded node failures: each node fails after Exp(mtbf) seconds up, stays down ``repair``."""

    mtbf: float  # mean seconds between failures of one node
    repair: float  # seconds a failed node stays down
    seed: int = 0


@dataclass(frozen=True, slots=True)
class SimConfig:
    """How the simulator (not the scheduler) behaves.

    ``min_cycle_interval``: events change the cluster at their exact times, but two scheduling
    cycles are at least this far apart (0 = a cycle at every distinct event time), like a
    production scheduler that runs every few seconds. ``cycle_period``: while jobs wait, a
    cycle also runs this often if the policy depends on the clock (see
    :func:`aifab.sim.engine.is_time_dependent`). ``follow_up``: after a cycle that changed
    something, the next one runs this much later even if no event comes (a reclaim may free
    resources that a later cycle binds).
    """

    restart_overhead: float = 60.0
    min_cycle_interval: float = 0.0
    cycle_period: float = 60.0
    follow_up: float = 1.0
    failures: FailureModel | None = None


@dataclass(frozen=True)
class Scenario:
    """The cluster and the jobs; jobs sorted by submit time (ties by position in the trace)."""

    name: str
    nodes: tuple[Node, ...]
    queues: QueueTree
    jobs: tuple[SimJob, ...]
    sim: SimConfig = SimConfig()

    @property
    def capacity_gpus(self) -> int:
        return sum(n.gpu_count for n in self.nodes)

    def deserved_gpus(self) -> dict[str, float]:
        """Deserved GPUs of every leaf queue (project)."""
        return {name: self.queues.get(name).deserved.gpu / GPU_MILLI for name in self.queues.leaves()}
