"""A consistent picture of the cluster handed to one scheduling cycle."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from aifab.core.nodes import Node
from aifab.core.queues import QueueTree
from aifab.core.resources import Resources
from aifab.core.workloads import Workload


@dataclass(frozen=True, slots=True)
class ClusterSnapshot:
    """Nodes, queues and workloads (running and pending) at time ``now``.

    ``usage_history`` holds each leaf queue's past usage, already decayed by the caller's
    half-life, for optional time-based fairness; empty means no history.
    """

    nodes: tuple[Node, ...]
    queues: QueueTree
    workloads: tuple[Workload, ...]
    now: float = 0.0
    usage_history: Mapping[str, Resources] = field(default_factory=dict)

    @property
    def capacity(self) -> Resources:
        total = Resources()
        for n in self.nodes:
            if n.schedulable:
                total = total + n.capacity
        return total
