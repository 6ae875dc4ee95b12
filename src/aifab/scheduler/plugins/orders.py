"""Ordering plugins: which queue allocates next, which job goes first, which victim yields first.

Each plugin is a key function (smaller key = first) registered under a name that
:class:`~aifab.scheduler.config.SchedulerConfig` refers to. Keys always end with a unique id
so that orders are total and the cycle is deterministic.
"""

from __future__ import annotations

from collections.abc import Callable

from aifab.core.errors import ValidationError
from aifab.core.workloads import TaskRequest, Workload
from aifab.scheduler.keybounds import JobKey
from aifab.scheduler.session import QueueState, RunJob

QueueKey = Callable[[QueueState], tuple[object, ...]]
VictimKey = Callable[[RunJob], tuple[object, ...]]

INF = float("inf")


def drf_ratio(qs: QueueState) -> float:
    """Dominant share of the queue's fair share in use: max over resources of allocated / fair."""
    worst = 0.0
    for a, f in zip(qs.allocated, qs.fair, strict=True):
        if f > 0:
            r = a / f
        elif a > 0:
            r = INF
        else:
            continue
        if r > worst:
            worst = r
    return worst


QUEUE_ORDERS: dict[str, QueueKey] = {
    # Furthest below fair share first; queue priority and name break ties.
    "fair_share": lambda qs: (drf_ratio(qs), -qs.priority, qs.name),
    # Strict queue priority, then fairness.
    "priority": lambda qs: (-qs.priority, drf_ratio(qs), qs.name),
    "name": lambda qs: (qs.name,),
}


# Requested milli-GPUs per task tuple (by identity; each entry holds its tuple, so an identity
# is never reused while it is kept): job orders are asked for the keys of every running
# workload of a cycle, and the sum over tasks is most of the cost of an SRTF key.
_MILLI: dict[int, tuple[tuple[TaskRequest, ...], int]] = {}
_MILLI_MAX = 100_000


def _gpus(w: Workload) -> float:
    """max(1, requested GPUs), written out (``max`` keeps its first argument on ties and NaN)."""
    tasks = w.tasks
    got = _MILLI.get(id(tasks))
    if got is None or got[0] is not tasks:
        if len(_MILLI) >= _MILLI_MAX:
            _MILLI.clear()
        got = _MILLI[id(tasks)] = (tasks, w.gpu_milli_requested)
    g = got[1] / 1000
    return g if g > 1.0 else 1.0


def _remaining(w: Workload) -> float:
    """Oracle remaining runtime: expected duration minus the runtime already attained, at
    least 0 (as ``max(0.0, ...)``, written out: this runs for every running workload)."""
    expected = w.expected_duration
    if expected is None:
        return INF
    left = expected - w.attained_gpu_seconds / _gpus(w)
    return left if left > 0.0 else 0.0


# Tiresias' discretised two-dimensional LAS: attained GPU-seconds fall into a few priority
# queues; FIFO inside a queue. Discretising is what keeps LAS from thrashing: a job only
# yields to one in a strictly lower queue, and queues only ever move up with service, so two
# jobs cannot keep preempting each other. Thresholds: 1, 10 and 100 GPU-hours.
LAS_QUEUE_THRESHOLDS: tuple[float, ...] = (3600.0, 36000.0, 360000.0)


def las_queue(attained_gpu_seconds: float) -> int:
    """How many thresholds the attained service has reached (0 for NaN)."""
    q = 0
    for t in LAS_QUEUE_THRESHOLDS:
        if attained_gpu_seconds >= t:
            q += 1
    return q


JOB_ORDERS: dict[str, JobKey] = {
    "priority_fifo": lambda w: (-w.priority, w.submit_time, w.id),
    "fifo": lambda w: (w.submit_time, w.id),
    # Tiresias-style discretised least attained service (GPU-seconds), FIFO inside a queue.
    "las": lambda w: (las_queue(w.attained_gpu_seconds), w.submit_time, w.id),
    # Priority first, then discretised LAS: a requeued workload that already had hours of
    # service waits behind its project's fresh ones of the same priority (short jobs are
    # not stuck behind long ones coming back from preemption); FIFO otherwise.
    "priority_las": lambda w: (-w.priority, las_queue(w.attained_gpu_seconds), w.submit_time, w.id),
    # Shortest remaining time first (needs the expected_duration oracle).
    "srtf": lambda w: (_remaining(w), w.submit_time, w.id),
}


# Orders whose key of a workload moves while it runs (attained service grows). A pending
# workload's key never moves (it attains nothing while waiting), so only a cycle that reads
# the keys of running workloads (preemption by job order) depends on the clock through them.
KEYS_MOVE_WHILE_RUNNING: frozenset[str] = frozenset({"las", "priority_las", "srtf"})


def _next_las_step(w: Workload) -> float:
    return next((t for t in LAS_QUEUE_THRESHOLDS if t > w.attained_gpu_seconds), INF)


# For a caller that follows running workloads over time (the simulator): per job order, the
# attained GPU-seconds below which a workload's key stays at most what it is now while its
# attained service grows and nothing else about it changes (INF: it never rises). An order
# missing here makes no such promise.
KEY_STEADY_BELOW: dict[str, Callable[[Workload], float]] = {
    "priority_fifo": lambda w: INF,  # does not read attained service
    "fifo": lambda w: INF,
    "las": _next_las_step,  # constant inside a LAS queue, rises at the next threshold
    "priority_las": _next_las_step,
    "srtf": lambda w: INF,  # remaining time only falls as service is attained
}


# The orders whose key of a workload never rises as its attained service grows (KEY_STEADY_BELOW
# is INF for every workload): a key computed once stays an upper bound of the key later.
KEY_NEVER_RISES: frozenset[str] = frozenset({"priority_fifo", "fifo", "srtf"})
# The orders whose key never falls as attained service grows (it stays put below the
# KEY_STEADY_BELOW limit, then rises): a key computed once stays a lower bound of the key later.
KEY_NEVER_FALLS: frozenset[str] = frozenset({"priority_fifo", "fifo", "las", "priority_las"})


def _start(job: RunJob) -> float:
    return job.w.start_time if job.w.start_time is not None else 0.0


VICTIM_ORDERS: dict[str, VictimKey] = {
    # Least work lost since the last checkpoint, then lower priority, then most recent start.
    "cost_aware": lambda j: (j.lost, j.w.priority, -_start(j), j.w.id),
    "priority": lambda j: (j.w.priority, -_start(j), j.w.id),
    "newest": lambda j: (-_start(j), j.w.id),
}


def _lookup(
    table: dict[str, Callable[..., tuple[object, ...]]], name: str, what: str
) -> Callable[..., tuple[object, ...]]:
    try:
        return table[name]
    except KeyError:
        known = ", ".join(sorted(table))
        raise ValidationError(f"unknown {what} {name!r}; known: {known}", field=what) from None


def queue_order(name: str) -> QueueKey:
    return _lookup(QUEUE_ORDERS, name, "queue_order")


def job_order(name: str) -> JobKey:
    return _lookup(JOB_ORDERS, name, "job_order")


def victim_order(name: str) -> VictimKey:
    return _lookup(VICTIM_ORDERS, name, "victim_order")
