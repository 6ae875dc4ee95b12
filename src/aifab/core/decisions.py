"""What a scheduling cycle decides: binds, evictions, and a readable reason for what waits."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from aifab.core.resources import Resources


@dataclass(frozen=True, slots=True)
class Bind:
    """Start task ``task_index`` of ``workload_id`` on ``node`` with these devices."""

    workload_id: str
    task_index: int
    node: str
    devices: tuple[int, ...] = ()
    gpu_milli: int = 0  # per device; 1000 for whole GPUs
    gpu_memory_mib: int = 0  # per device


class EvictionCause(StrEnum):
    RECLAIM = "reclaim"  # another queue takes back its fair share
    GUARANTEE = "guarantee"  # another queue takes back its unused deserved quota
    PREEMPT = "preempt"  # higher priority work in the same queue
    CONSOLIDATE = "consolidate"  # moved to defragment; it is re-bound in the same cycle


@dataclass(frozen=True, slots=True)
class Evict:
    """Stop every task of ``workload_id`` (gangs are evicted whole) and requeue it."""

    workload_id: str
    cause: EvictionCause
    reason: str
    for_workload: str | None = None
    lost_gpu_seconds: float = 0.0


class ReasonCode(StrEnum):
    QUEUE_LIMIT = "queue_limit"
    OVER_FAIR_SHARE = "over_fair_share"
    NON_PREEMPTIBLE_OVER_QUOTA = "non_preemptible_over_quota"
    WAITING_FOR_RECLAIM = "waiting_for_reclaim"
    INSUFFICIENT_CAPACITY = "insufficient_capacity"
    FRAGMENTED = "fragmented"
    TOPOLOGY = "topology"
    NO_MATCHING_NODE = "no_matching_node"
    GANG = "gang"
    QUEUED_BEHIND = "queued_behind"
    UNKNOWN_QUEUE = "unknown_queue"
    EVICTED_THIS_CYCLE = "evicted_this_cycle"


@dataclass(frozen=True, slots=True)
class PendingReason:
    """Why a workload did not start this cycle, in words a user can act on."""

    workload_id: str
    code: ReasonCode
    message: str


@dataclass(frozen=True, slots=True)
class CycleResult:
    binds: tuple[Bind, ...] = ()
    evictions: tuple[Evict, ...] = ()
    pending: Mapping[str, PendingReason] = field(default_factory=dict)
    fair_shares: Mapping[str, Resources] = field(default_factory=dict)
    stats: Mapping[str, float] = field(default_factory=dict)
    # What each queue asked for when the fair shares were split: allocated + pending over its
    # subtree, capped by its limit. A queue whose demand exceeds its fair share would get the
    # same fair share with any larger demand (water-filling caps it by the level, not demand).
    demands: Mapping[str, Resources] = field(default_factory=dict)

    def bound_workloads(self) -> set[str]:
        return {b.workload_id for b in self.binds}
