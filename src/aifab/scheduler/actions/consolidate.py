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

from collections.abc import Callable, Iterable

from aifab.core.decisions import EvictionCause, ReasonCode
from aifab.scheduler.checks import limit_refusal
from aifab.scheduler.config import Fairness
from aifab.scheduler.context import Context
from aifab.scheduler.placer import eligible, place_workload
from aifab.scheduler.plugins.nodescore import Binpack
from aifab.scheduler.session import PendingJob, RunJob, Session, Statement, TaskSpec

FRAGMENTATION = frozenset({ReasonCode.FRAGMENTED, ReasonCode.GANG, ReasonCode.TOPOLOGY})
TARGET_NODES = 8  # nodes emptied at most per attempt
_REPLACER = Binpack()  # stateless: re-places moved workloads
NODES_TRIED = 4  # nodes reclaim_with_moves tries to empty for one pending task
MORE_VICTIMS = 8  # extra victims reclaim_with_moves evicts when the movers find no room


def consolidate(ctx: Context) -> None:
    attempts = ctx.config.max_consolidation_attempts
    if attempts <= 0 or ctx.config.max_consolidation_moves <= 0:
        return
    failed: set[object] = set()
    for pj in ctx.sess.pending:
        if attempts <= 0:
            break
        if pj.bound or pj.reason is None or pj.reason[0] not in FRAGMENTATION or pj.leaf is None:
            continue
        if pj.req[0] > ctx.sess.total_free_milli:
            continue  # moving work around cannot make room that does not exist
        if ctx.config.fairness is not Fairness.NONE and limit_refusal(pj.leaf, pj.req) is not None:
            continue
        if pj.shape in failed:
            continue
        attempts -= 1
        if not _try(ctx, pj):
            failed.add(pj.shape)


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
        if place_workload(sess, stmt, pj.w, pj.specs, pj.leaf, ctx.scorer) and all(
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
            stmt.evict(j, EvictionCause.RECLAIM, why(j), pj.w.id)
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
            placed = place_workload(sess, stmt, pj.w, pj.specs, pj.leaf, _OneNode(ni))
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
        stmt.evict(more, EvictionCause.RECLAIM, why(more), pj.w.id)
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
