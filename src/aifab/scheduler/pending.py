"""Pending workloads indexed for a cycle: job lists in job order, as arrays, kept between cycles.

Each job list (one per leaf queue, or a single global one when fairness is ``none``) holds its
pending workloads sorted by the job-order key, with the numbers the actions test (requested
GPU/CPU/memory, biggest whole-GPU task, priority, preemptible, shape) also as numpy arrays, so
that an action can find the next job worth trying among thousands without a Python step per job.

A :class:`PendingIndex` is what a caller may keep from one cycle to the next (inside a
:class:`~aifab.scheduler.memo.CycleMemo`): a workload waits through thousands of cycles
unchanged, and workloads are immutable (a changed one is a new object). Entries are keyed by
object identity and each holds its workload (so an id is never reused while it is kept), and
the index is only ever updated into exactly the lists a from-scratch build would make:
job-order keys end with the workload id, so with unique ids the sorted order is a total order
that does not depend on the order of insertion. Where that does not hold (duplicate ids,
incomparable keys such as NaN) the index is rebuilt from scratch with the original stable sort
every cycle. A group's lists are changed in place only when no cycle still reads them (see
:meth:`Group.spliced`); otherwise an update makes new ones, so a cycle's lazily worded pending
reasons keep reading the lists that cycle saw.
"""

from __future__ import annotations

import weakref
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from itertools import compress, count, pairwise, repeat
from operator import attrgetter, is_not
from typing import Any

import numpy as np
import numpy.typing as npt

from aifab.core.queues import QueueTree
from aifab.core.workloads import GpuRequestKind, Workload
from aifab.scheduler.keybounds import JobKey, has_nan
from aifab.scheduler.session import TaskSpec, Vec

I64 = npt.NDArray[np.int64]
BoolArr = npt.NDArray[np.bool_]
SpecCache = dict[object, tuple[list[TaskSpec], Vec, object, int]]
_SPEC_CACHE_MAX = 4096
# The infos of recently seen pending workloads by (job order, memory hint), then by identity,
# each entry holding its workload: a caller without a memo that passes the same objects again (a
# benchmark, a control plane that keeps its objects) gets them back.
_KNOWN: dict[tuple[str, int], dict[int, JobInfo]] = {}
_KNOWN_MAX = 200_000  # infos kept per (job order, memory hint)


class JobInfo:
    """What a pending workload flattens to; immutable once made."""

    __slots__ = ("biggest", "col", "key", "nan", "req", "rid", "shape", "specs", "w")

    def __init__(self, w: Workload, key: tuple[object, ...], cache: SpecCache, hint: int) -> None:
        self.w = w
        self.key = key
        self.nan = has_nan(key)  # NaN makes sorting depend on input order
        self.specs, self.req, tasks_key, self.biggest = _static(w, cache, hint)
        req = self.req
        # Group.data's rows except the shape id (which is per index), made once per workload.
        self.col = (req[0], req[1], req[2], self.biggest, w.priority, 0 if w.preemptible else 1)
        models, selector, topo = w.gpu_models, w.node_selector, w.topology
        # What decides whether a placement can succeed (not the queue, not the id).
        self.shape: object = (
            tasks_key,
            w.min_available or len(w.tasks),
            w.node_pool,
            tuple(sorted(models)) if models else (),
            tuple(sorted(selector.items())) if selector else (),
            None if topo is None else (topo.level, topo.mode.value),
        )
        self.rid = _row_id(self.col, self.shape)


# (col, shape) -> a number that no other (col, shape) ever gets, so that building a job list
# looks at one info per distinct row instead of every info. Numbers are never reused: when
# the table is cleared (to bound it), a row seen again just gets a new one.
_ROW_IDS: dict[tuple[object, object], int] = {}
_ROW_IDS_MAX = 65_536
_next_row_id = count()


def _row_id(col: tuple[int, ...], shape: object) -> int:
    key = (col, shape)
    got = _ROW_IDS.get(key)
    if got is None:
        if len(_ROW_IDS) >= _ROW_IDS_MAX:
            _ROW_IDS.clear()
        got = _ROW_IDS[key] = next(_next_row_id)
    return got


class _Missing:
    """Stands for an info not known yet: its ``w`` is no workload."""

    w = None


_MISSING: Any = _Missing()


def _static(
    w: Workload, cache: SpecCache, device_memory_hint: int
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
        if len(cache) >= _SPEC_CACHE_MAX:
            cache.clear()
        cache[key] = got
    return got


_G, _C, _M, _BIG, _PRIO, _SID, _NPRE = range(7)  # rows of Group.data


_OWN_ROWS = [_G, _C, _M, _BIG, _PRIO, _NPRE]  # JobInfo.col's, in its order
_RID, _KEY, _NAN, _W = (attrgetter(a) for a in ("rid", "key", "nan", "w"))


def _column(info: JobInfo, sid: int) -> tuple[int, int, int, int, int, int, int]:
    g, c, m, big, prio, npre = info.col
    return (g, c, m, big, prio, sid, npre)


# At most this many changes are made to a group's lists in place (each is a memmove of the
# list); more make new lists in one pass.
IN_PLACE_MAX = 16


class Group:
    """One job list in job order: the infos and their numbers as one array whose rows are:
    requested GPU milli, CPU milli and memory MiB, biggest whole-GPU task, priority, shape id,
    non-preemptible (``g``, ``c``, ... are views of the rows).

    ``reader`` refers weakly to what reads the group in a cycle (a cycle's job list, which a
    cycle result keeps until its pending reasons are worded); see :meth:`spliced`."""

    __slots__ = (
        "all_pre",
        "big",
        "c",
        "data",
        "g",
        "infos",
        "keys",
        "m",
        "max_prio",
        "min_gpu",
        "name",
        "npre",
        "prio",
        "ranks",
        "reader",
        "sid",
    )

    def __init__(
        self,
        name: str,
        infos: list[JobInfo],
        sid_of: Callable[[object], int],
        ranks: list[int] | None = None,
        keys: list[tuple[object, ...]] | None = None,
        rids: list[int] | None = None,
    ) -> None:
        """``keys`` and ``rids``, when given, are the infos' keys and row ids (a caller that
        has them spares a pass over many objects)."""
        self.name = name
        # Position in the global job order, only when keys may tie (the stable-sort fallback).
        self.ranks = ranks
        self.reader: weakref.ref[object] | None = None
        n = len(infos)
        data = np.zeros((7, n), dtype=np.int64)
        if infos:
            # Few distinct rows among many infos: each distinct row is converted once.
            row_ids = np.fromiter(map(_RID, infos) if rids is None else rids, dtype=np.int64, count=n)
            _, first, which = np.unique(row_ids, return_index=True, return_inverse=True)
            reps = [infos[k] for k in first.tolist()]
            own = np.asarray([i.col for i in reps], dtype=np.int64).reshape(-1, 6)
            sids = np.asarray([sid_of(i.shape) for i in reps], dtype=np.int64)
            data[_OWN_ROWS] = own[which].T
            data[_SID] = sids[which]
        self._set(infos, list(map(_KEY, infos)) if keys is None else keys, data)

    def _set(self, infos: list[JobInfo], keys: list[tuple[object, ...]], data: I64) -> None:
        self.infos = infos
        self.keys = keys
        self.data = data
        self.g: I64 = data[_G]
        self.c: I64 = data[_C]
        self.m: I64 = data[_M]
        self.big: I64 = data[_BIG]
        self.prio: I64 = data[_PRIO]
        self.sid: I64 = data[_SID]
        self.npre: BoolArr = data[_NPRE] != 0
        self.all_pre = not bool(self.npre.any())
        n = len(infos)
        self.min_gpu = int(self.g.min()) if n else 0
        self.max_prio = int(self.prio.max()) if n else 0

    def spliced(self, removed: Sequence[int], added: list[JobInfo], sid_of: Callable[[object], int]) -> Group:
        """The group without the infos at positions ``removed`` (sorted) and with ``added``
        (sorted by key, keys not present) inserted where they sort.

        When no cycle reads this group any more and the change is small, its lists are
        changed in place (a long list changed by a few entries each cycle is not copied and
        freed each cycle) and it is returned; otherwise a new group is."""
        reader = self.reader
        if (reader is None or reader() is None) and len(removed) + len(added) <= IN_PLACE_MAX:
            return self._spliced_in_place(removed, added, sid_of)
        new = Group.__new__(Group)
        new.name = self.name
        new.ranks = None
        new.reader = None
        keys = self.keys
        # One pass over the old list: each added item goes before the first old key not below
        # its own (what inserting into the list without the removed items would do, as keys
        # are distinct), each removed position is passed over.
        cuts = sorted(
            [(bisect_left(keys, a.key), -1, k) for k, a in enumerate(added)] + [(p, 0, -1) for p in removed]
        )
        cols = np.asarray([_column(a, sid_of(a.shape)) for a in added], dtype=np.int64).reshape(-1, 7).T
        data = np.empty((7, len(keys) - len(removed) + len(added)), dtype=np.int64)
        new_keys: list[tuple[object, ...]] = []
        new_infos: list[JobInfo] = []
        old, infos = self.data, self.infos
        prev = at = 0
        for p, kind, k in cuts:
            if p > prev:
                new_keys += keys[prev:p]
                new_infos += infos[prev:p]
                data[:, at : at + p - prev] = old[:, prev:p]
                at += p - prev
                prev = p
            if kind < 0:
                new_keys.append(added[k].key)
                new_infos.append(added[k])
                data[:, at] = cols[:, k]
                at += 1
            else:
                prev = p + 1
        new_keys += keys[prev:]
        new_infos += infos[prev:]
        data[:, at:] = old[:, prev:]
        new._set(new_infos, new_keys, data)
        return new

    def _spliced_in_place(
        self, removed: Sequence[int], added: list[JobInfo], sid_of: Callable[[object], int]
    ) -> Group:
        keys, infos = self.keys, self.infos
        for p in reversed(removed):
            del keys[p]
            del infos[p]
        at = []
        for a in added:  # in key order: each goes after the ones before it
            p = bisect_left(keys, a.key)
            keys.insert(p, a.key)
            infos.insert(p, a)
            at.append(p)
        # The array is made anew (numpy copies without touching reference counts): the kept
        # columns in order around the added ones, written where their infos now are.
        old = self.data
        data = np.empty((old.shape[0], len(keys)), dtype=np.int64)
        if added:
            data[:, at] = np.asarray([_column(a, sid_of(a.shape)) for a in added], dtype=np.int64).T
        # A few slice copies (the runs between changes), not a mask over the whole list.
        _copy_kept(old, _runs(removed, old.shape[1]), data, _runs(at, len(keys)))
        self.ranks = None
        self._set(infos, keys, data)
        return self


def _runs(cut: Sequence[int], total: int) -> list[tuple[int, int]]:
    """The [start, end) runs of ``range(total)`` between the sorted positions ``cut``."""
    out = []
    prev = 0
    for p in cut:
        if p > prev:
            out.append((prev, p))
        prev = p + 1
    if total > prev:
        out.append((prev, total))
    return out


def _copy_kept(old: I64, src: list[tuple[int, int]], data: I64, dst: list[tuple[int, int]]) -> None:
    """Copy the columns of ``old`` in runs ``src``, in order, into the columns of ``data`` in
    runs ``dst`` (both cover the same number of columns)."""
    si = di = 0
    s_at, s_end = src[0] if src else (0, 0)
    d_at, d_end = dst[0] if dst else (0, 0)
    while si < len(src) and di < len(dst):
        n = min(s_end - s_at, d_end - d_at)
        data[:, d_at : d_at + n] = old[:, s_at : s_at + n]
        s_at += n
        d_at += n
        if s_at == s_end:
            si += 1
            if si < len(src):
                s_at, s_end = src[si]
        if d_at == d_end:
            di += 1
            if di < len(dst):
                d_at, d_end = dst[di]


class PendingIndex:
    """The pending workloads of the last snapshot, grouped into job lists (see module doc).

    ``sums`` holds each leaf queue's pending requests (what fair shares add to its usage);
    ``orphans`` the pending workloads whose queue is unknown or not a leaf, in job order.
    """

    def __init__(self, tree: QueueTree, job_order: str, jkey: JobKey, grouped: bool, hint: int) -> None:
        self.tree = tree
        self.job_order = job_order
        self.jkey = jkey
        self.grouped = grouped
        self.hint = hint
        self.leaves = frozenset(n for n in (q.name for q in tree) if tree.is_leaf(n))
        self.infos: dict[int, JobInfo] = {}  # id(workload) -> info
        self.groups: dict[str, Group] = {}
        self.orphans: Group = Group("", [], self.sid)
        self.sums: dict[str, list[int]] = {}
        self.shapes: dict[object, int] = {}  # shape -> small integer, for array masks
        self.spec_cache: SpecCache = {}
        self.exact = True  # False: keys may tie or not compare; rebuilt from scratch each cycle
        self.global_order: list[tuple[str | None, int]] | None = None  # only when not exact

    def matches(self, tree: QueueTree, job_order: str, grouped: bool, hint: int) -> bool:
        return (
            self.tree is tree
            and self.job_order == job_order
            and self.grouped == grouped
            and self.hint == hint
            and self.exact
        )

    def sid(self, shape: object) -> int:
        got = self.shapes.get(shape)
        if got is None:
            got = self.shapes[shape] = len(self.shapes)
        return got

    def group_of(self, w: Workload) -> str | None:
        """The job list of a workload (None: an orphan)."""
        if w.queue not in self.leaves:
            return None
        return w.queue if self.grouped else ""

    def _known(self) -> dict[int, JobInfo]:
        known = _KNOWN.get((self.job_order, self.hint))
        if known is None:
            known = _KNOWN[(self.job_order, self.hint)] = {}
        return known

    def _info(self, w: Workload, known: dict[int, JobInfo]) -> JobInfo:
        got = known.get(id(w))
        if got is not None and got.w is w:
            return got
        if len(known) >= _KNOWN_MAX:
            known.clear()
        info = known[id(w)] = JobInfo(w, self.jkey(w), self.spec_cache, self.hint)
        return info

    def _sum(self, info: JobInfo, sign: int) -> None:
        q = info.w.queue
        if q in self.leaves:
            s = self.sums.setdefault(q, [0, 0, 0])
            s[0] += sign * info.req[0]
            s[1] += sign * info.req[1]
            s[2] += sign * info.req[2]

    def build(self, pending: Iterable[Workload]) -> None:
        """From scratch: the original stable sort of every pending workload by job-order key."""
        old, known = self.infos, self._known()
        ws = list(pending)
        ids = list(map(id, ws))
        # Map-based passes: this runs over every pending workload of a cycle without a memo.
        listed: list[JobInfo] = list(map(known.get, ids, repeat(_MISSING)))
        for k in list(compress(count(), map(is_not, map(_W, listed), ws))):
            w = ws[k]
            got = old.get(id(w))
            listed[k] = got if got is not None and got.w is w else self._info(w, known)
        infos = self.infos = dict(zip(ids, listed, strict=True))
        listed.sort(key=_KEY)  # stable: ties keep snapshot order, as the original
        keys = list(map(_KEY, listed))
        self.exact = len(infos) == len(listed) and not any(map(_NAN, listed))
        if self.exact:
            self.exact = all(a < b for a, b in pairwise(keys))
        # Each list's infos, keys and row ids in one pass (each info is read once).
        members: dict[str | None, tuple[list[JobInfo], list[tuple[object, ...]], list[int]]] = {}
        leaves, grouped = self.leaves, self.grouped
        for info, key in zip(listed, keys, strict=True):
            q = info.w.queue
            g = (q if grouped else "") if q in leaves else None
            lists = members.get(g)
            if lists is None:
                members[g] = ([info], [key], [info.rid])
            else:
                lists[0].append(info)
                lists[1].append(key)
                lists[2].append(info.rid)
        ranks = self._ranks(listed) if not self.exact else {}
        self.groups = {
            g: Group(g, lst, self.sid, ranks.get(g), lk, lr)
            for g, (lst, lk, lr) in members.items()
            if g is not None
        }
        lst, lk, lr = members.get(None, ([], [], []))
        self.orphans = Group("", lst, self.sid, ranks.get(None) if ranks else None, lk, lr)
        self.sums = {}
        if grouped:
            # A leaf's job list holds exactly its pending workloads: sum its request rows.
            for g, grp in self.groups.items():
                self.sums[g] = [int(v) for v in grp.data[:3].sum(axis=1)]
        else:
            for info in members.get("", ((),))[0]:
                self._sum(info, 1)
        self.global_order = None
        if not self.exact:
            pos: dict[str | None, int] = {}
            order: list[tuple[str | None, int]] = []
            for info in listed:
                g = self.group_of(info.w)
                k = pos.get(g, 0)
                pos[g] = k + 1
                order.append((g, k))
            self.global_order = order

    def _ranks(self, listed: list[JobInfo]) -> dict[str | None, list[int]]:
        """Each job list's positions in the global job order (kept only when keys may tie)."""
        ranks: dict[str | None, list[int]] = {}
        for r, info in enumerate(listed):
            ranks.setdefault(self.group_of(info.w), []).append(r)
        return ranks

    def update(self, removed: Iterable[JobInfo], added: Iterable[Workload]) -> bool:
        """Apply a change of the pending set; False if that cannot be done exactly (rebuild)."""
        rm: dict[str | None, list[int]] = {}
        for info in removed:
            g = self.group_of(info.w)
            grp = self.groups.get(g) if g is not None else self.orphans
            if grp is None:
                return False
            p = bisect_left(grp.keys, info.key)
            if p >= len(grp.keys) or grp.infos[p] is not info:
                return False
            rm.setdefault(g, []).append(p)
            del self.infos[id(info.w)]
            self._sum(info, -1)
        add: dict[str | None, list[JobInfo]] = {}
        known = self._known()
        for w in added:
            info = self._info(w, known)
            if info.nan:
                return False
            self.infos[id(w)] = info
            add.setdefault(self.group_of(w), []).append(info)
            self._sum(info, 1)
        for g in set(rm) | set(add):
            grp = self.groups.get(g) if g is not None else self.orphans
            new_infos = add.get(g, [])
            new_infos.sort(key=lambda i: i.key)
            if any(a.key == b.key for a, b in pairwise(new_infos)):
                return False
            base = grp if grp is not None else Group(g or "", [], self.sid)
            positions = sorted(rm.get(g, []))
            if len(set(positions)) != len(positions):
                return False
            got = base.spliced(positions, new_infos, self.sid)
            # A new key equal to a kept one: ids repeat, the order would depend on arrival.
            for a in new_infos:
                p = bisect_left(got.keys, a.key)
                if (p > 0 and got.keys[p - 1] == a.key) or (
                    p + 1 < len(got.keys) and got.keys[p + 1] == a.key
                ):
                    return False
            if g is None:
                self.orphans = got
            elif got.infos:
                self.groups[g] = got
            else:
                self.groups.pop(g, None)
        return True
