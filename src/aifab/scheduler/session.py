"""The mutable world of one cycle: node states, queue usage, and transactions over both.

A :class:`Session` is built once per cycle from the snapshot. Every what-if (placing a gang,
evicting victims, moving workloads) runs inside a :class:`Statement` whose operation log can
be rolled back to any checkpoint, so gangs are all-or-nothing and failed attempts leave no
trace. Resource vectors are plain ``(gpu_milli, cpu_milli, memory_mib)`` tuples: this code is
hot and tuples are several times cheaper than dataclasses.
"""

from __future__ import annotations

from collections.abc import Mapping

from aifab.core.decisions import Bind, Evict, EvictionCause, ReasonCode
from aifab.core.nodes import NodeState
from aifab.core.queues import Queue
from aifab.core.resources import GPU_MILLI
from aifab.core.snapshot import ClusterSnapshot
from aifab.core.workloads import GpuRequestKind, TaskRequest, Workload
from aifab.scheduler.config import SchedulerConfig
from aifab.scheduler.static import QueueInfo, node_facts, tree_info

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


# What a pending workload's tasks flatten to, kept from one cycle to the next: a workload waits
# through thousands of cycles unchanged (workloads are immutable; a changed one is a new object).
# Keyed by identity, each entry holding its workload, so the result never depends on the cache.
_KNOWN_PENDING: dict[int, tuple[Workload, int, tuple[list[TaskSpec], Vec, object, int]]] = {}
_KNOWN_PENDING_MAX = 200_000


class PendingJob:
    """A pending workload plus what the cycle learned about it."""

    __slots__ = (
        "_shape",
        "_tasks_key",
        "biggest",
        "bound",
        "done",
        "leaf",
        "order",
        "reason",
        "req",
        "specs",
        "w",
    )

    def __init__(
        self,
        w: Workload,
        leaf: QueueState | None,
        cache: dict[object, tuple[list[TaskSpec], Vec, object, int]],
        device_memory_hint: int = 0,
    ) -> None:
        self.w = w
        self.leaf = leaf
        known = _KNOWN_PENDING.get(id(w))
        if known is not None and known[0] is w and known[1] == device_memory_hint:
            self.specs, self.req, tasks_key, self.biggest = known[2]
        else:
            got = self._static(w, cache, device_memory_hint)
            self.specs, self.req, tasks_key, self.biggest = got
            if len(_KNOWN_PENDING) >= _KNOWN_PENDING_MAX:
                _KNOWN_PENDING.clear()
            _KNOWN_PENDING[id(w)] = (w, device_memory_hint, got)
        self._shape: object = None
        self._tasks_key = tasks_key
        self.order: tuple[object, ...] = ()
        self.bound = False
        self.done = False  # nothing more to try for it this pass
        self.reason: tuple[ReasonCode, str] | None = None  # made a PendingReason once, at the end

    @staticmethod
    def _static(
        w: Workload, cache: dict[object, tuple[list[TaskSpec], Vec, object, int]], device_memory_hint: int
    ) -> tuple[list[TaskSpec], Vec, object, int]:
        tasks = w.tasks
        gang_size = w.min_available or len(tasks)
        t = tasks[0]
        if len(tasks) == 1 or all(x is t for x in tasks):
            # Plain attributes hash in C; dataclass __hash__/__eq__ would run Python code.
            g = t.gpu
            key: object = (
                g.kind,
                g.count,
                g.milli,
                g.memory_mib,
                t.cpu_milli,
                t.memory_mib,
                len(tasks),
                gang_size,
            )
        else:
            key = (tasks, gang_size)
        got = cache.get(key)  # most pending workloads share a few task shapes
        if got is None:
            specs = [TaskSpec(t, device_memory_hint) for t in w.tasks]
            gang = specs[:gang_size]
            req: Vec = (sum(s.gpu_need for s in gang), sum(s.cpu for s in gang), sum(s.memory for s in gang))
            biggest = max((s.count for s in specs if s.kind is GpuRequestKind.WHOLE), default=0)
            got = (specs, req, tuple(s.key for s in specs), biggest)
            cache[key] = got
        return got

    @property
    def shape(self) -> object:
        """What decides whether a placement can succeed (not the queue, not the id); made on
        first use since most pending jobs are refused before placement is tried."""
        if self._shape is None:
            w = self.w
            models, selector, topo = w.gpu_models, w.node_selector, w.topology
            self._shape = (
                self._tasks_key,
                w.min_available or len(w.tasks),
                w.node_pool,
                tuple(sorted(models)) if models else (),
                tuple(sorted(selector.items())) if selector else (),
                None if topo is None else (topo.level, topo.mode.value),
            )
        return self._shape


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


class Session:
    """Node states, queue states and the decisions taken so far in this cycle."""

    def __init__(self, snapshot: ClusterSnapshot, config: SchedulerConfig) -> None:
        self.snapshot = snapshot
        self.config = config
        self.now = snapshot.now
        facts = node_facts(snapshot.nodes)
        self.capacity: Vec = facts.capacity
        self.nodes = [NodeState(n, i) for i, n in enumerate(snapshot.nodes)]
        self.node_index = facts.index  # shared between cycles: read only
        self.max_gpus = facts.max_gpus
        self.max_device_memory = facts.max_device_memory
        self.queues: dict[str, QueueState] = {}
        tinfo = tree_info(snapshot.queues)
        for q in snapshot.queues:
            self.queues[q.name] = QueueState(q, tinfo.by_name[q.name])
        for qs in self.queues.values():
            qs.ancestors = [self.queues[a] for a in tinfo.by_name[qs.name].ancestors]
            qs.limits = [
                (q, k, lim) for q in (qs, *qs.ancestors) for k, lim in enumerate(q.limit) if lim is not None
            ]
        self.binds: list[Bind] = []
        self.evictions: list[Evict] = []
        self.pending: list[PendingJob] = []
        self.running: list[Workload] = []
        self.running_by_queue: dict[str, list[Workload]] = {}
        # queue -> priority -> GPU milli of preemptible running work: bounds what preemption
        # could free without building victims.
        self.preemptible_gpu: dict[str, dict[int, int]] = {}
        self._jobs: dict[str, RunJob] = {}
        self._by_node: dict[int, list[Workload]] | None = None
        self._spec_cache: dict[object, tuple[list[TaskSpec], Vec, object, int]] = {}
        self.evicted_ids: set[str] = set()
        self.shape_failures: dict[object, tuple[ReasonCode, str]] = {}
        self.messages: dict[object, tuple[ReasonCode, str]] = {}
        self.stats: dict[str, float] = {}
        self.gpu_models_hint: frozenset[str] = frozenset()  # models of the gang being placed
        self._domains: dict[str, dict[str, list[int]]] = {}
        self.filters: dict[object, tuple[bytearray, list[int]]] = {}
        # Nodes changed by take/give since a placement plugin last synced its own view of them.
        self.touched: dict[int, None] = {}
        self._apply_running(snapshot)
        self._index_nodes()

    # ----- construction -------------------------------------------------------------------
    def _apply_running(self, snapshot: ClusterSnapshot) -> None:
        nodes, index, queues = self.nodes, self.node_index, self.queues
        for w in snapshot.workloads:
            leaf = queues.get(w.queue)
            if not w.is_running:
                self.pending.append(PendingJob(w, leaf, self._spec_cache, self.max_device_memory))
                continue
            self.running.append(w)
            self.running_by_queue.setdefault(w.queue, []).append(w)
            g = c = m = 0
            for p in w.placements:
                task = w.tasks[p.task_index]
                g += p.gpu_milli * len(p.devices)
                c += task.cpu_milli
                m += task.memory_mib
                ni = index.get(p.node)
                if ni is None:
                    continue  # the node left the cluster; the usage still counts for quota
                ns = nodes[ni]
                # Direct updates: the snapshot is trusted and this loop is the hot path.
                ns.free_cpu -= task.cpu_milli
                ns.free_memory -= task.memory_mib
                for d in p.devices:
                    ns.gpu_free_milli[d] -= p.gpu_milli
                    ns.gpu_free_memory[d] -= p.gpu_memory_mib
            if leaf is not None:
                self.charge(leaf, (g, c, m), not w.preemptible, 1)
            if w.preemptible:
                by_prio = self.preemptible_gpu.setdefault(w.queue, {})
                by_prio[w.priority] = by_prio.get(w.priority, 0) + g

    def _index_nodes(self) -> None:
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
        for i, ns in enumerate(self.nodes):
            fw = sum(1 for m in ns.gpu_free_milli if m == GPU_MILLI)
            self.free_whole[i] = fw
            if ns.node.schedulable:
                self.whole_hist[fw] += 1
                self.buckets[fw][i] = None
                self.total_free_milli += sum(m for m in ns.gpu_free_milli if m > 0)
                self._set_partial(i, max((m for m in ns.gpu_free_milli if 0 < m < GPU_MILLI), default=0))

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
    def take(self, p: Place) -> None:
        ni, devices, milli, gmem, cpu, mem = p
        ns = self.nodes[ni]
        ns.allocate(devices, milli, gmem, cpu, mem)
        self.touched[ni] = None
        self._reindex(ni, -milli * len(devices))

    def give(self, p: Place) -> None:
        ni, devices, milli, gmem, cpu, mem = p
        ns = self.nodes[ni]
        # A running placement on a since-shrunk device may exceed capacity; clamp by releasing
        # through NodeState only when it is consistent (the common case).
        ns.release(devices, milli, gmem, cpu, mem)
        self.touched[ni] = None
        self._reindex(ni, milli * len(devices))

    def _reindex(self, ni: int, milli_delta: int) -> None:
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

    def queue_jobs(self, queue: str) -> list[RunJob]:
        """Running workloads of one queue."""
        return [self.run_job(w) for w in self.running_by_queue.get(queue, ())]

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
    out: dict[str, list[int]] = {}
    for name, qs in sess.queues.items():
        if qs.is_leaf:
            out[name] = list(qs.allocated)
    for pj in sess.pending:
        if pj.leaf is not None and pj.leaf.is_leaf:
            d = out[pj.leaf.name]
            d[0] += pj.req[0]
            d[1] += pj.req[1]
            d[2] += pj.req[2]
    return {n: (v[0], v[1], v[2]) for n, v in out.items()}
