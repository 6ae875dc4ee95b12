"""What every action of a cycle shares: the session, the resolved plugins, the pending jobs."""

from __future__ import annotations

from aifab.core.decisions import ReasonCode
from aifab.scheduler.config import SchedulerConfig
from aifab.scheduler.jobs import LeafJobs, PendingJob
from aifab.scheduler.plugins.nodescore import resolve_scorer
from aifab.scheduler.plugins.orders import job_order, queue_order, victim_order
from aifab.scheduler.session import QueueState, Session

# Codes that mean "there was no room", the ones eviction-based actions may help with.
CAPACITY_CODES = frozenset(
    {ReasonCode.INSUFFICIENT_CAPACITY, ReasonCode.FRAGMENTED, ReasonCode.GANG, ReasonCode.TOPOLOGY}
)


class Context:
    __slots__ = (
        "by_leaf",
        "config",
        "jkey",
        "leaves",
        "max_prio",
        "min_gpu",
        "qkey",
        "scorer",
        "sess",
        "vkey",
    )

    def __init__(self, sess: Session, config: SchedulerConfig) -> None:
        self.sess = sess
        self.config = config
        innermost = config.topology_levels[-1] if config.topology_levels else "node"
        self.scorer = resolve_scorer(config.placement, innermost, config.seed, config.placement_candidates)
        self.qkey = queue_order(config.queue_order)
        self.jkey = job_order(config.job_order)
        self.vkey = victim_order(config.victim_order)
        # Pending jobs per leaf queue in job order; fairness NONE is one global list "".
        self.by_leaf: dict[str, LeafJobs] = sess.jobs.lists
        orphans = sess.jobs.orphans
        for i in range(orphans.n):
            pj = orphans.job(i)
            where = "not a leaf queue (only projects hold workloads)" if pj.leaf else "not known"
            self.fail(pj, ReasonCode.UNKNOWN_QUEUE, f"queue {pj.w.queue} is {where}")
        self.leaves: list[QueueState] = [q for q in sess.queues.values() if q.is_leaf]
        # Per pending list: the smallest GPU request and the highest priority in it, so that an
        # action can pass over a whole queue none of whose jobs could gain from it (a backlog of
        # thousands would otherwise be walked job by job, every cycle).
        self.min_gpu: dict[str, int] = {}
        self.max_prio: dict[str, int] = {}
        for name, lj in self.by_leaf.items():
            self.min_gpu[name] = lj.group.min_gpu
            self.max_prio[name] = lj.group.max_prio

    def fail(self, pj: PendingJob, code: ReasonCode, message: str) -> None:
        pj.done = True
        pj.reason = (code, message)
