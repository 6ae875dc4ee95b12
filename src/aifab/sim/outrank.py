"""Skip rule 8's book-keeping: could any pending job come before a running one in job order?

Under preemption by job order (Tiresias-style LAS, SRTF) a waiting job evicts a running job of
the same priority that comes later in job order. The keys of running jobs move with the clock
(their attained service grows), so knowing "no pending job comes before any running one" would
naively take every running job's key at every cycle. Instead each running job holds an *upper
bound* of its key, valid until a known time, from the job order's promise
(:data:`~aifab.scheduler.plugins.orders.KEY_STEADY_BELOW`: the attained service below which its
key does not rise):

* a max-heap of the bounds, so that "every running key is below the first pending key" is a
  look at the top; a bound that is not below is made exact (the key now) before it counts;
* a heap of the times the bounds expire (a LAS job reaching its next queue), renewed then.

Each recomputation is the key the scheduler would see: the job's workload with its attained
service refreshed exactly as the simulator refreshes it for a cycle. Stale entries (the job
stopped running, or a newer bound exists) are dropped when they surface.
"""

from __future__ import annotations

import heapq
import math

from aifab.core.workloads import Workload
from aifab.scheduler.keybounds import JobKey, Steady, has_nan
from aifab.sim.state import JobState, with_attained


class _Desc:
    """A key that sorts the other way round (heapq only makes min-heaps)."""

    __slots__ = ("key",)

    def __init__(self, key: tuple[object, ...]) -> None:
        self.key = key

    def __lt__(self, other: _Desc) -> bool:
        return other.key < self.key


def attained_now(job: JobState, now: float) -> Workload:
    """The running job's workload as the simulator hands it to a cycle at ``now``."""
    wl = job.wl
    return with_attained(wl, wl.attained_gpu_seconds + (now - job.run_start) * job.gpus)


class RunningKeys:
    """Upper bounds of the job-order keys of the running preemptible jobs (see module doc)."""

    def __init__(self, jkey: JobKey, steady: Steady) -> None:
        self.jkey = jkey
        self.steady = steady
        self.ok = True  # False once a key could not be compared (NaN): the rule is off
        self._top: list[tuple[_Desc, int, int, float]] = []  # (bound, seq, job idx, computed at)
        self._expiry: list[tuple[float, int, int]] = []  # (expires at, seq, job idx)
        self._version: dict[int, int] = {}  # job idx -> seq of its current entries
        self._jobs: dict[int, JobState] = {}
        self._seq = 0
        self.last_rise = -math.inf  # when a bound last expired (a key may have risen then)

    def start(self, job: JobState, now: float) -> None:
        """The job starts running (preemptible ones only)."""
        self._jobs[job.idx] = job
        self._push(job, now)

    def stop(self, job: JobState) -> None:
        self._jobs.pop(job.idx, None)
        self._version.pop(job.idx, None)

    def _push(self, job: JobState, now: float) -> None:
        wl = attained_now(job, now)
        key = self.jkey(wl)
        if has_nan(key):
            self.ok = False
            return
        self._seq += 1
        seq = self._version[job.idx] = self._seq
        heapq.heappush(self._top, (_Desc(key), seq, job.idx, now))
        limit = self.steady(wl)
        if job.gpus > 0 and limit < math.inf:
            # attained(t) = a + (t - run_start) * gpus stays below the limit until this time;
            # renewed a little early so that rounding never keeps a bound past it.
            until = job.run_start + (limit - job.wl.attained_gpu_seconds) / job.gpus
            until -= 1e-7 * (abs(until) + 1.0)
            heapq.heappush(self._expiry, (until, seq, job.idx))

    def _current(self, idx: int, seq: int) -> bool:
        return self._version.get(idx) == seq

    def advance(self, now: float) -> None:
        """Renew the bounds that expire by ``now`` (their keys may have risen)."""
        expiry = self._expiry
        due: list[int] = []
        while expiry and expiry[0][0] <= now:
            _, seq, idx = heapq.heappop(expiry)
            if self._current(idx, seq):
                due.append(idx)
        for idx in due:
            self._push(self._jobs[idx], now)
        if due:
            self.last_rise = now

    def rose_since(self, t: float, now: float) -> bool:
        """Whether some running job's key may have risen after time ``t`` (up to ``now``)."""
        self.advance(now)
        return self.last_rise > t or not self.ok

    def any_after(self, first_pending: tuple[object, ...], now: float) -> bool:
        """Whether some running job's key at ``now`` is above ``first_pending`` (the smallest
        pending key): only then can a pending job come before a running one."""
        self.advance(now)
        top = self._top
        while top and self.ok:
            bound, seq, idx, at = top[0]
            if not self._current(idx, seq):
                heapq.heappop(top)
                continue
            if not first_pending < bound.key:
                return False  # every running key is at most this bound, none above the first
            if at == now:
                return True  # exact: this job comes after the first pending one
            heapq.heappop(top)
            self._push(self._jobs[idx], now)  # a bound from an earlier time: make it exact
        return not self.ok
