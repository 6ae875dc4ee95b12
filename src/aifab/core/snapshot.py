"""A consistent picture of the cluster handed to one scheduling cycle."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from aifab.core.nodes import Node
from aifab.core.queues import QueueTree
from aifab.core.resources import Resources
from aifab.core.workloads import Workload


@dataclass(frozen=True, slots=True)
class WorkloadChanges:
    """How a snapshot's workloads differ from those of the caller's previous snapshot.

    A caller that keeps its workloads between cycles (the simulator) knows what changed and
    says so; a cycle memo then applies that instead of comparing the two lists, which costs
    in proportion to the backlog. ``since`` is the ``token`` of the snapshot these changes
    follow; tokens are compared by identity, so any fresh object will do (``object()``).
    ``gone`` and ``new`` are workload objects (by identity): the previous snapshot's
    workloads minus ``gone`` plus ``new`` are this snapshot's, in any order.
    """

    since: object
    token: object
    gone: tuple[Workload, ...]
    new: tuple[Workload, ...]


@dataclass(frozen=True, slots=True)
class ClusterSnapshot:
    """Nodes, queues and workloads (running and pending) at time ``now``.

    ``usage_history`` holds each leaf queue's past usage, already decayed by the caller's
    half-life, for optional time-based fairness; empty means no history. ``changes``
    optionally says how ``workloads`` differ from the caller's previous snapshot (see
    :class:`WorkloadChanges`); it never changes a cycle's decisions, only its work.
    """

    nodes: tuple[Node, ...]
    queues: QueueTree
    workloads: Sequence[Workload]
    now: float = 0.0
    usage_history: Mapping[str, Resources] = field(default_factory=dict)
    changes: WorkloadChanges | None = None

    @property
    def capacity(self) -> Resources:
        total = Resources()
        for n in self.nodes:
            if n.schedulable:
                total = total + n.capacity
        return total
