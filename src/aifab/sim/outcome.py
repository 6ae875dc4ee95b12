"""What a replay produces: per-job records, pending intervals and the cluster's timeline."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class JobRecord:
    """What happened to one job; the engine's output, read by :mod:`aifab.sim.metrics`."""

    id: str
    project: str
    gpus: float
    submit: float
    work: float
    first_start: float | None = None
    end: float | None = None
    evictions: int = 0
    lost_gpu_seconds: float = 0.0


@dataclass
class Timeline:
    """Step functions of the cluster, as change lists: at ``t[i]``, project ``p[i]`` changes.

    ``alloc`` is the change of allocated GPUs, ``pend`` the change of pending GPUs (demand
    not running). Capacity changes (node failures) go to ``cap_t``/``cap``.
    """

    t: list[float] = field(default_factory=list)
    p: list[int] = field(default_factory=list)
    alloc: list[float] = field(default_factory=list)
    pend: list[float] = field(default_factory=list)
    cap_t: list[float] = field(default_factory=list)
    cap: list[float] = field(default_factory=list)


@dataclass
class SimOutcome:
    """Everything a run produced: per-job records, pending intervals, the timeline, counters."""

    scenario: str
    policy: str
    projects: list[str]
    deserved: list[float]
    capacity: float
    jobs: list[JobRecord]
    # (job index, queued at, started at): each stretch a job spent pending
    pending_intervals: list[tuple[int, float, float]]
    timeline: Timeline
    counters: dict[str, float]
    wall_seconds: float = 0.0
    # (job index, queued at, replay end) for jobs still waiting when the replay stopped
    open_intervals: list[tuple[int, float, float]] = field(default_factory=list)
