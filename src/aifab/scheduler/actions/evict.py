"""Reclaim: make room for a pending gang by evicting running ones of other queues.

Reclaim and preempt follow the same pattern inside one Statement: evict candidate victims in victim order
(cost-aware by default) until the gang may fit, try to place it, evict more if it still does
not, and at the end put back every victim that sat on a node the gang did not use. Commit only
if the gang is placed; otherwise roll everything back.

- reclaim: a queue below its fair share takes back capacity lent to queues above theirs; a
  victim is valid only if its queue (and each of its ancestors not shared with the reclaimer)
  stays at or above its fair share afterwards. Pending jobs that fit in their queue's unused
  deserved quota (the quota promise) are tried first.
- guarantee: when that fails for a job that fits in its queue's unused deserved quota (and
  in each of its ancestors'), the job may also evict from queues above their *deserved*
  quota, a victim being valid only if its queue (and each ancestor not shared) stays at or
  above its deserved quota afterwards. Fair shares move with demand in steps of whole jobs, so
  the queues above their fair share may hold only workloads bigger than their excess (one
  GPU over, eight-GPU jobs): without this a deserved quota would be a guarantee only while
  someone happens to run a small enough job. The reclaimer stays within its deserved quota,
  so it is never a victim of fair-share reclaim in turn (no ping-pong).

Preempt (:mod:`~aifab.scheduler.actions.preempt`) uses the same steps.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from aifab.core.decisions import EvictionCause
from aifab.core.resources import GPU_MILLI
from aifab.core.workloads import Workload
from aifab.scheduler.actions.consolidate import reclaim_with_moves
from aifab.scheduler.checks import gpus, quota_refusal, within_fair
from aifab.scheduler.config import Fairness
from aifab.scheduler.context import CAPACITY_CODES, Context
from aifab.scheduler.fit import WHOLE
from aifab.scheduler.jobs import I64, LeafJobs, PendingJob, code_bytes, code_table
from aifab.scheduler.placer import eligible, no_extras, place_workload, task_order
from aifab.scheduler.search import BoolArr, first_match, not_failed, waiting_for_room, within_mask
from aifab.scheduler.session import QueueState, RunJob, Session, Statement, Vec

MAX_TRIES = 5  # placement tries per pending gang, evicting twice as much each time
ROOM_CODES = code_table(CAPACITY_CODES)
_ROOM = code_bytes(CAPACITY_CODES)


def reclaim(ctx: Context) -> None:
    if ctx.config.fairness is not Fairness.FAIR_SHARE:
        return  # static quotas never lend; without queues there is nothing to reclaim
    if not any(q.allocated[0] > min(q.fair[0], q.deserved[0]) for q in ctx.leaves):
        return  # nobody borrows: nothing can be reclaimed
    budget = [ctx.config.max_eviction_attempts]
    by_leaf = _victims_by_leaf(ctx)
    for leaf in sorted(ctx.leaves, key=ctx.qkey):
        failed: set[object] = set()  # a shape that could not reclaim will not do better now
        jobs = ctx.by_leaf.get(leaf.name)
        if jobs is None or (
            ctx.min_gpu[leaf.name] > 0 and leaf.allocated[0] + ctx.min_gpu[leaf.name] > leaf.fair[0]
        ):
            continue  # reclaim restores fair shares: no job of this queue is below its own
        room = leaf.deserved[0] - leaf.allocated[0]
        order: I64 | None = None
        if room > 0:
            # The guarantee first: jobs that fit in the queue's unused deserved quota are tried
            # before the others (job order otherwise), so a big head of line that is over the
            # quota cannot use up the queue's attempts.
            inside = jobs.group.g <= room
            k = int(inside.sum())
            if 0 < k < jobs.n:
                order = np.concatenate((np.flatnonzero(inside), np.flatnonzero(~inside)))

        def worth(
            idx: slice | I64, jobs: LeafJobs = jobs, leaf: QueueState = leaf, failed: set[object] = failed
        ) -> BoolArr:
            """Conservative: jobs the loop below would pass over in the current state are dropped."""
            g = jobs.group.g[idx]
            free = ctx.sess.total_free_milli
            keep = waiting_for_room(jobs, idx, ROOM_CODES)
            keep &= (leaf.allocated[0] + g <= leaf.fair[0]) | (g <= 0)
            keep &= within_mask(leaf, (g, jobs.group.c[idx], jobs.group.m[idx]))
            by_fair = g <= free + _lent(ctx, leaf, _FAIR)
            if _quota_room(leaf) > 0:
                by_fair |= (g <= _quota_room(leaf)) & (g <= free + _lent(ctx, leaf, _DESERVED))
            keep &= by_fair
            if failed:
                keep &= not_failed(jobs, idx, failed, ctx.sess.jobs.shapes)
            return keep

        for pj in candidates(ctx, jobs, budget, order, worth):
            if leaf.allocated[0] + pj.req[0] > leaf.fair[0] and pj.req[0] > 0:
                continue  # the common refusal, without building a shape
            if not within_fair(leaf, pj.req) or pj.shape in failed:
                continue  # reclaim restores fair shares; it never takes more than that
            free = ctx.sess.total_free_milli
            by_fair = pj.req[0] <= free + _lent(ctx, leaf, _FAIR)
            in_quota = 0 < pj.req[0] <= _quota_room(leaf)
            if not by_fair and not (in_quota and pj.req[0] <= free + _lent(ctx, leaf, _DESERVED)):
                continue  # even taking back everything lent would not make room
            ok = by_fair and _reclaim(ctx, leaf, pj, by_leaf, _FAIR)
            if not ok and in_quota:
                ok = _reclaim(ctx, leaf, pj, by_leaf, _DESERVED)
            if not ok:
                failed.add(pj.shape)
            budget[0] -= 1


_FAIR = 0  # what a victim queue keeps under reclaim: its fair share...
_DESERVED = 1  # ... or, for the guarantee, its deserved quota...
_BORROWING = 2  # ... or it is only above its deserved quota before each eviction


def _floor(q: QueueState, kind: int) -> Vec:
    return q.fair if kind == _FAIR else q.deserved


def _lent(ctx: Context, leaf: QueueState, kind: int) -> int:
    """GPUs (milli) other leaves hold above their fair share (or deserved quota)."""
    return sum(
        q.allocated[0] - _floor(q, kind)[0]
        for q in ctx.leaves
        if q is not leaf and q.allocated[0] > _floor(q, kind)[0]
    )


def _quota_room(leaf: QueueState) -> int:
    """Unused deserved GPUs (milli) of the queue and each of its ancestors: the least of them."""
    return min(q.deserved[0] - q.allocated[0] for q in (leaf, *leaf.ancestors))


def _reclaim(ctx: Context, leaf: QueueState, pj: PendingJob, by_leaf: _Victims, kind: int) -> bool:
    """One reclaim attempt for ``pj``: by fair share (``_FAIR``) or by the guarantee
    (``_DESERVED``, then ``_BORROWING``; see the module doc). All or nothing."""
    floor = _FAIR if kind == _FAIR else _DESERVED
    lenders = [q for q in ctx.leaves if q is not leaf and q.allocated[0] > _floor(q, floor)[0]]
    if not lenders:
        return False

    def victims(step: int) -> Iterator[RunJob]:
        # Only victims the guard of this step could let go (see _Victims.lists). Keys end with
        # the workload id, so merging the lists gives victim order whatever they are split in.
        lists = [lst for q in lenders for lst in by_leaf.lists(q, step, leaf)]
        return (j for _, j in heapq.merge(*lists, key=by_key))

    cause = EvictionCause.RECLAIM if kind == _FAIR else EvictionCause.GUARANTEE
    why = _reclaim_reason(pj, leaf, kind)
    # The guarantee's second step: the excess may be held only by workloads bigger than it (one
    # GPU over, eight-GPU jobs). A queue above its deserved quota borrows, whichever of its
    # workloads crossed the line, so any of them may go while the queue is still above it.
    steps = (_FAIR,) if kind == _FAIR else (_DESERVED, _BORROWING)
    for step in steps:
        if evict_and_place(ctx, pj, victims(step), _share_guard(leaf, step), cause, why):
            return True
    # No node frees up by eviction alone: evict anywhere, move a node's occupants into that
    # room (for a multi-GPU job inside the deserved quota).
    guard = _share_guard(leaf, steps[-1])
    return _may_move(ctx, leaf, pj) and reclaim_with_moves(ctx, pj, victims(steps[-1]), guard, why, cause)


def _reclaim_reason(pj: PendingJob, leaf: QueueState, kind: int) -> Callable[[RunJob], str]:
    def why(j: RunJob) -> str:
        vq = j.leaf.name if j.leaf else "?"
        if kind == _FAIR:
            fair = j.leaf.fair[0] if j.leaf else 0
            return (
                f"reclaimed for workload {pj.w.id} of project {leaf.name}, which is below its fair "
                f"share of {gpus(leaf.fair[0])}; project {vq} is above its fair share of {gpus(fair)}"
            )
        mine = j.leaf.deserved[0] if j.leaf else 0
        return (
            f"reclaimed for workload {pj.w.id} of project {leaf.name}, which fits in its unused "
            f"deserved quota of {gpus(leaf.deserved[0])}; project {vq} is above its deserved quota "
            f"of {gpus(mine)}"
        )

    return why


def _may_move(ctx: Context, leaf: QueueState, pj: PendingJob) -> bool:
    """Reclaim may also move workloads (when consolidation is on) for a single multi-GPU task
    that fits in its queue's unused deserved quota."""
    if "consolidate" not in ctx.config.actions or ctx.config.max_consolidation_moves <= 0:
        return False
    if pj.w.gang_size != 1 or len(pj.specs) != 1:
        return False
    s = pj.specs[0]
    return s.kind is WHOLE and s.count > 1 and leaf.allocated[0] + pj.req[0] <= leaf.deserved[0]


def by_key(t: tuple[tuple[object, ...], RunJob]) -> tuple[object, ...]:
    """Merge on the key only: RunJobs themselves do not compare."""
    return t[0]


Keyed = list[tuple[tuple[object, ...], RunJob]]


class _Bucket:
    """The running workloads of one queue that hold the same GPU milli, as victims in victim
    order: made into run jobs and sorted only when a guard first lets the bucket through (a
    lender may hold thousands of workloads its share lets none of go). Of a bucket of
    workloads without GPUs, the least CPU milli its victims hold (0 for the others, never read)."""

    __slots__ = ("_ctx", "_keyed", "_workloads", "cpu", "gpu")

    def __init__(self, ctx: Context, gpu: int, workloads: list[Workload]) -> None:
        self._ctx = ctx
        self.gpu = gpu
        self._workloads = workloads
        self._keyed: Keyed | None = None
        self.cpu = 0
        if gpu <= 0:
            self.cpu = min((j.vec[1] for _, j in self.keyed()), default=0)

    def keyed(self) -> Keyed:
        """Its evictable workloads with their victim-order keys, in that order. Made once: a
        victim evicted (and committed) after that stays listed, and every reader passes over
        evicted ones, so it makes no difference when it is made."""
        if self._keyed is None:
            sess, vkey = self._ctx.sess, self._ctx.vkey
            lst = [(vkey(j), j) for j in map(sess.run_job, self._workloads) if sess.evictable(j)]
            lst.sort(key=by_key)
            self._keyed = lst
        return self._keyed


class _Victims(dict[str, list[_Bucket]]):
    """Per leaf queue, its running workloads in buckets by the GPU milli they hold, built only
    for the queues asked about."""

    def __init__(self, ctx: Context) -> None:
        super().__init__()
        self.ctx = ctx

    def __missing__(self, name: str) -> list[_Bucket]:
        by_size: dict[int, list[Workload]] = {}
        for w in self.ctx.sess.running_by_queue.get(name, ()):
            held = 0
            for p in w.placements:
                held += p.gpu_milli * len(p.devices)  # what RunJob.vec[0] holds
            lst = by_size.get(held)
            if lst is None:
                by_size[held] = [w]
            else:
                lst.append(w)
        out = self[name] = [_Bucket(self.ctx, size, by_size[size]) for size in sorted(by_size)]
        return out

    def lists(self, q: QueueState, step: int, reclaimer: QueueState) -> list[Keyed]:
        """The lists of ``q`` whose victims :func:`_share_guard` (for ``reclaimer``) could let
        go at ``step``. Its test reads only a victim's queues and what the victim holds, the
        same for every victim of a list (of CPU-only ones, the least CPU is the kindest), so a
        list that fails it now fails it for every victim, and keeps failing while an attempt
        evicts: that only lowers what the queues hold (a queue just at its share, or in a
        department at its share, may hold thousands of workloads bigger than its excess)."""
        chain = _unshared_chain(q, reclaimer)
        out = []
        for bucket in self[q.name]:
            k, need = (0, bucket.gpu) if bucket.gpu > 0 else (1, bucket.cpu)
            if step == _BORROWING:
                ok = all(x.allocated[k] > x.deserved[k] for x in chain)
            else:
                ok = all(x.allocated[k] - need >= _floor(x, step)[k] for x in chain)
            if ok:
                out.append(bucket.keyed())
        return out


def _unshared_chain(q: QueueState, reclaimer: QueueState) -> list[QueueState]:
    """``q`` and its ancestors up to the first one that is also the reclaimer's (or one of its
    ancestors): the queues :func:`_share_guard` tests."""
    shared = (reclaimer, *reclaimer.ancestors)
    chain = []
    for x in (q, *q.ancestors):
        if any(x is y for y in shared):
            break
        chain.append(x)
    return chain


def _victims_by_leaf(ctx: Context) -> _Victims:
    return _Victims(ctx)


def candidates(
    ctx: Context,
    jobs: LeafJobs,
    budget: list[int],
    order: I64 | None,
    worth: Callable[[slice | I64], BoolArr],
) -> Iterator[PendingJob]:
    """Pending jobs of a queue that failed for lack of room, in job order (``order``: the walk
    as list positions); the caller's attempts (each one takes one unit of ``budget``) stop
    after a few per queue and per cycle. ``worth`` lets runs of jobs the caller would pass over
    be skipped at once (:func:`~aifab.scheduler.search.first_match`)."""
    start = budget[0]
    per_queue = ctx.config.max_eviction_attempts_per_queue
    total = jobs.n if order is None else len(order)
    room = jobs.code.translate(_ROOM)  # 1 where the reason is a lack of room
    if room.find(1) < 0:
        return  # every job would be passed over
    p = 0
    while p < total:
        if start - budget[0] >= per_queue or budget[0] <= 0:
            return
        p = first_match(jobs, order, p, worth)
        if p >= total:
            return
        if order is None:
            p = room.find(1, p)  # those before it would be passed over
            if p < 0:
                return
        i = p if order is None else int(order[p])
        p += 1
        if jobs.bound[i] or not _ROOM[jobs.code[i]]:
            continue  # bound, or its reason is not a lack of room (the code mirrors the reason)
        pj = jobs.job(i)
        leaf = pj.leaf
        if leaf is None:
            continue
        if ctx.config.fairness is not Fairness.NONE and (
            quota_refusal(leaf, pj.req, pj.w.preemptible, ctx.config.fairness is Fairness.STATIC)
        ):
            continue
        yield pj


def _share_guard(reclaimer: QueueState, kind: int) -> Callable[[RunJob], bool]:
    """A victim is valid if its queue, and each ancestor not shared with the reclaimer, keeps
    at least its fair share (``_FAIR``) or its deserved quota (``_DESERVED``) afterwards, or
    (``_BORROWING``) is above its deserved quota before."""
    shared = {id(q) for q in (reclaimer, *reclaimer.ancestors)}

    def ok(j: RunJob) -> bool:
        if j.leaf is None:
            return False
        k = 0 if j.vec[0] > 0 else 1
        for q in (j.leaf, *j.leaf.ancestors):
            if id(q) in shared:
                break
            if kind == _BORROWING:
                if q.allocated[k] <= q.deserved[k]:
                    return False
            elif q.allocated[k] - j.vec[k] < _floor(q, kind)[k]:
                return False
        return True

    return ok


def evict_and_place(
    ctx: Context,
    pj: PendingJob,
    victims: Iterable[RunJob],
    guard: Callable[[RunJob], bool],
    cause: EvictionCause,
    why: Callable[[RunJob], str],
) -> bool:
    """Evict victims (in victim order) until ``pj`` fits, place it, commit; or change nothing."""
    sess = ctx.sess
    allowed, _ = eligible(sess, pj.w)
    small = pj.w.gang_size == 1 and pj.specs[task_order(pj.specs)[0]].gpu_need <= GPU_MILLI
    # A small task fits wherever one victim leaves: take victims in plain victim order. A gang
    # or a multi-GPU task needs room on particular nodes: take the nodes whose victims are
    # cheapest, node by node, so the room evicted is room the gang can use.
    # Node plans look at the first victims only: a few times what the gang needs, in victim
    # order (cheap ones first), bounds the work for the common hopeless attempt.
    limit = 256 + 4 * (pj.req[0] // GPU_MILLI) * max(1, pj.w.gang_size)
    valid: Iterable[RunJob] = (j for j in victims if not j.evicted and guard(j))
    if not small:
        valid = itertools.islice(valid, limit)
    batches = _singles(valid, allowed) if small else _node_plans(sess, pj, valid, allowed)
    stmt = sess.statement()
    evicted: list[RunJob] = []
    want = 1 if small else max(1, pj.w.gang_size)
    for _ in range(MAX_TRIES):
        grew = False
        for taken, batch in enumerate(batches, start=1):
            for j in batch:
                if not j.evicted and guard(j):  # the guard again: earlier evictions count
                    stmt.evict(j, cause, why(j), pj.w.id)
                    evicted.append(j)
                    grew = True
            if taken >= want and (not small or sess.total_free_milli >= pj.req[0]):
                break
        if not grew:
            break
        cp = stmt.checkpoint()
        if place_workload(sess, stmt, pj.w, pj.specs, pj.leaf, ctx.scorer, no_extras):
            _keep_only_needed(sess, stmt, evicted, cp)
            stmt.commit()
            pj.bound = pj.done = True
            pj.reason = None
            return True
        stmt.rollback(cp)
        want *= 2
    stmt.rollback()
    return False


def _keep_only_needed(
    sess: Session, stmt: Statement, evicted: list[RunJob], cp: tuple[int, int, int]
) -> None:
    """Put back every victim that sat only on nodes the new gang does not use."""
    used = {b.node for b in stmt.binds[cp[1] :]}
    for j in evicted:
        if j.evicted and not any(sess.nodes[p[0]].node.name in used for p in j.places):
            stmt.unevict(j)


def _singles(victims: Iterable[RunJob], allowed: bytearray) -> Iterator[list[RunJob]]:
    for j in victims:
        if not j.evicted and any(allowed[p[0]] for p in j.places):
            yield [j]


def _node_plans(
    sess: Session, pj: PendingJob, victims: Iterable[RunJob], allowed: bytearray
) -> Iterator[list[RunJob]]:
    """Per node, the shortest prefix of its victims (in victim order) that makes room for the
    gang's biggest task; nodes ordered by their worst victim's rank, then the rank sum."""
    s = pj.specs[task_order(pj.specs)[0]]
    k = 0 if s.gpu_need > 0 else (1 if s.cpu > 0 else 2)
    need = (s.gpu_need, s.cpu, s.memory)[k]
    by_node: dict[int, list[tuple[int, RunJob]]] = {}
    for rank, j in enumerate(victims):
        if j.evicted:
            continue
        seen: set[int] = set()
        for p in j.places:
            ni = p[0]
            if allowed[ni] and ni not in seen:
                seen.add(ni)
                by_node.setdefault(ni, []).append((rank, j))
    plans: list[tuple[int, int, int, list[RunJob]]] = []
    for ni, js in by_node.items():
        ns = sess.nodes[ni]
        if k == 0:
            have = sess.free_whole[ni] * GPU_MILLI if s.kind is WHOLE else ns.free_gpu_milli
        else:
            have = ns.free_cpu if k == 1 else ns.free_memory
        take: list[RunJob] = []
        worst = total = 0
        for rank, j in js:
            if have >= need:
                break
            take.append(j)
            have += sum((p[2] * len(p[1]), p[4], p[5])[k] for p in j.places if p[0] == ni)
            worst, total = rank, total + rank
        if take and have >= need:
            plans.append((worst, total, ni, take))
    plans.sort(key=lambda t: (t[0], t[1], t[2]))
    for plan in plans:
        yield plan[3]
