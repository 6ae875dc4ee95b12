"""The scheduler's typed configuration: which actions run, which plugins order and place.

A policy in the simulator is nothing but one of these; the live control plane builds one at
start-up from its settings. Plugins are named here and looked up in registries, so a new
policy is a new plugin plus a name, never a branch in the scheduler.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from aifab.core.workloads import DEFAULT_PRIORITY_CLASSES, PriorityClass


class Fairness(StrEnum):
    FAIR_SHARE = "fair_share"  # deserved + weighted split of idle capacity (hierarchical, DRF)
    STATIC = "static"  # each queue gets its deserved quota and never borrows
    NONE = "none"  # one global queue: quotas are ignored


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """Everything a cycle needs besides the snapshot. Defaults are aifab's production policy."""

    actions: tuple[str, ...] = ("allocate", "consolidate", "reclaim", "preempt")
    fairness: Fairness = Fairness.FAIR_SHARE
    queue_order: str = "fair_share"  # plugin: which queue allocates next
    job_order: str = "priority_las"  # plugin: order inside a queue (priority, then LAS, then FIFO)
    placement: str = "aifab"  # plugin: node scoring / device choice
    victim_order: str = "cost_aware"  # plugin: which running workload yields first
    backfill: bool = True  # False: a blocked head of line blocks everything behind it
    # seconds; None disables time-based fairness. The caller decays snapshot.usage_history with
    # it; the scheduler only uses that history (weight / (1 + past share)) when this is set.
    time_fairness_half_life: float | None = None
    topology_levels: tuple[str, ...] = ("zone", "rack")  # outermost first; "node" is implicit
    priority_classes: Mapping[str, PriorityClass] = field(
        default_factory=lambda: dict(DEFAULT_PRIORITY_CLASSES)
    )
    # Idle GPUs are split into fair shares in units of this many milli-GPUs (1000 = whole
    # GPUs, so that reclaim always finds whole-GPU victims above their fair share; 1 = exact).
    fair_share_quantum: int = 1000
    max_consolidation_moves: int = 16  # running workloads moved for one pending workload
    max_consolidation_attempts: int = 4  # pending workloads consolidation tries per cycle
    # Only workloads that would lose at most this many seconds of work since their last
    # checkpoint are moved (cheap moves only); None moves any preemptible workload.
    max_consolidation_lost_seconds: float | None = 900.0
    max_eviction_attempts_per_queue: int = 2  # pending workloads per queue tried by reclaim/preempt
    max_eviction_attempts: int = 16  # attempts per cycle of reclaim, and as many of preempt
    # preempt: also let a pending workload evict running ones of equal priority that come later
    # in job order (Tiresias-style LAS, SRTF). min_runtime bounds the resulting churn.
    preempt_by_job_order: bool = False
    # Nodes offered to a placement-package policy per task (tightest fits first); 0 = all of
    # them. Bounds the cost of policies that score every candidate.
    placement_candidates: int = 64
    seed: int = 0  # for plugins that randomise (tie breaks); the cycle stays deterministic
