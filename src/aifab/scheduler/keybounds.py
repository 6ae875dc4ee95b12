"""Running workloads' job-order keys, kept from one cycle to the next.

With ``preempt_by_job_order`` (Tiresias-style LAS, SRTF) a pending workload may evict a running
one of equal priority whose job-order key is above its own, so each cycle with an attempt would
take the key of every running workload. A caller that keeps a
:class:`~aifab.scheduler.memo.CycleMemo` has it keep a :class:`KeyBounds` instead: per running
workload (by identity; each entry holds its workload, so an identity is never reused while
kept) the key it had when last computed. The workload is immutable, or a caller's running view
whose attained service only grows (the simulator's), so how that key relates to the key now is
what the job order promises about keys as attained service grows:

* keys that never rise (:data:`~aifab.scheduler.plugins.orders.KEY_NEVER_RISES`: SRTF, FIFO):
  the kept key is an *upper bound*. A question computes the key now only of the workloads
  whose bound is above the pending key, and keeps those whose key now is too;
* keys that never fall and stay put below a limit
  (:data:`~aifab.scheduler.plugins.orders.KEY_NEVER_FALLS` with
  :data:`~aifab.scheduler.plugins.orders.KEY_STEADY_BELOW`: LAS, whose key rises in steps):
  the kept key is exact while the attained service is below the limit. Once per cycle the
  workloads that reached theirs get their key again; then every kept key is the key now.

Either way a question keeps exactly the workloads that asking each one would keep. Keys that
cannot be ordered (a NaN) turn the bounds off for good (the caller then asks each one).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Container, Iterable

from aifab.core.workloads import Workload

JobKey = Callable[[Workload], tuple[object, ...]]
Steady = Callable[[Workload], float]
INF = math.inf


def has_nan(key: tuple[object, ...]) -> bool:
    """NaN is the only float unequal to itself (and it makes keys stop sorting)."""
    for x in key:  # noqa: SIM110  (a loop: no generator on this hot path)
        if x != x and x.__class__ is float:
            return True
    return False


class KeyBounds:
    """Per running workload: (workload, priority, key, its limit, the cycle it was computed in).

    ``steady`` is None for orders whose keys never rise; otherwise keys never fall and
    ``steady(w)`` is the attained service below which the key of ``w`` stays what it is.
    """

    def __init__(self, job_order: str, jkey: JobKey, steady: Steady | None) -> None:
        self.job_order = job_order
        self.jkey = jkey
        self.steady = steady
        self.ok = True
        self._entries: dict[int, tuple[Workload, int, tuple[object, ...], float, int]] = {}
        self._cycle = 0  # a key computed in this cycle is the key now
        self._renewed = -1  # the cycle whose reached limits were renewed (keys that never fall)

    def update(self, gone: Iterable[Workload], new: Iterable[Workload]) -> None:
        """Running workloads that stopped, and ones that started, since the last cycle (one
        call per cycle, before its questions)."""
        self._cycle += 1
        entries = self._entries
        for w in gone:
            entries.pop(id(w), None)
        for w in new:
            self._exact(w)

    def _exact(self, w: Workload) -> tuple[object, ...]:
        key = self.jkey(w)
        if has_nan(key):
            self.ok = False
        limit = INF if self.steady is None else self.steady(w)
        self._entries[id(w)] = (w, w.priority, key, limit, self._cycle)
        return key

    def outranked(
        self, priority: int, order: tuple[object, ...], queues: Container[str]
    ) -> list[Workload] | None:
        """The running workloads of ``queues`` of lower priority, and those of this priority
        whose key now is above ``order``; None if keys cannot be ordered (ask each one)."""
        maybe = self.maybe_outranked(priority, order, queues)
        return None if maybe is None else self.keep_outranked(priority, order, maybe)

    def maybe_outranked(
        self, priority: int, order: tuple[object, ...], queues: Container[str]
    ) -> list[Workload] | None:
        """A superset of :meth:`outranked` (keys above ``order`` by their bounds), made
        without computing any key where bounds are upper bounds; None as there."""
        if not self.ok or has_nan(order):
            return None
        if self.steady is not None and self._renewed != self._cycle:
            due = [e[0] for e in self._entries.values() if e[3] < INF and e[0].attained_gpu_seconds >= e[3]]
            for w in due:
                self._exact(w)
            self._renewed = self._cycle
        out = [
            w
            for w, p, key, _, _ in self._entries.values()
            if w.queue in queues and (p < priority or (p == priority and order < key))
        ]
        return out if self.ok else None

    def keep_outranked(
        self, priority: int, order: tuple[object, ...], maybe: list[Workload]
    ) -> list[Workload] | None:
        """Those of ``maybe`` (from :meth:`maybe_outranked`) whose key now is above ``order``."""
        if self.steady is not None:
            return maybe  # the keys kept are the keys now
        now, entries = self._cycle, self._entries
        out = [
            w for w in maybe if w.priority < priority or entries[id(w)][4] == now or order < self._exact(w)
        ]
        return out if self.ok else None
