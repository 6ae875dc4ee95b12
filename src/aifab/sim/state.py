"""Mutable per-job state of a replay, and the workload refresh of clock-dependent policies."""

from __future__ import annotations

from dataclasses import fields

from aifab.core.resources import GPU_MILLI
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
