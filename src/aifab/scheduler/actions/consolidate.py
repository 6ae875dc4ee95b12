"""Consolidate: move running workloads off a node so that a fragmented pending gang fits.

For a pending gang that failed although enough GPUs are free in total, empty the most-free
candidate nodes one at a time (evicting their preemptible running workloads, cheapest first),
place the pending gang, then re-place every moved workload elsewhere. Commit only if all of
them got a new place; each move is an Evict(CONSOLIDATE) plus new Binds for the moved workload.
Work is bounded by ``max_consolidation_attempts`` and ``max_consolidation_moves``.

Only cheap moves are made: a workload moves only if it would lose at most
``max_consolidation_lost_seconds`` of work since its last checkpoint. Moved workloads are
re-placed with the cheap bin-packing scorer (whatever the configured placement policy): a
move only has to find *a* place, and scoring every candidate with an expensive policy for
each of up to 16 movers per try made consolidation dominate the cycle. A shape that failed
is not tried again in the same cycle.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Iterable, Iterator
from operator import itemgetter
from typing import Any

from aifab.core.decisions import EvictionCause, ReasonCode
from aifab.scheduler import search
from aifab.scheduler.checks import quota_refusal
from aifab.scheduler.config import Fairness
from aifab.scheduler.context import Context
from aifab.scheduler.jobs import I64, LeafJobs, PendingJob, code_bytes, code_table
from aifab.scheduler.placer import eligible, no_extras, place_workload
from aifab.scheduler.plugins.nodescore import Binpack
from aifab.scheduler.search import BoolArr, first_match, not_failed, waiting_for_room
from aifab.scheduler.session import RunJob, Session, Statement, TaskSpec

FRAGMENTATION = frozenset({ReasonCode.FRAGMENTED, ReasonCode.GANG, ReasonCode.TOPOLOGY})
_FRAG_CODES = code_table(FRAGMENTATION)
_FRAG = code_bytes(FRAGMENTATION)
TARGET_NODES = 8  # nodes emptied at most per attempt
_REPLACER = Binpack()  # stateless: re-places moved workloads
NODES_TRIED = 4  # nodes reclaim_with_moves tries to empty for one pending task
MORE_VICTIMS = 8  # extra victims reclaim_with_moves evicts when the movers find no room


def consolidate(ctx: Context) -> None:
    attempts = ctx.config.max_consolidation_attempts
    if attempts <= 0 or ctx.config.max_consolidation_moves <= 0:
        return
    failed: set[object] = set()
    for pj in _in_order(ctx, failed):
        if attempts <= 0:
            break
        if pj.bound or pj.reason is None or pj.reason[0] not in FRAGMENTATION or pj.leaf is None:
            continue
        if pj.req[0] > ctx.sess.total_free_milli:
            continue  # moving work around cannot make room that does not exist
        fairness = ctx.config.fairness
        if fairness is not Fairness.NONE and quota_refusal(
            pj.leaf, pj.req, pj.w.preemptible, fairness is Fairness.STATIC
        ):
            continue  # allocate's binds of this cycle may have used the quota since it tried
        if pj.shape in failed:
            continue
        attempts -= 1
        if not _try(ctx, pj):
            failed.add(pj.shape)


def _in_order(ctx: Context, failed: set[object]) -> Iterator[PendingJob]:
    """The pending jobs the loop above would not pass over at once (not bound, reason code a
    fragmentation one: that never changes for a job before it is yielded), in global job
    order; with many of them, runs the loop would pass over in the current state are skipped
    at once in each job list (conservatively)."""
    sess = ctx.sess
    lists = [lj for lj in (*sess.jobs.lists.values(), sess.jobs.orphans) if lj.n]
    marks = {id(lj): lj.code.translate(_FRAG) for lj in lists}
    lists = [lj for lj in lists if marks[id(lj)].find(1) >= 0]
    if sum(marks[id(lj)].count(1) for lj in lists) < search.VECTOR_MIN:
        found: list[tuple[Any, int, LeafJobs]] = []
        for lj in lists:
            m = marks[id(lj)]
            i = m.find(1)
            while i >= 0:
                found.append((lj.token(i), i, lj))
                i = m.find(1, i + 1)
        found.sort(key=itemgetter(0))  # tokens are unique: the global job order
        for _, i, lj in found:
            if not lj.bound[i]:
                yield lj.job(i)
        return

    def worth(lj: LeafJobs) -> Callable[[slice | I64], BoolArr]:
        def keep(idx: slice | I64) -> BoolArr:
            out = waiting_for_room(lj, idx, _FRAG_CODES) & (lj.group.g[idx] <= sess.total_free_milli)
            if failed:
                out &= not_failed(lj, idx, failed, sess.jobs.shapes)
            return out

        return keep

    masks = {id(lj): worth(lj) for lj in lists}
    # Per list: the next position not yet walked, and its candidate from there in the state the
    # candidate was found in. The candidate stands while the state does; after the walk acted
    # on a job, every list searches again from its first job after that one.
    pos = {id(lj): 0 for lj in lists}
    cand: dict[int, int] = {}
    version = _state(sess, failed)
    while True:
        best: tuple[Any, LeafJobs, int] | None = None
        for lj in lists:
            c = cand.get(id(lj))
            if c is None:
                c = cand[id(lj)] = first_match(lj, None, pos[id(lj)], masks[id(lj)])
            if c < lj.n:
                tok = lj.token(c)
                if best is None or tok < best[0]:
                    best = (tok, lj, c)
        if best is None:
            return
        tok, lj, c = best
        pos[id(lj)] = c + 1
        del cand[id(lj)]
        if lj.bound[c] or not _FRAG[lj.code[c]]:
            continue  # the loop passes over it: nothing changes
        yield lj.job(c)
        now = _state(sess, failed)
        if now != version:
            version = now
            for other in lists:  # the walk is past tok: each list resumes after it
                if other is not lj:
                    pos[id(other)] = max(pos[id(other)], _after(other, tok))
            cand.clear()


def _state(sess: Session, failed: set[object]) -> tuple[int, int, int]:
    """Changes whenever anything the walk's checks read may have changed."""
    return (len(sess.binds), len(sess.evictions), len(failed))


def _after(lj: LeafJobs, tok: object) -> int:
    """The first position of the list whose job comes after ``tok`` in the global order."""
    ranks = lj.group.ranks
    seq: list[Any] = lj.group.keys if ranks is None else ranks
    return bisect_right(seq, tok)


def _movers(ctx: Context, ni: int) -> list[RunJob]:
    """Running workloads on node ``ni`` that may move: preemptible, fully placed, cheapest first."""
    sess = ctx.sess
    cap = ctx.config.max_consolidation_lost_seconds
    out = []
    for w in sess.node_workloads().get(ni, ()):
        j = sess.run_job(w)
        cheap = cap is None or w.work_since_checkpoint(sess.now) <= cap
        if cheap and not j.evicted and len(j.places) == len(w.tasks) and sess.evictable(j):
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
    big = pj.biggest * 1000  # GPUs (milli) of its biggest whole-GPU task
    stmt = sess.statement()
    moved: list[RunJob] = []
    for ni in targets:
        movers = _movers(ctx, ni)
        if not movers or len(moved) + len(movers) > ctx.config.max_consolidation_moves:
            continue
        if big and any(j.vec[0] >= big for j in movers):
            continue  # moving a workload as big as the task cannot make room for it
        for j in movers:
            why = f"moved to another node to make room for workload {pj.w.id} (defragmentation)"
            stmt.evict(j, EvictionCause.CONSOLIDATE, why, pj.w.id)
            moved.append(j)
        cp = stmt.checkpoint()
        if place_workload(sess, stmt, pj.w, pj.specs, pj.leaf, ctx.scorer, no_extras) and all(
            _replace(ctx, stmt, j) for j in _needed(sess, stmt, moved, cp)
        ):
            stmt.commit()
            pj.bound = pj.done = True
            pj.reason = None
            return True
        stmt.rollback(cp)
    stmt.rollback()
    return False


def _needed(sess: Session, stmt: Statement, moved: list[RunJob], cp: tuple[int, int, int]) -> list[RunJob]:
    """Put back the movers on nodes the gang did not use (moving them would be churn for
    nothing); the others have to move."""
    used = {b.node for b in stmt.binds[cp[1] :]}
    out = []
    for j in moved:
        if any(sess.nodes[p[0]].node.name in used for p in j.places):
            out.append(j)
        else:
            stmt.unevict(j)
    return out


def _replace(ctx: Context, stmt: Statement, j: RunJob) -> bool:
    specs = [TaskSpec(t, ctx.sess.max_device_memory) for t in j.w.tasks]
    before = len(stmt.binds)
    if not place_workload(ctx.sess, stmt, j.w, specs, j.leaf, _REPLACER):
        return False
    return len(stmt.binds) - before == len(specs)


def reclaim_with_moves(
    ctx: Context,
    pj: PendingJob,
    victims: Iterable[RunJob],
    guard: Callable[[RunJob], bool],
    why: Callable[[RunJob], str],
    cause: EvictionCause = EvictionCause.RECLAIM,
) -> bool:
    """Reclaim for a multi-GPU task when no node can be freed by eviction alone.

    Reclaim's victims (in victim order, each passing ``guard``) are evicted until enough GPUs
    are free in the cluster; then the node that is cheapest to empty has its remaining
    occupants moved (cheap, preemptible ones only, like consolidation) into the room the
    victims left elsewhere, and the task takes that node. Victims whose room nobody used are
    put back. All or nothing, inside one Statement.
    """
    sess = ctx.sess
    s = pj.specs[0]
    allowed, nodes = eligible(sess, pj.w)
    stmt = sess.statement()
    evicted: list[RunJob] = []
    pool = (j for j in victims if not j.evicted and any(allowed[p[0]] for p in j.places))
    for j in pool:
        if sess.total_free_milli >= pj.req[0]:
            break
        if guard(j):
            stmt.evict(j, cause, why(j), pj.w.id)
            evicted.append(j)
    if sess.total_free_milli < pj.req[0]:
        stmt.rollback()
        return False
    for _ in range(MORE_VICTIMS + 1):
        # Nodes whose movers fit into the room the victims left elsewhere, cheapest first.
        start = stmt.checkpoint()
        cands = [c for c in _cheapest_nodes(ctx, nodes, s.count) if _movers_fit(sess, allowed, c)]
        for ni, movers in cands[:NODES_TRIED]:
            for j in movers:
                why_move = f"moved to another node to make room for workload {pj.w.id} (reclaim)"
                stmt.evict(j, EvictionCause.CONSOLIDATE, why_move, pj.w.id)
            placed = place_workload(sess, stmt, pj.w, pj.specs, pj.leaf, _OneNode(ni), no_extras)
            if placed and all(_replace(ctx, stmt, j) for j in movers):
                used = {b.node for b in stmt.binds[start[1] :]}
                for j in evicted:
                    if j.evicted and not any(sess.nodes[p[0]].node.name in used for p in j.places):
                        stmt.unevict(j)
                stmt.commit()
                pj.bound = pj.done = True
                pj.reason = None
                return True
            stmt.rollback(start)  # the movers did not fit into the room left: next node
        more = next((j for j in pool if guard(j)), None)  # not enough room: one more victim
        if more is None:
            break
        stmt.evict(more, cause, why(more), pj.w.id)
        evicted.append(more)
    stmt.rollback()
    return False


def _movers_fit(sess: Session, allowed: bytearray, cand: tuple[int, list[RunJob]]) -> bool:
    """Quick check: the movers' whole-GPU tasks fit, biggest first and tightest hole first,
    into the free whole GPUs of the other nodes (shared or CPU tasks are left to placement)."""
    target, movers = cand
    need = sorted(
        (len(p[1]) for j in movers for p in j.places if p[2] >= 1000 and len(p[1]) > 0), reverse=True
    )
    holes = sorted(sess.free_whole[ni] for ni in range(len(sess.nodes)) if allowed[ni] and ni != target)
    for k in need:
        i = next((i for i, h in enumerate(holes) if h >= k), -1)
        if i < 0:
            return False
        holes[i] -= k
        holes.sort()
    return True


def _cheapest_nodes(ctx: Context, nodes: list[int], count: int) -> list[tuple[int, list[RunJob]]]:
    """Nodes that ``count`` whole GPUs fit on once their occupants move, the least work lost
    first (then fewest, then smallest movers); every occupant must be movable.

    Unlike consolidation, any preemptible occupant may move, however long since its last
    checkpoint: this serves a job inside its project's deserved quota (the quota promise), and
    with checkpoints every 30 min a node of five small jobs is all "cheap" only ~3 % of the time.
    The cost decides which node is emptied instead."""
    sess = ctx.sess
    by_node = sess.node_workloads()
    found: list[tuple[float, int, int, int, list[RunJob]]] = []
    for ni in nodes:
        if len(sess.nodes[ni].gpu_free_milli) < count:
            continue
        movers = []
        ok = True
        for w in by_node.get(ni, ()):
            j = sess.run_job(w)
            if j.evicted:
                continue
            if len(j.places) != len(w.tasks) or not sess.evictable(j):
                ok = False
                break
            movers.append(j)
        if ok and len(movers) <= ctx.config.max_consolidation_moves:
            lost = sum(j.lost for j in movers)
            found.append((lost, len(movers), sum(j.vec[0] for j in movers), ni, movers))
    found.sort(key=lambda t: (t[0], t[1], t[2], t[3]))
    return [(ni, movers) for _, _, _, ni, movers in found]


class _OneNode(Binpack):
    """Bin-packing restricted to one node."""

    def __init__(self, ni: int) -> None:
        self.ni = ni

    def pick(self, sess: Session, s: TaskSpec, allowed: bytearray, gang: list[int]) -> int | None:
        mask = bytearray(len(allowed))
        mask[self.ni] = allowed[self.ni]
        return super().pick(sess, s, mask, gang)
