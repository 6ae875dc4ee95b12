"""One scheduling cycle: snapshot in, decisions out. Pure and deterministic."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

from aifab.core.decisions import CycleResult
from aifab.core.resources import Resources
from aifab.core.snapshot import ClusterSnapshot
from aifab.scheduler.actions import Action, get_action
from aifab.scheduler.config import SchedulerConfig
from aifab.scheduler.context import Context
from aifab.scheduler.explain import explain
from aifab.scheduler.fairshare import compute_fair_shares, subtree_demand
from aifab.scheduler.session import Session, Vec, leaf_demand


def run_cycle(snapshot: ClusterSnapshot, config: SchedulerConfig | None = None) -> CycleResult:
    """Decide binds and evictions for this snapshot; explain every workload left pending.

    Evictions and binds of one cycle are meant to be applied together, evictions first: a
    workload bound after reclaim/preempt/consolidation uses the room its victims free.
    """
    config = config or SchedulerConfig()
    actions = [get_action(name) for name in config.actions]
    with _no_cyclic_gc():
        return _run(snapshot, config, actions)


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


def _run(snapshot: ClusterSnapshot, config: SchedulerConfig, actions: list[Action]) -> CycleResult:
    sess = Session(snapshot, config)
    fair, demand = _fair_shares(sess, snapshot, config)
    ctx = Context(sess, config)
    for action in actions:
        action(ctx)
    pending = explain(ctx)
    stats = {
        "binds": float(len(sess.binds)),
        "evictions": float(len(sess.evictions)),
        "pending": float(len(pending)),
        "bound_workloads": float(sum(1 for pj in sess.pending if pj.bound)),
        "running": float(len(sess.running)),
    }
    return CycleResult(
        binds=tuple(sess.binds),
        evictions=tuple(sess.evictions),
        pending=pending,
        fair_shares={n: Resources(v[0], v[1], v[2]) for n, v in fair.items()},
        stats=stats,
        demands={n: Resources(v[0], v[1], v[2]) for n, v in demand.items()},
    )


def _fair_shares(
    sess: Session, snapshot: ClusterSnapshot, config: SchedulerConfig
) -> tuple[dict[str, Vec], dict[str, Vec]]:
    """(fair share, demand) of every queue."""
    history: dict[str, Vec] | None = None
    if config.time_fairness_half_life is not None and snapshot.usage_history:
        history = {n: (r.gpu, r.cpu, r.memory) for n, r in snapshot.usage_history.items()}
    demand = leaf_demand(sess)
    fair = compute_fair_shares(
        snapshot.queues,
        sess.capacity,
        demand,
        config.fairness,
        history,
        config.fair_share_quantum,
    )
    for name, v in fair.items():
        sess.queues[name].fair = v
    return fair, subtree_demand(snapshot.queues, demand)
