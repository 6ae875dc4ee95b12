"""Allocate: start pending workloads on free capacity, queue by queue, gang by gang.

Queues take turns by the queue-order plugin (by default the queue furthest below its fair
share goes next, re-picked after every allocation). With fair-share fairness there are two
passes: first every queue allocates only up to its fair share, then idle capacity is lent to
whoever still waits (over-quota borrowing, reclaimable later). Inside a queue jobs go in the
job-order plugin's order. Each gang is placed inside one Statement: all of it or nothing.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

from aifab.core.decisions import ReasonCode
from aifab.scheduler import search
from aifab.scheduler.checks import (
    limit_refusal,
    non_preemptible_refusal,
    quick_refusal,
    quota_refusal,
    within_fair,
)
from aifab.scheduler.config import Fairness
from aifab.scheduler.context import Context
from aifab.scheduler.jobs import LeafJobs, PendingJob
from aifab.scheduler.placer import diagnose, place_workload
from aifab.scheduler.search import block_behind, next_to_try
from aifab.scheduler.session import TaskSpec

BOUND, OVER_FAIR, FAILED = 0, 1, 2


def allocate(ctx: Context) -> None:
    if ctx.config.fairness is Fairness.NONE:
        jobs = ctx.by_leaf.get("")
        if jobs is not None:
            _run_queue(ctx, jobs, 0, within=False)
        return
    passes = (True, False) if ctx.config.fairness is Fairness.FAIR_SHARE else (False,)
    for within in passes:
        _round_robin(ctx, within)


def _round_robin(ctx: Context, within: bool) -> None:
    sess = ctx.sess
    start = dict.fromkeys(ctx.by_leaf, 0)
    heap = [(ctx.qkey(sess.queues[name]), name) for name in sorted(ctx.by_leaf)]
    heapq.heapify(heap)
    while heap:
        _, name = heapq.heappop(heap)
        jobs = ctx.by_leaf[name]
        if within and _over_fair_for_all(ctx, name):
            continue  # every job would wait for the borrowing pass; it tries them all
        nxt = _run_queue(ctx, jobs, start[name], within, stop_after_bind=True)
        start[name] = nxt
        if nxt < jobs.n:
            heapq.heappush(heap, (ctx.qkey(sess.queues[name]), name))


def _over_fair_for_all(ctx: Context, name: str) -> bool:
    """No pending GPU job of the queue fits within its fair share (allocation only grows)."""
    least = ctx.min_gpu[name]
    leaf = ctx.sess.queues[name]
    return least > 0 and leaf.allocated[0] + least > leaf.fair[0]


def _run_queue(ctx: Context, jobs: LeafJobs, i: int, within: bool, stop_after_bind: bool = False) -> int:
    """Try jobs from index ``i``; returns where to continue (len(jobs) when the queue is finished).

    With backfill, runs of jobs that a refusal stops (or that wait for the borrowing pass) are
    passed over in one vectorised step (:func:`~aifab.scheduler.search.next_to_try`)."""
    n = jobs.n
    backfill = ctx.config.backfill
    # A short list is walked job by job, unless one check refuses each of its jobs (no room
    # for even the smallest, or the static quota): then one vectorised step refuses them all
    # and words none of their reasons until they are read.
    vector_min = 0 if backfill and search.refuses_all(ctx, jobs) else search.VECTOR_MIN
    while i < n:
        if backfill and n - i >= vector_min:
            i = next_to_try(ctx, jobs, i, within)
            if i >= n:
                return n
        else:
            i = jobs.done.find(0, i)  # the next job not done
            if i < 0:
                return n
        pj = jobs.job(i)
        i += 1
        outcome = try_job(ctx, pj, within)
        if outcome == BOUND:
            if stop_after_bind:
                return i
            continue
        if backfill:
            continue
        if outcome == OVER_FAIR:
            return n  # strict order: the head waits for the borrowing pass, so does the rest
        block_behind(jobs, i, pj.w.id)
        return n
    return n


def try_job(ctx: Context, pj: PendingJob, within: bool) -> int:
    sess, leaf, fairness = ctx.sess, pj.leaf, ctx.config.fairness
    assert leaf is not None  # jobs without a leaf queue were explained when the context was built
    if fairness is not Fairness.NONE:
        refusal = quota_refusal(leaf, pj.req, pj.w.preemptible, fairness is Fairness.STATIC)
        if refusal is not None:
            ctx.fail(pj, *refusal)
            return FAILED
    # Free capacity only shrinks while allocating, so a quick "no room" is final for the cycle
    # (checked before the fair-share test so a full cluster costs one pass, not two).
    quick = _quick_refusal(ctx, pj)
    if quick is not None:
        pj.done = True
        pj.reason = quick
        return FAILED
    if within and fairness is not Fairness.NONE and not within_fair(leaf, pj.req):
        return OVER_FAIR
    stmt = sess.statement()
    extra = None if len(pj.specs) == pj.w.gang_size or fairness is Fairness.NONE else _extra_ok(ctx, pj)
    if place_workload(sess, stmt, pj.w, pj.specs, leaf, ctx.scorer, extra):
        stmt.commit()
        pj.bound = pj.done = True
        return BOUND
    found = diagnose(sess, pj.w, pj.specs[: pj.w.gang_size], pj.req[0])
    sess.shape_failures[pj.shape] = found
    ctx.fail(pj, *found)
    return FAILED


def _quick_refusal(ctx: Context, pj: PendingJob) -> tuple[ReasonCode, str] | None:
    """O(1) answers for the common full-cluster case, then the per-shape memo of failures."""
    sess = ctx.sess
    memo = sess.shape_failures.get(pj.shape) if pj.leaf is not None else None
    return quick_refusal(
        pj.req[0], sess.total_free_milli, pj.biggest, sess.largest_block, memo, sess.messages
    )


def _extra_ok(ctx: Context, pj: PendingJob) -> Callable[[TaskSpec], bool]:
    leaf = pj.leaf
    assert leaf is not None

    def ok(s: TaskSpec) -> bool:
        vec = (s.gpu_need, s.cpu, s.memory)
        if limit_refusal(leaf, vec) is not None:
            return False
        return pj.w.preemptible or non_preemptible_refusal(leaf, vec) is None

    return ok
