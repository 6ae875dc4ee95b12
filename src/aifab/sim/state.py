"""Mutable per-job state of a replay, and the workload refresh of clock-dependent policies."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import fields
from typing import overload

from aifab.core.resources import GPU_MILLI
from aifab.core.snapshot import WorkloadChanges
from aifab.core.workloads import Workload
from aifab.sim.model import SimJob
from aifab.sim.outcome import JobRecord

_FIELDS = tuple(f.name for f in fields(Workload))
_set = object.__setattr__
_STORED = Workload.__dict__["attained_gpu_seconds"]  # the field's slot, under RunningView's property


def with_attained(wl: Workload, attained: float) -> Workload:
    """``replace(wl, attained_gpu_seconds=attained)``, see :func:`changed`."""
    return changed(wl, attained_gpu_seconds=attained)


def changed(wl: Workload, **values: object) -> Workload:
    """``dataclasses.replace(wl, **values)`` without re-running __init__: the simulator only
    changes a workload's phase, placements, times and attained service, which its checks do
    not read, so a valid workload stays valid. The same field values, several times faster."""
    new = object.__new__(Workload)
    for name in _FIELDS:
        _set(new, name, getattr(wl, name))
    for name, value in values.items():
        _set(new, name, value)
    return new


class Clock:
    """The simulator's clock, as the running workloads it hands to cycles read it."""

    __slots__ = ("now",)

    def __init__(self) -> None:
        self.now = 0.0


class RunningView(Workload):
    """A running workload whose attained service is read off the simulator's clock.

    Its stored attained service is as of the run's start; the field reads that plus the
    GPU-seconds since, ``stored + (clock.now - start) * gpus``: exactly what a copy refreshed
    with :func:`with_attained` for the cycle at ``clock.now`` holds. A clock-dependent policy
    reads attained service (through its job order) only during a cycle, while the clock is the
    snapshot's ``now``; so the simulator hands the same view to every cycle of a run instead of
    a refreshed copy of every running workload per cycle, and the scheduler's memo (which keys
    what it derives from running workloads, their placements and queues, by identity) sees no
    change between cycles. Every other field is the workload's own and never changes.
    """

    __slots__ = ("_clock", "_gpus", "_start")
    _clock: Clock
    _gpus: float
    _start: float

    @property
    def attained_gpu_seconds(self) -> float:
        stored: float = _STORED.__get__(self)
        return stored + (self._clock.now - self._start) * self._gpus


def running_view(wl: Workload, clock: Clock, start: float, gpus: float) -> RunningView:
    """``wl`` (running since ``start`` on ``gpus`` GPUs) as a :class:`RunningView`."""
    new = object.__new__(RunningView)
    for name in _FIELDS:
        _STORED_FIELDS[name].__set__(new, getattr(wl, name))
    _set(new, "_clock", clock)
    _set(new, "_start", start)
    _set(new, "_gpus", gpus)
    return new


_STORED_FIELDS = {name: Workload.__dict__[name] for name in _FIELDS}


class JobState:
    """Mutable per-job state; ``wl`` is the immutable Workload the scheduler sees."""

    __slots__ = (
        "epoch",
        "gpus",
        "idx",
        "milli",
        "needs_restore",
        "pidx",
        "queued_at",
        "rec",
        "remaining",
        "resume",
        "run_start",
        "spec",
        "wl",
    )

    def __init__(self, idx: int, spec: SimJob, pidx: int, rec: JobRecord) -> None:
        self.idx = idx
        self.spec = spec
        self.wl = spec.workload
        self.pidx = pidx
        self.rec = rec
        self.milli = spec.workload.gpu_milli_requested
        self.gpus = self.milli / GPU_MILLI
        self.remaining = spec.work
        self.run_start = 0.0
        self.resume = 0.0
        self.epoch = 0
        self.needs_restore = False
        self.queued_at = spec.submit_time


class ActiveWorkloads:
    """Each active job's current workload, in arrival order, and what changed since the last
    cycle's snapshot (handed to the cycle as :class:`~aifab.core.snapshot.WorkloadChanges`, so
    that its memo's work follows the changes, not the backlog)."""

    def __init__(self) -> None:
        self.by_id: dict[str, Workload] = {}
        self._gone: list[Workload] = []  # held until the next snapshot, so ids stay unique
        self._new: dict[int, Workload] = {}  # by identity, since the last snapshot
        self._token: object = None

    def put(self, wl: Workload) -> None:
        """``wl`` becomes its job's workload (keeping the job's place in arrival order)."""
        old = self.by_id.get(wl.id)
        if old is not None:
            self._drop(old)
        self.by_id[wl.id] = wl
        self._new[id(wl)] = wl

    def remove(self, wid: str) -> None:
        self._drop(self.by_id.pop(wid))

    def _drop(self, wl: Workload) -> None:
        if self._new.pop(id(wl), None) is None:  # a workload the last snapshot had
            self._gone.append(wl)

    def snapshot(self) -> tuple[Listing, WorkloadChanges]:
        """This cycle's workloads, and how they differ from the last cycle's."""
        token = object()
        changes = WorkloadChanges(self._token, token, tuple(self._gone), tuple(self._new.values()))
        self._token = token
        self._gone = []
        self._new = {}
        return Listing(self.by_id), changes


class Listing(Sequence[Workload]):
    """The active workloads as one cycle sees them, listed only if the cycle reads them (with
    changes, its memo does not). It may be read until :meth:`close`, called when the cycle is
    over and before the simulator changes anything; afterwards a read it had not made fails."""

    __slots__ = ("_by_id", "_items", "_open")

    def __init__(self, by_id: dict[str, Workload]) -> None:
        self._by_id = by_id
        self._items: tuple[Workload, ...] | None = None
        self._open = True

    def close(self) -> None:
        self._open = False

    def _listed(self) -> tuple[Workload, ...]:
        if self._items is None:
            if not self._open:
                raise RuntimeError("a cycle's workload listing was read after the cycle")
            self._items = tuple(self._by_id.values())
        return self._items

    def __len__(self) -> int:
        if self._items is None and self._open:
            return len(self._by_id)
        return len(self._listed())

    @overload
    def __getitem__(self, i: int) -> Workload: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[Workload]: ...
    def __getitem__(self, i: int | slice) -> Workload | Sequence[Workload]:
        return self._listed()[i]

    def __iter__(self) -> Iterator[Workload]:
        return iter(self._listed())
