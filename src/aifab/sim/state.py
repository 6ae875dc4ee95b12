"""Mutable per-job state of a replay, and the workload refresh of clock-dependent policies."""

from __future__ import annotations

from dataclasses import fields

from aifab.core.resources import GPU_MILLI
from aifab.core.workloads import Workload
from aifab.sim.model import SimJob
from aifab.sim.outcome import JobRecord

_FIELDS = tuple(f.name for f in fields(Workload))
_set = object.__setattr__


def with_attained(wl: Workload, attained: float) -> Workload:
    """``replace(wl, attained_gpu_seconds=attained)`` without re-running __init__ (a valid
    workload stays valid): the same field values, twice as fast, for every running workload
    of every cycle of a clock-dependent policy."""
    new = object.__new__(Workload)
    for name in _FIELDS:
        _set(new, name, getattr(wl, name))
    _set(new, "attained_gpu_seconds", attained)
    return new


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
