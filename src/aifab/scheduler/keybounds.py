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
  Attained service grows by at most the GPUs a workload holds (or asks for, if more) per
  second of the snapshots' ``now``, so each such workload waits in a heap by the earliest
  time it could reach its limit and only those whose time has come are looked at.

Either way a question keeps exactly the workloads that asking each one would keep. Keys that
cannot be ordered (a NaN) turn the bounds off for good (the caller then asks each one).
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections.abc import Callable, Container, Iterable
from itertools import count

from aifab.core.workloads import Workload

JobKey = Callable[[Workload], tuple[object, ...]]
# (workload, priority, key, limit, the cycle the key was computed in)
Entry = tuple[Workload, int, tuple[object, ...], float, int]
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
        self._entries: dict[int, Entry] = {}
        self._cycle = 0  # a key computed in this cycle is the key now
        self._renewed = -1  # the cycle whose reached limits were renewed (keys that never fall)
        self._now = 0.0  # the snapshot time of this cycle
        # (earliest time the entry's workload could reach its limit, tie-break, entry); an item
        # whose entry was replaced or dropped is stale and passed over.
        self._due: list[tuple[float, int, Entry]] = []
        self._seq = count()
        # Per priority, the entries' (key, id of the workload) in order, so that a question
        # reads the run of keys above its own instead of every entry; with the token each
        # workload is filed under.
        self._by_key: dict[int, list[tuple[tuple[object, ...], int]]] = {}
        self._filed: dict[int, tuple[int, tuple[tuple[object, ...], int]]] = {}

    def update(self, gone: Iterable[Workload], new: Iterable[Workload], now: float) -> None:
        """Running workloads that stopped, and ones that started, since the last cycle, whose
        snapshot time is ``now`` (one call per cycle, before its questions)."""
        self._cycle += 1
        self._now = now
        entries = self._entries
        for w in gone:
            if entries.pop(id(w), None) is not None:
                self._unfile(id(w))
        for w in new:
            self._exact(w)
        due = self._due
        if len(due) > 2 * len(entries) + 64:  # mostly stale items: keep the live ones
            self._due = [item for item in due if entries.get(id(item[2][0])) is item[2]]
            heapq.heapify(self._due)

    def _exact(self, w: Workload) -> tuple[object, ...]:
        key = self.jkey(w)
        if has_nan(key):
            self.ok = False
        limit = INF if self.steady is None else self.steady(w)
        entry = self._entries[id(w)] = (w, w.priority, key, limit, self._cycle)
        self._file(id(w), w.priority, key)
        if limit < INF:
            self._wait(entry, w.attained_gpu_seconds)
        return key

    def _file(self, ident: int, priority: int, key: tuple[object, ...]) -> None:
        old = self._filed.get(ident)
        if old is not None:
            if old[0] == priority and (self.steady is None or old[1][0] == key):
                # Unchanged (a LAS key between its steps), or a key that never rises: the one
                # filed stays above the key now, and questions compare the entry's key as well.
                return
            self._unfile(ident)
        token = (key, ident)
        if not self.ok:
            return  # keys may not sort any more; questions are not answered from here
        bisect.insort(self._by_key.setdefault(priority, []), token)
        self._filed[ident] = (priority, token)

    def _unfile(self, ident: int) -> None:
        got = self._filed.pop(ident, None)
        if got is None:
            return
        lst = self._by_key[got[0]]
        at = bisect.bisect_left(lst, got[1])
        assert lst[at] == got[1]
        del lst[at]

    def _wait(self, entry: Entry, attained: float) -> None:
        """Queue ``entry`` by the earliest time its workload could reach its limit (never, if
        it asks for and holds no GPU); a little early, so that rounding never makes it late."""
        w, limit = entry[0], entry[3]
        held = sum(p.gpu_milli * len(p.devices) for p in w.placements)
        rate = max(held, w.gpu_milli_requested) / 1000  # GPU-seconds per second, at most
        if rate > 0:
            at = self._now + (limit - attained) / rate * (1 - 1e-9) - 1e-6
            heapq.heappush(self._due, (at, next(self._seq), entry))

    def _renew(self) -> None:
        """Compute the key again of every workload that reached its limit (see the module doc)."""
        due, entries, now = self._due, self._entries, self._now
        not_yet: list[tuple[Entry, float]] = []
        while due and due[0][0] <= now:
            _, _, entry = heapq.heappop(due)
            w = entry[0]
            if entries.get(id(w)) is not entry:
                continue  # stale: the workload stopped, or its key was computed again since
            attained = w.attained_gpu_seconds
            if attained >= entry[3]:
                self._exact(w)  # queued again by its new limit, which lies above
            else:
                not_yet.append((entry, attained))
        # Queued again only now: one whose next time is still not after now (a hair below its
        # limit) is looked at again next cycle, not again and again in this one.
        for entry, attained in not_yet:
            self._wait(entry, attained)

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
            self._renew()
            self._renewed = self._cycle
        entries = self._entries
        out: list[Workload] = []
        # Every entry of a lower priority, and those of this one whose key is above ``order``
        # (in another order than the entries', which no caller depends on: victims are sorted
        # by keys that end with the unique workload id).
        for p, lst in self._by_key.items():
            if p < priority:
                run = lst
            elif p == priority:
                run = lst[bisect.bisect_right(lst, (order, INF)) :]  # keys equal to it are not above
                if self.steady is None:  # filed keys may lie above the entries' (see _file)
                    for _, ident in run:
                        w, _, key, _, _ = entries[ident]
                        if w.queue in queues and order < key:
                            out.append(w)
                    continue
            else:
                continue
            for _, ident in run:
                w = entries[ident][0]
                if w.queue in queues:
                    out.append(w)
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
