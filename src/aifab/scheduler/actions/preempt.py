"""Preempt: inside one queue (one pool without fairness), a pending workload evicts running
ones it outranks: lower priority always, and with ``preempt_by_job_order`` an equal-priority one
that comes later in job order (Tiresias-style LAS, SRTF). The steps are reclaim's
(:func:`~aifab.scheduler.actions.evict.evict_and_place`)."""

from __future__ import annotations

import numpy as np

from aifab.core.decisions import EvictionCause
from aifab.core.resources import GPU_MILLI
from aifab.core.workloads import Workload
from aifab.scheduler.actions.evict import ROOM_CODES, by_key, candidates, evict_and_place
from aifab.scheduler.config import Fairness
from aifab.scheduler.context import Context
from aifab.scheduler.fit import FRACTION, MEMORY, WHOLE
from aifab.scheduler.jobs import I64, LeafJobs, PendingJob
from aifab.scheduler.placer import eligible, task_order
from aifab.scheduler.search import BoolArr, waiting_for_room
from aifab.scheduler.session import RunJob, Session


def preempt(ctx: Context) -> None:
    budget = [ctx.config.max_eviction_attempts]
    global_pool = ctx.config.fairness is Fairness.NONE
    pools = _Pools(ctx)  # running workloads that may be victims, per pool
    blocked = True  # every attempt so far failed for want of victims (see _hopeless)
    for name in sorted(ctx.by_leaf):
        if not _any_outranked(ctx, name, global_pool):
            continue
        failed: set[object] = set()
        jobs = ctx.by_leaf[name]

        def worth(idx: slice | I64, jobs: LeafJobs = jobs, name: str = name) -> BoolArr:
            """Conservative: drops jobs that cannot preempt (see _could_preempt) in this state."""
            keep = waiting_for_room(jobs, idx, ROOM_CODES)
            lower = _lower_by_priority(ctx, name, jobs.group.prio[idx], global_pool)
            return keep & (lower > 0) & (jobs.group.g[idx] <= ctx.sess.total_free_milli + lower)

        for pj in candidates(ctx, jobs, budget, None, worth):
            if (pj.shape, pj.order) in failed or not _could_preempt(ctx, name, pj, global_pool):
                continue
            maybe, exact = _outranked(ctx, pj, None if global_pool else name, pools)
            plan = _plan_room(ctx.sess, pj, maybe)
            if plan != _MAYBE:
                # evict_and_place would fail untouched, and would with every outranked
                # workload gone: the attempt leaves the cycle blocked.
                failed.add((pj.shape, pj.order))
                budget[0] -= 1
                continue
            if not exact:
                maybe = _exactly(ctx, pj, None if global_pool else name, pools, maybe)
            victims = _victims(ctx, maybe)

            def why(j: RunJob, pj: PendingJob = pj) -> str:
                if j.w.priority < pj.w.priority:
                    return (
                        f"preempted by higher-priority workload {pj.w.id} "
                        f"(priority {pj.w.priority} > {j.w.priority}) in queue {pj.w.queue}"
                    )
                return f"preempted by workload {pj.w.id}, which comes first in {ctx.config.job_order} order"

            if not evict_and_place(ctx, pj, victims, lambda j: True, EvictionCause.PREEMPT, why):
                failed.add((pj.shape, pj.order))
                blocked = blocked and _hopeless(ctx.sess, pj, victims)
            else:
                blocked = False
            budget[0] -= 1
    # For a caller that runs cycle after cycle: 1 when preemption evicted nothing and each of
    # its attempts would have failed even with every victim it could take evicted, so that
    # with nothing else changed and no more victims it would fail again.
    ctx.sess.stats["preempt_blocked"] = 1.0 if blocked else 0.0


def _hopeless(sess: Session, pj: PendingJob, victims: list[RunJob]) -> bool:
    """Whether the nodes the workload may use could not hold its biggest task, or for a gang
    of whole GPUs not as many tasks of that size as it has, even if every one of ``victims``
    were evicted: an upper bound of the room evictions free on a node is what is free there
    plus everything the victims hold there (what ``_plan_room`` bounds from GPUs alone, so an
    attempt it turns down is hopeless here too). Tasks asking for GPU memory are never judged
    hopeless (the bound would need each device's memory)."""
    order = task_order(pj.specs)
    s = pj.specs[order[0]]
    if s.kind is MEMORY:
        return False
    gpu = s.count * GPU_MILLI if s.kind is WHOLE else (s.milli if s.kind is FRACTION else 0)
    tasks = 1  # how many tasks of that size need room: of a gang of whole GPUs, all of them
    if s.kind is WHOLE:
        tasks = sum(1 for ti in order[: pj.w.gang_size] if pj.specs[ti].gpu_need == s.gpu_need)
    held: dict[int, list[int]] = {}
    for j in victims:
        for ni, devices, milli, _, cpu, mem in j.places:
            h = held.setdefault(ni, [0, 0, 0])
            h[0] += milli * len(devices)
            h[1] += cpu
            h[2] += mem
    _, nodes = eligible(sess, pj.w)
    free = sess.free_milli()
    room = 0
    for ni in nodes:
        ns = sess.nodes[ni]
        g, c, m = held.get(ni, (0, 0, 0))
        if free[ni] + g >= gpu and ns.free_cpu + c >= s.cpu and ns.free_memory + m >= s.memory:
            room += 1 if tasks == 1 else (free[ni] + g) // gpu
            if room >= tasks:
                return False
    return True


Pool = list[tuple[Workload, int, tuple[object, ...]]]


def _outranked(
    ctx: Context, pj: PendingJob, queue: str | None, pools: _Pools, bounds: bool = True
) -> tuple[list[Workload], bool]:
    """The running workloads of ``queue`` (None: of every queue) that ``pj`` outranks, or a
    superset of them (then the second item is False, see :func:`_exactly`): lower priority
    always yields; with ``preempt_by_job_order`` an equal-priority running workload also yields
    to a pending one that comes first in job order (Tiresias LAS, SRTF). Tested before anything
    else, so that only the workloads kept become victims (a backlog's head usually outranks few
    of hundreds of running workloads); the memo's key bounds give a superset without computing
    keys."""
    prio, order = pj.w.priority, pj.order
    sess = ctx.sess
    kept = sess.key_bounds if ctx.config.preempt_by_job_order and bounds else None
    if kept is not None:
        got = kept.maybe_outranked(prio, order, sess.queues.keys() if queue is None else {queue})
        if got is not None:
            return got, False
    pool = pools.pool(_pool_queues(sess, queue))
    if ctx.config.preempt_by_job_order:
        return [w for w, p, key in pool if p < prio or (p == prio and key > order)], True
    return [w for w, p, _ in pool if p < prio], True


def _exactly(
    ctx: Context, pj: PendingJob, queue: str | None, pools: _Pools, maybe: list[Workload]
) -> list[Workload]:
    """Those of a superset from the key bounds that ``pj`` outranks (see _outranked)."""
    bounds = ctx.sess.key_bounds
    assert bounds is not None
    got = bounds.keep_outranked(pj.w.priority, pj.order, maybe)
    # None: a key that cannot be ordered turned up (bounds are off from now on): ask each one.
    return got if got is not None else _outranked(ctx, pj, queue, pools, bounds=False)[0]


def _pool_queues(sess: Session, queue: str | None) -> list[str]:
    """The queues whose running workloads may be victims (None: every queue of the tree)."""
    if queue is None:
        return [q for q in sorted(sess.running_by_queue) if q in sess.queues]
    return [queue]


def _victims(ctx: Context, outranked: list[Workload]) -> list[RunJob]:
    """The ones that may be evicted, in victim order."""
    sess = ctx.sess
    out: list[tuple[tuple[object, ...], RunJob]] = []
    for w in outranked:
        j = sess.run_job(w)
        if sess.evictable(j):
            out.append((ctx.vkey(j), j))
    out.sort(key=by_key)  # stable: ties keep queue, then listing order (as merging sorted lists)
    return [j for _, j in out]


class _Pools:
    """Per pool of queues, each running workload with its priority and (for preemption by job
    order) its job-order key, made once per cycle and pool."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._made: dict[tuple[str, ...], Pool] = {}

    def pool(self, queues: list[str]) -> Pool:
        pool = self._made.get(tuple(queues))
        if pool is None:
            ctx = self.ctx
            listed = [w for q in queues for w in ctx.sess.running_by_queue.get(q, ())]
            jkey = ctx.jkey
            pool = self._made[tuple(queues)] = (
                [(w, w.priority, jkey(w)) for w in listed]
                if ctx.config.preempt_by_job_order
                else [(w, w.priority, ()) for w in listed]
            )
        return pool


_MAYBE, _NO_NODE, _TOO_FEW_NODES = 0, 1, 2


def _plan_room(sess: Session, pj: PendingJob, outranked: list[Workload]) -> int:
    """Whether evict_and_place could make room for a gang or a multi-GPU task, judged by the
    GPUs free on each node the workload may use plus all that ``outranked`` (a superset of its
    victims) hold there. ``_NO_NODE``: no node reaches its biggest task's GPUs, the room its
    node plans ask for, so evict_and_place would find no plan. ``_TOO_FEW_NODES``: the nodes
    could not hold as many tasks of that size as the gang needs, so its placement would fail
    whatever is evicted. Either way it would fail without evicting or placing anything.
    ``_MAYBE`` otherwise, and always for one task of at most one GPU (one victim anywhere may
    do)."""
    order = task_order(pj.specs)
    s = pj.specs[order[0]]
    need = s.gpu_need
    if need <= 0 or (pj.w.gang_size == 1 and need <= GPU_MILLI):
        return _MAYBE
    held: dict[int, int] = {}
    index = sess.node_index
    for w in outranked:
        for p in w.placements:
            ni = index.get(p.node)
            if ni is not None:
                held[ni] = held.get(ni, 0) + p.gpu_milli * len(p.devices)
    _, nodes = eligible(sess, pj.w)
    free = sess.free_milli()
    room = [free[ni] + held.get(ni, 0) for ni in nodes]
    if all(r < need for r in room):
        return _NO_NODE
    if s.kind is WHOLE:  # each task takes its GPUs on one node: count the tasks of that size
        tasks = sum(1 for ti in order[: pj.w.gang_size] if pj.specs[ti].gpu_need == need)
        if sum(r // need for r in room) < tasks:
            return _TOO_FEW_NODES
    return _MAYBE


def _lower_by_priority(ctx: Context, queue: str, prio: I64, global_pool: bool) -> I64:
    """Per job priority, the preemptible running GPUs it outranks (as _could_preempt sums)."""
    sess = ctx.sess
    tables = list(sess.preemptible_gpu.values()) if global_pool else [sess.preemptible_gpu.get(queue, {})]
    by_order = ctx.config.preempt_by_job_order
    if prio.size and prio[0] == prio.min() == prio.max():  # one priority (the usual case)
        v = int(prio[0])
        same = sum(g for table in tables for p, g in table.items() if p < v or (by_order and p == v))
        return np.full(prio.size, same, dtype=np.int64)
    values, inverse = np.unique(prio, return_inverse=True)
    lower = [
        sum(g for table in tables for p, g in table.items() if p < int(v) or (by_order and p == int(v)))
        for v in values
    ]
    out: I64 = np.asarray(lower, dtype=np.int64)[inverse]
    return out


def _any_outranked(ctx: Context, name: str, global_pool: bool) -> bool:
    """Whether some preemptible running work has a lower priority than the queue's highest
    pending one (or equal, when job order may preempt): otherwise nobody here can preempt."""
    sess = ctx.sess
    tables = sess.preemptible_gpu.values() if global_pool else [sess.preemptible_gpu.get(name, {})]
    top = ctx.max_prio[name]
    by_order = ctx.config.preempt_by_job_order
    return any(g > 0 and (p < top or (by_order and p == top)) for t in tables for p, g in t.items())


def _could_preempt(ctx: Context, queue: str, pj: PendingJob, global_pool: bool) -> bool:
    """Free GPUs plus lower-priority preemptible GPUs must cover the request (an upper bound)."""
    sess, prio = ctx.sess, pj.w.priority
    tables = sess.preemptible_gpu.values() if global_pool else [sess.preemptible_gpu.get(queue, {})]
    by_order = ctx.config.preempt_by_job_order
    lower = sum(g for table in tables for p, g in table.items() if p < prio or (by_order and p == prio))
    return lower > 0 and pj.req[0] <= sess.total_free_milli + lower
