"""Consolidate: move running workloads off a node so that a fragmented pending gang fits.

For a pending gang that failed although enough GPUs are free in total, empty the most-free
candidate nodes one at a time (evicting their preemptible running workloads, cheapest first),
place the pending gang, then re-place every moved workload elsewhere. Commit only if all of
them got a new place; each move is an Evict(CONSOLIDATE) plus new Binds for the moved workload.
Work is bounded by ``max_consolidation_attempts`` and ``max_consolidation_moves``.
"""

from __future__ import annotations

from aifab.core.decisions import EvictionCause, ReasonCode
from aifab.scheduler.checks import limit_refusal
from aifab.scheduler.config import Fairness
from aifab.scheduler.context import Context
from aifab.scheduler.placer import eligible, place_workload
from aifab.scheduler.session import PendingJob, RunJob, Statement, TaskSpec

FRAGMENTATION = frozenset({ReasonCode.FRAGMENTED, ReasonCode.GANG, ReasonCode.TOPOLOGY})
TARGET_NODES = 8  # nodes emptied at most per attempt


def consolidate(ctx: Context) -> None:
    attempts = ctx.config.max_consolidation_attempts
    if attempts <= 0 or ctx.config.max_consolidation_moves <= 0:
        return
    for pj in ctx.sess.pending:
        if attempts <= 0:
            break
        if pj.bound or pj.reason is None or pj.reason[0] not in FRAGMENTATION or pj.leaf is None:
            continue
        if ctx.config.fairness is not Fairness.NONE and limit_refusal(pj.leaf, pj.req) is not None:
            continue
        attempts -= 1
        _try(ctx, pj)


def _movers(ctx: Context, ni: int) -> list[RunJob]:
    """Running workloads on node ``ni`` that may move: preemptible, fully placed, cheapest first."""
    sess = ctx.sess
    out = []
    for w in sess.node_workloads().get(ni, ()):
        j = sess.run_job(w)
        if not j.evicted and len(j.places) == len(w.tasks) and sess.evictable(j):
            out.append(j)
    out.sort(key=ctx.vkey)
    return out


def _try(ctx: Context, pj: PendingJob) -> bool:
    sess = ctx.sess
    _, nodes = eligible(sess, pj.w)
    by_node = sess.node_workloads()
    targets = sorted(
        (ni for ni in nodes if ni in by_node),
        key=lambda ni: (-sess.nodes[ni].free_gpu_milli, ni),
    )[:TARGET_NODES]
    stmt = sess.statement()
    moved: list[RunJob] = []
    for ni in targets:
        movers = _movers(ctx, ni)
        if not movers or len(moved) + len(movers) > ctx.config.max_consolidation_moves:
            continue
        for j in movers:
            why = f"moved to another node to make room for workload {pj.w.id} (defragmentation)"
            stmt.evict(j, EvictionCause.CONSOLIDATE, why, pj.w.id)
            moved.append(j)
        cp = stmt.checkpoint()
        if place_workload(sess, stmt, pj.w, pj.specs, pj.leaf, ctx.scorer) and all(
            _replace(ctx, stmt, j) for j in moved
        ):
            stmt.commit()
            pj.bound = pj.done = True
            pj.reason = None
            return True
        stmt.rollback(cp)
    stmt.rollback()
    return False


def _replace(ctx: Context, stmt: Statement, j: RunJob) -> bool:
    specs = [TaskSpec(t, ctx.sess.max_device_memory) for t in j.w.tasks]
    before = len(stmt.binds)
    if not place_workload(ctx.sess, stmt, j.w, specs, j.leaf, ctx.scorer):
        return False
    return len(stmt.binds) - before == len(specs)
