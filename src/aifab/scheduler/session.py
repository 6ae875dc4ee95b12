"""The mutable world of one cycle: node states, queue usage, and transactions over both.

A :class:`Session` is built once per cycle from the snapshot. Every what-if (placing a gang,
evicting victims, moving workloads) runs inside a :class:`Statement` whose operation log can
be rolled back to any checkpoint, so gangs are all-or-nothing and failed attempts leave no
trace. Resource vectors are plain ``(gpu_milli, cpu_milli, memory_mib)`` tuples: this code is
hot and tuples are several times cheaper than dataclasses.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from aifab.core.decisions import Bind, Evict, EvictionCause, ReasonCode
from aifab.core.nodes import NodeState
from aifab.core.queues import Queue
from aifab.core.resources import GPU_MILLI
from aifab.core.snapshot import ClusterSnapshot
from aifab.core.workloads import GpuRequestKind, TaskRequest, Workload, WorkloadPhase
from aifab.scheduler.config import SchedulerConfig
from aifab.scheduler.static import QueueInfo, node_facts, tree_info

if TYPE_CHECKING:
    from aifab.scheduler.jobs import PendingSet
    from aifab.scheduler.keybounds import KeyBounds
    from aifab.scheduler.memo import RunningBase

Vec = tuple[int, int, int]
ZERO3: Vec = (0, 0, 0)
# (node index, devices, milli per device, gpu memory per device, cpu, memory)
Place = tuple[int, tuple[int, ...], int, int, int, int]


class TaskSpec:
    """A task request flattened for the placement loop."""

    __slots__ = ("count", "cpu", "gmem", "hint", "key", "kind", "memory", "milli", "task")

    def __init__(self, t: TaskRequest, device_memory_hint: int = 0) -> None:
        self.task = t
        self.hint = device_memory_hint
        self.kind = t.gpu.kind
        self.count = t.gpu.count if self.kind is GpuRequestKind.WHOLE else 0
        self.milli = t.gpu.milli
        self.gmem = t.gpu.memory_mib
        self.cpu = t.cpu_milli
        self.memory = t.memory_mib
        self.key = (self.kind.value, self.count, self.milli, self.gmem, self.cpu, self.memory)

    @property
    def gpu_need(self) -> int:
        """Nominal milli-GPU; a memory request counts as its share of the largest device in the
        cluster until placed (a lower bound, so quick capacity checks never refuse wrongly)."""
        if self.kind is GpuRequestKind.WHOLE:
            return self.count * GPU_MILLI
        if self.kind is GpuRequestKind.FRACTION:
            return self.milli
        if self.kind is GpuRequestKind.MEMORY:
            return self.task.gpu.milli_nominal(self.hint)
        return 0


class QueueState:
    """Usage and shares of one queue during the cycle (allocated includes the subtree)."""

    __slots__ = (
        "allocated",
        "ancestors",
        "deserved",
        "fair",
        "is_leaf",
        "limit",
        "limits",
        "name",
        "np_allocated",
        "priority",
        "queue",
    )

    def __init__(self, q: Queue, info: QueueInfo) -> None:
        self.queue = q
        self.name = q.name
        self.is_leaf = info.is_leaf
        self.priority = info.priority
        self.deserved: Vec = info.deserved
        self.limit: tuple[int | None, int | None, int | None] = info.limit
        self.allocated = [0, 0, 0]
        self.np_allocated = [0, 0, 0]  # non-preemptible part, checked against deserved
        self.fair: Vec = ZERO3
        self.ancestors: list[QueueState] = []
        # (queue, resource, limit) over this queue and its ancestors: the limits to check.
        self.limits: list[tuple[QueueState, int, int]] = []

    @property
    def kind_word(self) -> str:
        return "project" if self.is_leaf else "department"


class RunJob:
    """A running workload as a possible victim or mover (places resolved on first use)."""

    __slots__ = ("_index", "_places", "evicted", "gpus", "leaf", "lost", "vec", "w")

    def __init__(
        self, w: Workload, leaf: QueueState | None, now: float, node_index: Mapping[str, int]
    ) -> None:
        self.w = w
        self.leaf = leaf
        g = c = m = 0
        tasks = w.tasks
        for p in w.placements:
            t = tasks[p.task_index]
            g += p.gpu_milli * len(p.devices)
            c += t.cpu_milli
            m += t.memory_mib
        self.vec: Vec = (g, c, m)  # what its queue was charged, as in Session._apply_running
        self.gpus = g / GPU_MILLI
        self.lost = w.work_since_checkpoint(now) * self.gpus
        self.evicted = False
        self._index = node_index
        self._places: list[Place] | None = None

    @property
    def places(self) -> list[Place]:
        """Its placements on nodes still in the cluster, as node-index tuples."""
        if self._places is None:
            out: list[Place] = []
            for p in self.w.placements:
                ni = self._index.get(p.node)
                if ni is not None:
                    t = self.w.tasks[p.task_index]
                    out.append((ni, p.devices, p.gpu_milli, p.gpu_memory_mib, t.cpu_milli, t.memory_mib))
            self._places = out
        return self._places


def node_summary(ns: NodeState) -> tuple[int, int, int]:
    """(free whole GPUs, free milli-GPU on all devices, most free milli on a partly used one)."""
    fw = 0
    free = 0
    part = 0
    for m in ns.gpu_free_milli:
        if m == GPU_MILLI:
            fw += 1
        elif 0 < m < GPU_MILLI and part < m:
            part = m
        if m > 0:
            free += m
    return fw, free, part


class ViewSlot:
    """Where a placement plugin may keep its array view of the nodes from one cycle to the next
    (inside a CycleMemo), with the node tuple it was built for. The plugin brings the view up to
    date with the session's nodes before using it (every row that differs is re-copied and
    marked changed), so the view is the one it would build, plus caches it may reuse."""

    __slots__ = ("groups", "nodes", "owner", "rows", "view")

    def __init__(self) -> None:
        self.view: object = None
        self.groups: object = None
        self.nodes: object = None
        self.owner = ""
        # per row: (free cpu, free memory, free milli per device) as the view holds them
        self.rows: list[tuple[int, int, list[int]]] | None = None


class Session:
    """Node states, queue states and the decisions taken so far in this cycle."""

    def __init__(
        self, snapshot: ClusterSnapshot, config: SchedulerConfig, base: RunningBase, unique_ids: bool = False
    ) -> None:
        """``base`` holds the running workloads' usage (see :mod:`aifab.scheduler.memo`); the
        pending ones are attached as ``jobs`` by the cycle. ``unique_ids``: no two workloads
        of the snapshot share an id (then orders that end with the id do not depend on the
        order the running workloads are listed in)."""
        self.snapshot = snapshot
        self.config = config
        self.now = snapshot.now
        facts = node_facts(snapshot.nodes)
        self.capacity: Vec = facts.capacity
        # The memo's node states, shared until changed (see _own).
        self.nodes = list(base.states)
        self._owned = bytearray(len(self.nodes))
        self.node_index = facts.index  # shared between cycles: read only
        self.max_gpus = facts.max_gpus
        self.max_device_memory = facts.max_device_memory
        self.queues: dict[str, QueueState] = {}
        tinfo = tree_info(snapshot.queues)
        for q in snapshot.queues:
            qs = self.queues[q.name] = QueueState(q, tinfo.by_name[q.name])
            qs.allocated = list(base.alloc[q.name])
            qs.np_allocated = list(base.np_alloc[q.name])
        for qs in self.queues.values():
            qs.ancestors = [self.queues[a] for a in tinfo.by_name[qs.name].ancestors]
            qs.limits = [
                (q, k, lim) for q in (qs, *qs.ancestors) for k, lim in enumerate(q.limit) if lim is not None
            ]
        self.binds: list[Bind] = []
        self.evictions: list[Evict] = []
        self.jobs: PendingSet  # the pending workloads, attached by the cycle
        self.running_count = base.count
        self._base_running = base.running if unique_ids else None
        self._running: list[Workload] | None = None
        self._running_by_queue: dict[str, list[Workload]] | None = None
        # queue -> priority -> GPU milli of preemptible running work: bounds what preemption
        # could free without building victims.
        self.preemptible_gpu: dict[str, dict[int, int]] = {
            q: dict(t) for q, t in base.preemptible_gpu.items()
        }
        self._jobs: dict[str, RunJob] = {}
        self._by_node: dict[int, list[Workload]] | None = None
        self.evicted_ids: set[str] = set()
        self.shape_failures: dict[object, tuple[ReasonCode, str]] = {}
        self.messages: dict[object, tuple[ReasonCode, str]] = {}
        self.stats: dict[str, float] = {}
        self.gpu_models_hint: frozenset[str] = frozenset()  # models of the gang being placed
        self._domains: dict[str, dict[str, list[int]]] = {}
        self.filters = facts.filters  # kept between cycles with the node tuple
        # Nodes changed by take/give since a placement plugin last synced its own view of them.
        self.touched: dict[int, None] = {}
        self._free_milli: list[int] | None = None  # see free_milli
        self.view_slot: ViewSlot | None = None  # set by the cycle when the caller keeps a memo
        self.key_bounds: KeyBounds | None = None  # likewise (see aifab.scheduler.keybounds)
        self._index_nodes(base.summaries())

    @property
    def running(self) -> list[Workload]:
        """Running workloads in snapshot order (made on first use)."""
        if self._running is None:
            self._running = [w for w in self.snapshot.workloads if w.phase is WorkloadPhase.RUNNING]
        return self._running

    @property
    def running_by_queue(self) -> dict[str, list[Workload]]:
        """Running workloads per queue, only queues that have some (made on first use)."""
        if self._running_by_queue is None:
            # Its users sort each list by a key that ends with the workload id: with unique ids
            # any listing order gives the same lists, so the memo's may be used.
            listed = self.running if self._base_running is None else self._base_running.values()
            by_queue: dict[str, list[Workload]] = {}
            for w in listed:
                by_queue.setdefault(w.queue, []).append(w)
            self._running_by_queue = by_queue
        return self._running_by_queue

    # ----- construction -------------------------------------------------------------------
    def _index_nodes(self, summaries: list[tuple[int, int, int]]) -> None:
        # Free whole GPUs per node, schedulable nodes bucketed by that count (insertion-ordered
        # dicts, so iteration is deterministic), and the nodes with a partly used device: makes
        # "no node has 4 free GPUs" O(max GPUs per node) and bin-packing O(1) in the usual case.
        self._largest = -1
        self.free_whole = [0] * len(self.nodes)
        self.whole_hist = [0] * (self.max_gpus + 1)
        self.buckets: list[dict[int, None]] = [{} for _ in range(self.max_gpus + 1)]
        # Nodes with a partly used device, bucketed by the most free compute on such a device:
        # a fraction of m milli fits a partly used device only in buckets >= m.
        self.partial_level = [0] * len(self.nodes)
        self.pbuckets: dict[int, dict[int, None]] = {}
        self.total_free_milli = 0
        for i, (fw, free, part) in enumerate(summaries):
            self.free_whole[i] = fw
            if self.nodes[i].node.schedulable:
                self.whole_hist[fw] += 1
                self.buckets[fw][i] = None
                self.total_free_milli += free
                if part:
                    self._set_partial(i, part)

    # ----- queue accounting ---------------------------------------------------------------
    def charge(self, leaf: QueueState, vec: Vec, non_preemptible: bool, sign: int) -> None:
        g, c, m = vec[0] * sign, vec[1] * sign, vec[2] * sign
        for qs in (leaf, *leaf.ancestors):
            a = qs.allocated
            a[0] += g
            a[1] += c
            a[2] += m
        if non_preemptible:
            n = leaf.np_allocated
            n[0] += g
            n[1] += c
            n[2] += m

    @property
    def largest_block(self) -> int:
        """Most free whole GPUs on one schedulable node (cached until a node's count changes)."""
        if self._largest < 0:
            self._largest = next((k for k in range(self.max_gpus, 0, -1) if self.whole_hist[k]), 0)
        return self._largest

    # ----- node mutation (only through a Statement) ----------------------------------------
    def _own(self, ni: int) -> NodeState:
        """Node ``ni``, copied from the memo's on its first change this cycle (copy on write:
        take and give are the only writers)."""
        if not self._owned[ni]:
            self.nodes[ni] = self.nodes[ni].copy()
            self._owned[ni] = 1
        return self.nodes[ni]

    def take(self, p: Place) -> None:
        ni, devices, milli, gmem, cpu, mem = p
        ns = self._own(ni)
        ns.allocate(devices, milli, gmem, cpu, mem)
        self.touched[ni] = None
        self._reindex(ni, -milli * len(devices))

    def give(self, p: Place) -> None:
        ni, devices, milli, gmem, cpu, mem = p
        ns = self._own(ni)
        # A running placement on a since-shrunk device may exceed capacity; clamp by releasing
        # through NodeState only when it is consistent (the common case).
        ns.release(devices, milli, gmem, cpu, mem)
        self.touched[ni] = None
        self._reindex(ni, milli * len(devices))

    def free_milli(self) -> list[int]:
        """Per node, ``free_gpu_milli`` (the sum over its devices), made on first use and kept
        up to date by take and give: for code that looks at many nodes per decision. Read only."""
        if self._free_milli is None:
            self._free_milli = [sum(ns.gpu_free_milli) for ns in self.nodes]
        return self._free_milli

    def _reindex(self, ni: int, milli_delta: int) -> None:
        if self._free_milli is not None:
            self._free_milli[ni] += milli_delta  # each device moved by the same milli
        ns = self.nodes[ni]
        if not ns.node.schedulable:
            return
        old = self.free_whole[ni]
        fw = 0
        part = 0
        for m in ns.gpu_free_milli:
            if m == GPU_MILLI:
                fw += 1
            elif m > part:
                part = m
        if fw != old:
            self._largest = -1
            self.free_whole[ni] = fw
            self.whole_hist[old] -= 1
            self.whole_hist[fw] += 1
            del self.buckets[old][ni]
            self.buckets[fw][ni] = None
        if part != self.partial_level[ni]:
            self._set_partial(ni, part)
        self.total_free_milli += milli_delta

    def _set_partial(self, ni: int, level: int) -> None:
        old = self.partial_level[ni]
        if old:
            bucket = self.pbuckets[old]
            del bucket[ni]
            if not bucket:
                del self.pbuckets[old]
        self.partial_level[ni] = level
        if level:
            self.pbuckets.setdefault(level, {})[ni] = None

    # ----- running workloads as victims ---------------------------------------------------
    def run_job(self, w: Workload) -> RunJob:
        """A running workload as a victim or mover: built on demand, one object per workload."""
        job = self._jobs.get(w.id)
        if job is None:
            job = self._jobs[w.id] = RunJob(w, self.queues.get(w.queue), self.now, self.node_index)
        return job

    def node_workloads(self) -> dict[int, list[Workload]]:
        """Running workloads per node index (built once, only when consolidation needs it)."""
        if self._by_node is None:
            by_node: dict[int, list[Workload]] = {}
            index = self.node_index
            for w in self.running:
                seen = -1
                for p in w.placements:
                    ni = index.get(p.node)
                    if ni is not None and ni != seen:
                        lst = by_node.setdefault(ni, [])
                        if not lst or lst[-1] is not w:
                            lst.append(w)
                        seen = ni
            self._by_node = by_node
        return self._by_node

    def evictable(self, job: RunJob) -> bool:
        w = job.w
        if job.evicted or not w.preemptible:
            return False
        return not (
            w.min_runtime > 0 and w.start_time is not None and self.now < w.start_time + w.min_runtime
        )

    def domain_nodes(self, level: str) -> dict[str, list[int]]:
        """Schedulable node indices per topology domain of ``level`` (built once per level)."""
        got = self._domains.get(level)
        if got is None:
            got = {}
            for ns in self.nodes:
                if ns.node.schedulable:
                    got.setdefault(ns.node.domain(level), []).append(ns.index)
            self._domains[level] = got
        return got

    def statement(self) -> Statement:
        return Statement(self)


class Statement:
    """A transaction over the session: an operation log with checkpoint/rollback/commit."""

    __slots__ = ("binds", "evicts", "ops", "sess")

    def __init__(self, sess: Session) -> None:
        self.sess = sess
        # (op, placement, queue, vector, non-preemptible, job): enough to undo each step.
        self.ops: list[tuple[str, Place | None, QueueState | None, Vec, bool, RunJob | None]] = []
        self.binds: list[Bind] = []
        self.evicts: list[tuple[RunJob, Evict]] = []

    def checkpoint(self) -> tuple[int, int, int]:
        return (len(self.ops), len(self.binds), len(self.evicts))

    def _charge(self, leaf: QueueState | None, vec: Vec, np: bool, sign: int) -> None:
        if leaf is not None:
            self.sess.charge(leaf, vec, np, sign)
            self.ops.append(("charge" if sign > 0 else "uncharge", None, leaf, vec, np, None))

    def bind(self, w: Workload, task_index: int, p: Place, leaf: QueueState | None) -> None:
        self.sess.take(p)
        self.ops.append(("take", p, None, ZERO3, False, None))
        self._charge(leaf, (p[2] * len(p[1]), p[4], p[5]), not w.preemptible, 1)
        node = self.sess.nodes[p[0]].node.name
        self.binds.append(Bind(w.id, task_index, node, p[1], p[2], p[3]))

    def evict(self, job: RunJob, cause: EvictionCause, reason: str, for_workload: str | None) -> None:
        for p in job.places:
            self.sess.give(p)
            self.ops.append(("give", p, None, ZERO3, False, None))
        self._charge(job.leaf, job.vec, not job.w.preemptible, -1)
        job.evicted = True
        self.ops.append(("evicted", None, None, ZERO3, False, job))
        self.evicts.append((job, Evict(job.w.id, cause, reason, for_workload, round(job.lost, 3))))

    def unevict(self, job: RunJob) -> None:
        """Put a victim back where it was (its devices are still free): it was not needed."""
        for p in job.places:
            self.sess.take(p)
            self.ops.append(("take", p, None, ZERO3, False, None))
        self._charge(job.leaf, job.vec, not job.w.preemptible, 1)
        job.evicted = False
        self.ops.append(("unevicted", None, None, ZERO3, False, job))

    def rollback(self, cp: tuple[int, int, int] = (0, 0, 0)) -> None:
        n_ops, n_binds, n_evicts = cp
        sess = self.sess
        for op, p, leaf, vec, np, job in reversed(self.ops[n_ops:]):
            if op == "take" and p is not None:
                sess.give(p)
            elif op == "give" and p is not None:
                sess.take(p)
            elif op == "charge" and leaf is not None:
                sess.charge(leaf, vec, np, -1)
            elif op == "uncharge" and leaf is not None:
                sess.charge(leaf, vec, np, 1)
            elif op == "evicted" and job is not None:
                job.evicted = False
            elif op == "unevicted" and job is not None:
                job.evicted = True
        del self.ops[n_ops:]
        del self.binds[n_binds:]
        del self.evicts[n_evicts:]

    def commit(self) -> None:
        sess = self.sess
        freed = False
        for job, ev in self.evicts:
            if job.evicted:  # not put back by unevict
                sess.evictions.append(ev)
                sess.evicted_ids.add(job.w.id)
                freed = True
        sess.binds.extend(self.binds)
        if freed:
            sess.shape_failures.clear()  # capacity was freed: old failures may now fit
        self.ops.clear()
        self.binds.clear()
        self.evicts.clear()


def leaf_demand(sess: Session) -> Mapping[str, Vec]:
    """Allocated + pending requests per leaf queue."""
    sums = sess.jobs.index.sums
    out: dict[str, Vec] = {}
    for name, qs in sess.queues.items():
        if qs.is_leaf:
            a = qs.allocated
            p = sums.get(name)
            out[name] = (a[0], a[1], a[2]) if p is None else (a[0] + p[0], a[1] + p[1], a[2] + p[2])
    return out
