"""What a cycle derives from its snapshot, kept for the next cycle by a caller that asks for it.

``run_cycle(snapshot, config, memo=memo)`` reads and updates ``memo``, an explicit object the
caller owns (the simulator keeps one per replay); without one every cycle starts from scratch.
The result never depends on the memo: it only holds values that are pure functions of the
(immutable) workloads, nodes and queue tree of the snapshot, keyed by their identity, and it
holds those objects too, so that an identity is never reused while it is remembered.

* :class:`RunningBase`: node and queue usage of the running workloads (sums of integers, so
  adding and removing workloads as they come and go gives exactly what a rebuild gives);
* :class:`~aifab.scheduler.pending.PendingIndex`: the pending workloads in job order;
* :class:`~aifab.scheduler.keybounds.KeyBounds`: bounds of the running workloads' job-order
  keys, where preemption by job order reads them.

Between two snapshots only the workloads that are new or gone (by identity) are applied:
the snapshot's :class:`~aifab.core.snapshot.WorkloadChanges` when it carries some that follow
the last snapshot's, else what :func:`diff` finds by walking both lists. Anything unusual
(duplicate workload ids, another node tuple or queue tree, another job order) makes the memo
rebuild what it holds from the snapshot, exactly as a cycle without it would.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from itertools import compress, count, repeat
from operator import attrgetter, is_, is_not

from aifab.core.nodes import Node, NodeState
from aifab.core.queues import QueueTree
from aifab.core.resources import Resources
from aifab.core.snapshot import ClusterSnapshot, WorkloadChanges
from aifab.core.workloads import Workload, WorkloadPhase
from aifab.scheduler.config import Fairness, SchedulerConfig
from aifab.scheduler.fairshare import Columns
from aifab.scheduler.keybounds import JobKey, KeyBounds
from aifab.scheduler.pending import PendingIndex
from aifab.scheduler.plugins.orders import KEY_NEVER_FALLS, KEY_NEVER_RISES, KEY_STEADY_BELOW
from aifab.scheduler.session import ViewSlot, node_summary
from aifab.scheduler.static import NodeFacts, TreeInfo

RUNNING = WorkloadPhase.RUNNING
_ID = attrgetter("id")
FAIR_KEPT = 4
FairShares = tuple[dict[str, tuple[int, int, int]], dict[str, tuple[int, int, int]]]


class RunningBase:
    """Free node resources and queue usage once every running workload is charged."""

    def __init__(self, nodes: tuple[Node, ...], tree: QueueTree, facts: NodeFacts, tinfo: TreeInfo) -> None:
        self.nodes = nodes
        self.tree = tree
        self.index = facts.index
        self.tinfo = tinfo
        self.states = [NodeState(n, i) for i, n in enumerate(nodes)]
        self.alloc: dict[str, list[int]] = {q: [0, 0, 0] for q in tinfo.by_name}
        self.np_alloc: dict[str, list[int]] = {q: [0, 0, 0] for q in tinfo.by_name}
        # queue -> priority -> GPU milli of preemptible running work
        self.preemptible_gpu: dict[str, dict[int, int]] = {}
        self.count = 0
        self.running: dict[int, Workload] = {}  # by identity; not in snapshot order
        self._summaries: list[tuple[int, int, int] | None] = [None] * len(nodes)

    def summaries(self) -> list[tuple[int, int, int]]:
        """Per node, what the session's node index is built from (see node_summary)."""
        out = self._summaries
        for i, got in enumerate(out):
            if got is None:
                out[i] = node_summary(self.states[i])
        return out  # type: ignore[return-value]  # no None left

    def matches(self, nodes: tuple[Node, ...], tree: QueueTree) -> bool:
        return self.nodes is nodes and self.tree is tree

    def apply(self, w: Workload, sign: int) -> None:
        """Charge (sign 1) or release (sign -1) one running workload, as Session did."""
        states, index = self.states, self.index
        g = c = m = 0
        for p in w.placements:
            task = w.tasks[p.task_index]
            g += p.gpu_milli * len(p.devices)
            c += task.cpu_milli
            m += task.memory_mib
            ni = index.get(p.node)
            if ni is None:
                continue  # the node left the cluster; the usage still counts for quota
            self._summaries[ni] = None
            ns = states[ni]
            ns.free_cpu -= sign * task.cpu_milli
            ns.free_memory -= sign * task.memory_mib
            for d in p.devices:
                ns.gpu_free_milli[d] -= sign * p.gpu_milli
                ns.gpu_free_memory[d] -= sign * p.gpu_memory_mib
        info = self.tinfo.by_name.get(w.queue)
        if info is not None:
            for q in (w.queue, *info.ancestors):
                a = self.alloc[q]
                a[0] += sign * g
                a[1] += sign * c
                a[2] += sign * m
            if not w.preemptible:
                n = self.np_alloc[w.queue]
                n[0] += sign * g
                n[1] += sign * c
                n[2] += sign * m
        if w.preemptible:
            by_prio = self.preemptible_gpu.setdefault(w.queue, {})
            by_prio[w.priority] = by_prio.get(w.priority, 0) + sign * g
        self.count += sign
        if sign > 0:
            self.running[id(w)] = w
        else:
            del self.running[id(w)]

    def charge_all(self, ws: Iterable[Workload]) -> None:
        """:meth:`apply` with sign 1 for each running workload of ``ws``, in one pass: a memo
        that starts from scratch charges every running workload of the snapshot."""
        states, index, summaries = self.states, self.index, self._summaries
        by_queue: dict[tuple[str, bool], list[int]] = {}
        pre = self.preemptible_gpu
        running = self.running
        n = 0
        for w in ws:
            if w.phase is not RUNNING:
                continue
            g = c = m = 0
            tasks = w.tasks
            for p in w.placements:
                task = tasks[p.task_index]
                milli = p.gpu_milli
                g += milli * len(p.devices)
                c += task.cpu_milli
                m += task.memory_mib
                ni = index.get(p.node)
                if ni is None:
                    continue  # the node left the cluster; the usage still counts for quota
                summaries[ni] = None
                ns = states[ni]
                ns.free_cpu -= task.cpu_milli
                ns.free_memory -= task.memory_mib
                gmem = p.gpu_memory_mib
                for d in p.devices:
                    ns.gpu_free_milli[d] -= milli
                    ns.gpu_free_memory[d] -= gmem
            total = by_queue.get((w.queue, w.preemptible))
            if total is None:
                by_queue[(w.queue, w.preemptible)] = [g, c, m]
            else:
                total[0] += g
                total[1] += c
                total[2] += m
            if w.preemptible:
                by_prio = pre.get(w.queue)
                if by_prio is None:
                    by_prio = pre[w.queue] = {}
                by_prio[w.priority] = by_prio.get(w.priority, 0) + g
            running[id(w)] = w
            n += 1
        self.count += n
        # Queue sums are added per queue, not per workload (integers: the same totals).
        for (queue, preemptible), (g, c, m) in by_queue.items():
            info = self.tinfo.by_name.get(queue)
            if info is None:
                continue
            for q in (queue, *info.ancestors):
                a = self.alloc[q]
                a[0] += g
                a[1] += c
                a[2] += m
            if not preemptible:
                u = self.np_alloc[queue]
                u[0] += g
                u[1] += c
                u[2] += m

    def swap(self, a: Workload, b: Workload) -> None:
        """``b`` replaces ``a``, which it charges exactly like (see _same_usage)."""
        del self.running[id(a)]
        self.running[id(b)] = b


Swap = tuple[Workload, Workload]


def _resources(by_queue: dict[str, tuple[int, int, int]]) -> dict[str, Resources]:
    return {n: Resources(v[0], v[1], v[2]) for n, v in by_queue.items()}


CHUNK = 256


def diff(
    old: Sequence[Workload], cur: Sequence[Workload]
) -> tuple[list[Workload], list[Workload], list[Swap]]:
    """(gone, new, swapped): ``old`` minus ``gone`` and the first of each swapped pair, plus
    ``new`` and the second of each pair, is ``cur``, as multisets of workloads.

    Walks both in order a chunk at a time: a chunk that compares equal (``==`` on tuples is
    C code that takes identical items as equal without asking them) is passed over; in one
    that does not, it finds the first pair that is not the same object. A pair with the same
    workload id is counted as replaced in place (swapped); otherwise it looks a little ahead
    in each for the other's object (a run of objects gone, or new) and failing that also
    counts the pair as swapped. Any such alignment is a correct answer (an object that only
    moved counts as gone and new), and a caller that keeps its workloads in a stable order
    (the simulator) gets one about as long as what changed.

    An equal chunk may pair a workload with another object equal to it in every field: the
    memo then keeps the one it has (everything it derives is the same for both), and if that
    ever shows (a lookup by identity misses) it rebuilds from the snapshot."""
    gone: list[Workload] = []
    new: list[Workload] = []
    swapped: list[Swap] = []
    n_old, n_cur = len(old), len(cur)
    i = j = 0
    while i < n_old and j < n_cur:
        m = min(CHUNK, n_old - i, n_cur - j)
        a, b = old[i : i + m], cur[j : j + m]
        if a == b:
            i += m
            j += m
            continue
        k = next(compress(count(), map(is_not, a, b)), m)  # the chunks differ: some pair does
        i += k
        j += k
        if k == m:
            continue  # equal objects throughout (see above)
        if old[i].id == cur[j].id:
            swapped.append((old[i], cur[j]))
            i += 1
            j += 1
            continue
        p = _find(cur[j], old, i + 1)
        if p >= 0:  # old[i:p] are gone, old[p] is cur[j]
            gone.extend(old[i:p])
            i, j = p + 1, j + 1
            continue
        q = _find(old[i], cur, j + 1)
        if q >= 0:  # cur[j:q] are new, cur[q] is old[i]
            new.extend(cur[j:q])
            i, j = i + 1, q + 1
            continue
        swapped.append((old[i], cur[j]))
        i += 1
        j += 1
    gone.extend(old[i:])
    new.extend(cur[j:])
    return gone, new, swapped


LOOKAHEAD = 64


def _find(x: Workload, seq: Sequence[Workload], start: int) -> int:
    """The position of object ``x`` in ``seq[start:start + LOOKAHEAD]``, or -1."""
    hit = next(compress(count(start), map(is_, repeat(x), seq[start : start + LOOKAHEAD])), None)
    return -1 if hit is None else hit


def _same_usage(a: Workload, b: Workload) -> bool:
    """Whether two running workloads charge nodes and queues alike (e.g. only the attained
    service the simulator refreshes differs)."""
    return (
        a.phase is RUNNING
        and b.phase is RUNNING
        and a.placements is b.placements
        and a.tasks is b.tasks
        and a.queue == b.queue
        and a.preemptible == b.preemptible
        and a.priority == b.priority
        and a.id == b.id
    )


class CycleMemo:
    """Caller-owned state carried from one cycle to the next (see the module docstring)."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        # The last snapshot's workloads; None when it came with changes (its caller may reuse
        # the list), so that only changes following it can bring the memo to the next one.
        self.seen: Sequence[Workload] | None = ()
        self.token: object = None  # the last snapshot's changes token, if it had changes
        self.ids: dict[str, int] = {}  # workload id -> how many of the seen workloads have it
        self.duplicates = 0  # workload ids held by more than one seen workload
        self.running: RunningBase | None = None
        self.pending: PendingIndex | None = None
        self.view = ViewSlot()  # a placement plugin's view of the nodes (see ViewSlot)
        self.bounds: KeyBounds | None = None  # of running workloads' job-order keys (preempt)
        self._fair: list[tuple[QueueTree, object, FairShares]] = []  # the last few, newest last
        self._columns: tuple[QueueTree | None, Columns] = (None, {})
        self._as_resources: tuple[FairShares, tuple[dict[str, Resources], dict[str, Resources]]] | None
        self._as_resources = None

    def fair_shares(self, tree: QueueTree, key: object) -> FairShares | None:
        """The (fair shares, demands) computed last for this tree and these inputs, if kept."""
        for t, k, got in reversed(self._fair):
            if t is tree and k == key:
                return got
        return None

    def keep_fair_shares(self, tree: QueueTree, key: object, got: FairShares) -> FairShares:
        self._fair = [*self._fair[-(FAIR_KEPT - 1) :], (tree, key, got)]
        return got

    def as_resources(self, got: FairShares) -> tuple[dict[str, Resources], dict[str, Resources]]:
        """(fair shares, demands) as a cycle result holds them: each result gets its own
        dicts, of Resources (immutable) made once for as long as the fair shares are the same
        object (most cycles)."""
        last = self._as_resources
        if last is None or last[0] is not got:
            last = self._as_resources = (got, (_resources(got[0]), _resources(got[1])))
        fair, demand = last[1]
        return dict(fair), dict(demand)

    def fair_columns(self, tree: QueueTree) -> Columns:
        """Per-resource splits remembered for this tree (see fair_shares_and_demands)."""
        if self._columns[0] is not tree:
            self._columns = (tree, {})
        return self._columns[1]

    def _count_ids(self, ws: Sequence[Workload], sign: int) -> None:
        ids = self.ids
        if not ids and sign > 0:  # from scratch (every workload is new): count in C
            ids = self.ids = Counter(map(_ID, ws))
            if len(ids) < len(ws):
                self.duplicates = sum(1 for n in ids.values() if n > 1)
            return
        for w in ws:
            n = ids.get(w.id, 0)
            if sign > 0:
                self.duplicates += n == 1
                ids[w.id] = n + 1
            else:
                self.duplicates -= n == 2
                if n == 1:
                    del ids[w.id]
                else:
                    ids[w.id] = n - 1

    def refresh(
        self,
        snapshot: ClusterSnapshot,
        config: SchedulerConfig,
        jkey: JobKey,
        facts: NodeFacts,
        tinfo: TreeInfo,
    ) -> tuple[RunningBase, PendingIndex, bool]:
        """Bring the memo to this snapshot; returns (running, pending, ids unique)."""
        try:
            return self._refresh(snapshot, config, jkey, facts, tinfo)
        except KeyError:
            # An object the memo holds was paired with an equal one it does not (see diff):
            # start over from this snapshot.
            self._reset()
            return self._refresh(snapshot, config, jkey, facts, tinfo)
        except BaseException:
            self._reset()  # never keep a half-applied change
            raise

    def _sync_bounds(
        self,
        config: SchedulerConfig,
        jkey: JobKey,
        base: RunningBase,
        rebuilt: bool,
        gone: list[Workload],
        new: list[Workload],
        kept: list[Swap],
        now: float,
    ) -> None:
        """Keep bounds of the running workloads' keys where preemption by job order reads them
        (see :mod:`~aifab.scheduler.keybounds`); only with unique ids (keys end with the id)."""
        bounds = self.bounds
        order = config.job_order
        steady = KEY_STEADY_BELOW.get(order) if order in KEY_NEVER_FALLS else None
        if (
            not config.preempt_by_job_order
            or self.duplicates
            or (order not in KEY_NEVER_RISES and steady is None)
        ):
            self.bounds = None
        elif bounds is None or rebuilt or bounds.job_order != order or bounds.jkey is not jkey:
            self.bounds = KeyBounds(order, jkey, None if order in KEY_NEVER_RISES else steady)
            self.bounds.update((), base.running.values(), now)
        else:
            bounds.update(
                [*(w for w in gone if w.phase is RUNNING), *(a for a, _ in kept)],
                [*(w for w in new if w.phase is RUNNING), *(b for _, b in kept)],
                now,
            )

    def _refresh(
        self,
        snapshot: ClusterSnapshot,
        config: SchedulerConfig,
        jkey: JobKey,
        facts: NodeFacts,
        tinfo: TreeInfo,
    ) -> tuple[RunningBase, PendingIndex, bool]:
        ws = snapshot.workloads
        changes = snapshot.changes
        if changes is not None and self.token is not None and changes.since is self.token:
            gone, new, swapped = self._checked(changes)
        else:
            if self.seen is None:
                self._reset()  # the list to compare with was not kept: start over
            gone, new, swapped = diff(self.seen or (), ws)
        self.seen = ws if changes is None else None
        self.token = None if changes is None else changes.token
        kept: list[Swap] = []
        for a, b in swapped:
            if _same_usage(a, b):  # nothing changes but the object
                kept.append((a, b))
            else:
                gone.append(a)
                new.append(b)
        self._count_ids(gone, -1)
        self._count_ids(new, 1)
        unique = self.duplicates == 0

        base = self.running
        rebuilt = base is None or not base.matches(snapshot.nodes, snapshot.queues)
        if base is None or rebuilt:
            base = self.running = RunningBase(snapshot.nodes, snapshot.queues, facts, tinfo)
            base.charge_all(ws)
        else:
            for w in gone:
                if w.phase is RUNNING:
                    base.apply(w, -1)
            for w in new:
                if w.phase is RUNNING:
                    base.apply(w, 1)
            for a, b in kept:
                base.swap(a, b)
        self._sync_bounds(config, jkey, base, rebuilt, gone, new, kept, snapshot.now)

        grouped = config.fairness is not Fairness.NONE
        hint = facts.max_device_memory
        index = self.pending
        if (
            index is None
            or not unique
            or not index.matches(snapshot.queues, config.job_order, grouped, hint)
            or not index.update(
                (index.infos[id(w)] for w in gone if w.phase is not RUNNING),
                (w for w in new if w.phase is not RUNNING),
            )
        ):
            if index is None or not index.matches(snapshot.queues, config.job_order, grouped, hint):
                index = PendingIndex(snapshot.queues, config.job_order, jkey, grouped, hint)
            index.build(w for w in ws if w.phase is not RUNNING)
            self.pending = index
        if changes is not None and unique and base.count + len(index.infos) != len(ws):
            raise ValueError(
                f"snapshot.changes do not match snapshot.workloads: {len(ws)} workloads, "
                f"{base.count + len(index.infos)} after the changes"
            )
        return base, index, unique

    def _checked(self, changes: WorkloadChanges) -> tuple[list[Workload], list[Workload], list[Swap]]:
        """(gone, new, no swaps) from a caller's changes, after checking that each gone
        workload is one the memo holds and each new one is not (the count is checked once
        they are applied): a caller's mistake is an error, never a silently wrong memo."""
        base, index = self.running, self.pending
        if base is None or index is None:
            raise ValueError("snapshot.changes follow a snapshot the memo does not hold")
        held = base.running
        infos = index.infos
        for w in changes.gone:
            if held.get(id(w)) is not w and (id(w) not in infos or infos[id(w)].w is not w):
                raise ValueError(f"snapshot.changes: gone workload {w.id!r} was not in the last snapshot")
        for w in changes.new:
            if id(w) in held or id(w) in infos:
                raise ValueError(f"snapshot.changes: new workload {w.id!r} was already in the last snapshot")
        return list(changes.gone), list(changes.new), []
