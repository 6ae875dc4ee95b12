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
    job_order: str = "priority_fifo"  # plugin: order inside a queue
    placement: str = "aifab"  # plugin: node scoring / device choice
    victim_order: str = "cost_aware"  # plugin: which running workload yields first
    backfill: bool = True  # False: a blocked head of line blocks everything behind it
    time_fairness_half_life: float | None = None  # seconds; None disables time-based fairness
    topology_levels: tuple[str, ...] = ("zone", "rack")  # outermost first; "node" is implicit
    priority_classes: Mapping[str, PriorityClass] = field(
        default_factory=lambda: dict(DEFAULT_PRIORITY_CLASSES)
    )
    max_consolidation_moves: int = 16
    seed: int = 0  # for plugins that randomise (tie breaks); the cycle stays deterministic
