"""The pending jobs of one cycle: per job list, what the cycle decided about each job so far.

A :class:`LeafJobs` wraps one immutable :class:`~aifab.scheduler.pending.Group` with this
cycle's state of its jobs: done (nothing more to try this pass), bound, and the reason it
waits. State lives in byte arrays (numpy views on them too), so an action can skip a run of
jobs with one vectorised test; a :class:`PendingJob` is made only for a job an action actually
looks at, and reads and writes that state through.

Reasons are kept in two ways with the same meaning: set one by one (``explicit``), or for a
whole run of jobs refused at once, as a *segment*: the cycle's state at that moment (free GPUs,
largest free block, the shape memo, the queue's usage) from which each job's reason is worded
only when read, by the very functions that would have worded it then. Their reason codes are
stored at once (actions select jobs by code).
"""

from __future__ import annotations

import heapq
import weakref
from collections.abc import Iterator
from itertools import repeat
from operator import itemgetter
from typing import Protocol

import numpy as np
import numpy.typing as npt

from aifab.core.decisions import ReasonCode
from aifab.core.workloads import Workload
from aifab.scheduler.checks import Refusal, quick_refusal, quota_refusal
from aifab.scheduler.config import Fairness
from aifab.scheduler.pending import Group, JobInfo, PendingIndex
from aifab.scheduler.session import QueueState, TaskSpec, Vec

U8 = npt.NDArray[np.uint8]
I64 = npt.NDArray[np.int64]

CODES: list[ReasonCode | None] = [None, *ReasonCode]
CODE_ID: dict[ReasonCode, int] = {c: i for i, c in enumerate(CODES) if c is not None}


def code_table(codes: frozenset[ReasonCode]) -> npt.NDArray[np.bool_]:
    """A lookup table: ``table[code_array]`` is True where the code is one of ``codes``."""
    table = np.zeros(256, dtype=np.bool_)
    for c in codes:
        table[CODE_ID[c]] = True
    return table


def code_bytes(codes: frozenset[ReasonCode]) -> bytes:
    """The same table as bytes: ``table[code]`` is 1 or 0 for one job, without numpy."""
    return bytes(code_table(codes).astype(np.uint8))


class Segment(Protocol):
    def reason(self, lj: LeafJobs, i: int) -> Refusal: ...


class Refused:
    """A run of jobs refused before placement, with the state they were refused in."""

    __slots__ = ("block", "fairness", "free", "leaf", "memo", "words")

    def __init__(
        self,
        fairness: Fairness,
        leaf: QueueState | None,
        checks: bool,
        free: int,
        block: int,
        memo: dict[object, Refusal],
        words: dict[object, Refusal],
    ) -> None:
        self.fairness = fairness
        # The queue's state matters only if a queue check can refuse (limits, non-preemptible
        # jobs, static quotas); otherwise none would, and the copy is not made.
        self.leaf = freeze(leaf) if leaf is not None and checks else None
        self.free = free
        self.block = block
        self.memo = dict(memo)
        self.words = words

    def reason(self, lj: LeafJobs, i: int) -> Refusal:
        """What try_job would have said of job ``i`` in this state (the same checks in order)."""
        info = lj.group.infos[i]
        leaf = self.leaf
        if leaf is not None:
            refusal = quota_refusal(leaf, info.req, info.w.preemptible, self.fairness is Fairness.STATIC)
            if refusal is not None:
                return refusal
        got = quick_refusal(
            info.req[0], self.free, info.biggest, self.block, self.memo.get(info.shape), self.words
        )
        assert got is not None  # the segment holds refused jobs only
        return got


class Behind:
    """Jobs behind a blocked head of line under strict FIFO."""

    __slots__ = ("head",)

    def __init__(self, head: str) -> None:
        self.head = head

    def reason(self, lj: LeafJobs, i: int) -> Refusal:
        return (
            ReasonCode.QUEUED_BEHIND,
            f"strict FIFO: waiting behind workload {self.head}, which cannot start yet",
        )


def freeze(qs: QueueState) -> QueueState:
    """A copy of a queue's state (and of the queues its limits name) as it is now."""
    copies: dict[int, QueueState] = {}

    def one(q: QueueState) -> QueueState:
        got = copies.get(id(q))
        if got is None:
            got = copies[id(q)] = _copy(q)
        return got

    if not qs.limits:  # the usual case: one copy
        return _copy(qs)
    out = one(qs)
    out.limits = [(one(q), k, lim) for q, k, lim in qs.limits]
    return out


def _copy(q: QueueState) -> QueueState:
    """The queue's own state, without its ancestors and limits."""
    got = QueueState.__new__(QueueState)
    got.queue, got.name, got.is_leaf, got.priority = q.queue, q.name, q.is_leaf, q.priority
    got.deserved, got.limit, got.fair = q.deserved, q.limit, q.fair
    got.allocated = list(q.allocated)
    got.np_allocated = list(q.np_allocated)
    got.ancestors = []
    got.limits = []
    return got


class PendingJob:
    """A pending workload as the actions see it; its cycle state lives in its LeafJobs."""

    __slots__ = ("_i", "_lj", "biggest", "leaf", "order", "req", "shape", "specs", "w")

    def __init__(self, lj: LeafJobs, i: int, info: JobInfo, leaf: QueueState | None) -> None:
        self._lj = lj
        self._i = i
        self.w: Workload = info.w
        self.leaf = leaf
        self.specs: list[TaskSpec] = info.specs
        self.req: Vec = info.req
        self.biggest = info.biggest
        self.shape = info.shape
        self.order = info.key

    @property
    def done(self) -> bool:
        return bool(self._lj.done[self._i])

    @done.setter
    def done(self, value: bool) -> None:
        self._lj.done[self._i] = 1 if value else 0

    @property
    def bound(self) -> bool:
        return bool(self._lj.bound[self._i])

    @bound.setter
    def bound(self, value: bool) -> None:
        self._lj.bound[self._i] = 1 if value else 0

    @property
    def reason(self) -> Refusal | None:
        return self._lj.reason(self._i)

    @reason.setter
    def reason(self, value: Refusal | None) -> None:
        self._lj.set_reason(self._i, value)


class LeafJobs:
    """One job list of this cycle: the group's jobs with their state (see module doc)."""

    __slots__ = (
        "__weakref__",
        "bound",
        "code",
        "code_np",
        "done",
        "done_np",
        "explicit",
        "group",
        "leaf",
        "n",
        "name",
        "queues",
        "seg",
        "segments",
    )

    def __init__(self, group: Group, leaf: QueueState | None, queues: dict[str, QueueState]) -> None:
        self.group = group
        group.reader = weakref.ref(self)  # the group's lists stay as they are while this lives
        self.name = group.name
        self.leaf = leaf  # the list's queue (None for the global list and for orphans)
        self.queues = queues
        self.n = n = len(group.infos)
        self.done = bytearray(n)
        self.bound = bytearray(n)
        self.code = bytearray(n)
        self.done_np: U8 = np.frombuffer(self.done, dtype=np.uint8)
        self.code_np: U8 = np.frombuffer(self.code, dtype=np.uint8)
        self.explicit: dict[int, Refusal | None] = {}
        self.seg: npt.NDArray[np.int32] | None = None
        self.segments: list[Segment] = []

    def __len__(self) -> int:
        return self.n

    def job(self, i: int) -> PendingJob:
        """Job ``i`` (a new view each time: its state lives here, so there is no reference
        cycle to leave to the garbage collector)."""
        info = self.group.infos[i]
        leaf = self.leaf if self.leaf is not None else self.queues.get(info.w.queue)
        return PendingJob(self, i, info, leaf)

    def __iter__(self) -> Iterator[PendingJob]:
        return (self.job(i) for i in range(self.n))

    def reason(self, i: int) -> Refusal | None:
        if self.seg is not None:
            s = int(self.seg[i])
            if s >= 0:
                return self.segments[s].reason(self, i)
        return self.explicit.get(i)

    def set_reason(self, i: int, value: Refusal | None) -> None:
        self.explicit[i] = value
        if self.seg is not None:
            self.seg[i] = -1
        self.code[i] = 0 if value is None else CODE_ID[value[0]]

    def mark(self, idx: I64, codes: U8, segment: Segment) -> None:
        """Jobs ``idx`` are done, with ``codes`` and their reasons worded by ``segment``."""
        if self.seg is None:
            self.seg = np.full(self.n, -1, dtype=np.int32)
        self.seg[idx] = len(self.segments)
        self.segments.append(segment)
        self.done_np[idx] = 1
        self.code_np[idx] = codes

    def mark_rest(self, lo: int, code: int, segment: Segment) -> None:
        """Jobs ``lo:`` (none of them done) are done, with ``code`` and their reasons worded
        by ``segment``: :meth:`mark` with slices, for a whole list refused at once."""
        if self.seg is None:
            self.seg = np.full(self.n, -1, dtype=np.int32)
        self.seg[lo:] = len(self.segments)
        self.segments.append(segment)
        self.done_np[lo:] = 1
        self.code_np[lo:] = code

    def token(self, i: int) -> object:
        """Sorts like the job's place in the global job order (across lists)."""
        ranks = self.group.ranks
        return self.group.keys[i] if ranks is None else ranks[i]


class PendingSet:
    """All pending jobs of a cycle: the job lists with at least one job, and the orphans."""

    def __init__(self, index: PendingIndex, queues: dict[str, QueueState]) -> None:
        self.index = index  # read during the cycle only: the next cycle updates it
        self.global_order = index.global_order
        self.shapes = index.shapes
        self.lists: dict[str, LeafJobs] = {
            name: LeafJobs(grp, queues.get(name) if index.grouped else None, queues)
            for name, grp in index.groups.items()
            if grp.infos
        }
        self.orphans = LeafJobs(index.orphans, None, queues)
        self.count = self.orphans.n + sum(lj.n for lj in self.lists.values())

    def bound_count(self) -> int:
        return self.orphans.bound.count(1) + sum(lj.bound.count(1) for lj in self.lists.values())

    def in_order(self) -> Iterator[tuple[LeafJobs, int]]:
        """Every pending job in the global job order (sorted by job-order key)."""
        order = self.global_order
        if order is not None:
            for g, k in order:
                yield (self.orphans if g is None else self.lists[g]), k
            return
        parts = [lj for lj in (*self.lists.values(), self.orphans) if lj.n]
        if len(parts) == 1:
            lj = parts[0]
            for i in range(lj.n):
                yield lj, i
            return
        its = [zip(lj.group.keys, range(lj.n), repeat(lj)) for lj in parts]
        for _, i, lj in heapq.merge(*its, key=itemgetter(0)):
            yield lj, i
