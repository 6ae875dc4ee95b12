"""Named scheduling policies for the simulator: each one is just a SchedulerConfig.

``tiresias`` and ``srtf`` order jobs by attained service / oracle remaining time and preempt
by that order too (``preempt_by_job_order``): a running job that comes later in the order
yields to a waiting one that comes earlier.
"""

from __future__ import annotations

from aifab.core.errors import ValidationError
from aifab.scheduler.config import Fairness, SchedulerConfig

POLICIES: dict[str, SchedulerConfig] = {
    # One global queue in submit order; a job that cannot start blocks everything behind it.
    "fifo": SchedulerConfig(actions=("allocate",), fairness=Fairness.NONE, job_order="fifo", backfill=False),
    # The same, but later jobs that fit may start around a blocked one.
    "fifo-backfill": SchedulerConfig(
        actions=("allocate",), fairness=Fairness.NONE, job_order="fifo", backfill=True
    ),
    # Hard quotas: each project uses at most its deserved GPUs, nobody borrows or reclaims.
    "static": SchedulerConfig(actions=("allocate",), fairness=Fairness.STATIC, job_order="priority_fifo"),
    # KAI-like: deserved quota + weighted over-quota, reclaim back to fair share, preempt by priority.
    "kai": SchedulerConfig(
        actions=("allocate", "reclaim", "preempt"),
        fairness=Fairness.FAIR_SHARE,
        job_order="priority_fifo",
        victim_order="priority",
        placement="binpack",  # KAI's default node order packs GPUs
        fair_share_quantum=1,  # KAI splits fair shares in fractions of a GPU, not whole GPUs
    ),
    # Tiresias-like: least attained service first, one global queue.
    "tiresias": SchedulerConfig(
        actions=("allocate", "preempt"), fairness=Fairness.NONE, job_order="las", preempt_by_job_order=True
    ),
    # Shortest remaining time first with the trace's durations as an oracle.
    "srtf": SchedulerConfig(
        actions=("allocate", "preempt"), fairness=Fairness.NONE, job_order="srtf", preempt_by_job_order=True
    ),
    # aifab's production default.
    "aifab": SchedulerConfig(),
}


def get_policy(name: str) -> SchedulerConfig:
    try:
        return POLICIES[name]
    except KeyError:
        known = ", ".join(POLICIES)
        raise ValidationError(f"unknown policy {name!r}; known: {known}", field="policy") from None
