"""One scheduling cycle: snapshot in, decisions out. Pure and deterministic."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

from aifab.core.decisions import CycleResult
from aifab.core.snapshot import ClusterSnapshot
from aifab.scheduler.actions import Action, get_action
from aifab.scheduler.config import SchedulerConfig
from aifab.scheduler.context import Context
from aifab.scheduler.explain import explain
from aifab.scheduler.fairshare import fair_shares_and_demands
from aifab.scheduler.jobs import PendingSet
from aifab.scheduler.memo import CycleMemo, FairShares
from aifab.scheduler.plugins.orders import job_order
from aifab.scheduler.session import Session, Vec, leaf_demand
from aifab.scheduler.static import node_facts, tree_info


def run_cycle(
    snapshot: ClusterSnapshot, config: SchedulerConfig | None = None, *, memo: CycleMemo | None = None
) -> CycleResult:
    """Decide binds and evictions for this snapshot; explain every workload left pending.

    Evictions and binds of one cycle are meant to be applied together, evictions first: a
    workload bound after reclaim/preempt/consolidation uses the room its victims free.

    ``memo``: a :class:`~aifab.scheduler.memo.CycleMemo` the caller keeps between cycles (e.g.
    one per simulation); the cycle updates it from the snapshot instead of deriving everything
    again. It changes the work, never the result.
    """
    config = config or SchedulerConfig()
    actions = [get_action(name) for name in config.actions]
    with _no_cyclic_gc():
        return _run(snapshot, config, actions, memo if memo is not None else CycleMemo())


@contextmanager
def _no_cyclic_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector for one cycle. A cycle allocates many short-lived,
    acyclic objects (freed by reference counting) and collections triggered by that churn cost
    25-30% of a large cycle; it is switched back on afterwards if it was on."""
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()


def _run(
    snapshot: ClusterSnapshot, config: SchedulerConfig, actions: list[Action], memo: CycleMemo
) -> CycleResult:
    facts = node_facts(snapshot.nodes)
    tinfo = tree_info(snapshot.queues)
    base, index, unique = memo.refresh(snapshot, config, job_order(config.job_order), facts, tinfo)
    sess = Session(snapshot, config, base, unique)
    sess.jobs = PendingSet(index, sess.queues)
    sess.view_slot = memo.view
    sess.key_bounds = memo.bounds
    got = _fair_shares(sess, snapshot, config, memo)
    ctx = Context(sess, config)
    for action in actions:
        action(ctx)
    pending = explain(ctx, unique)
    stats = {
        "binds": float(len(sess.binds)),
        "evictions": float(len(sess.evictions)),
        "pending": float(len(pending)),
        "bound_workloads": float(sess.jobs.bound_count()),
        "running": float(sess.running_count),
        **sess.stats,  # what actions report (e.g. preempt_blocked)
    }
    fair, demand = memo.as_resources(got)
    return CycleResult(
        binds=tuple(sess.binds),
        evictions=tuple(sess.evictions),
        pending=pending,
        fair_shares=fair,
        stats=stats,
        demands=demand,
    )


def _fair_shares(
    sess: Session, snapshot: ClusterSnapshot, config: SchedulerConfig, memo: CycleMemo
) -> FairShares:
    """(fair share, demand) of every queue; a pure function of its inputs, so the memo keeps
    the last few answers by their inputs (the tree by identity: it is immutable, and the memo
    holds it)."""
    history: dict[str, Vec] | None = None
    if config.time_fairness_half_life is not None and snapshot.usage_history:
        history = {n: (r.gpu, r.cpu, r.memory) for n, r in snapshot.usage_history.items()}
    demand = leaf_demand(sess)
    key = (
        sess.capacity,
        tuple(demand.items()),
        config.fairness,
        None if history is None else tuple(history.items()),
        config.fair_share_quantum,
    )
    got = memo.fair_shares(snapshot.queues, key)
    if got is None:
        got = fair_shares_and_demands(
            snapshot.queues,
            sess.capacity,
            demand,
            config.fairness,
            history,
            config.fair_share_quantum,
            memo.fair_columns(snapshot.queues),
        )
        memo.keep_fair_shares(snapshot.queues, key, got)
    for name, v in got[0].items():
        sess.queues[name].fair = v
    return got
