"""Give every pending workload that did not start a reason a user can act on."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from aifab.core.decisions import Evict, PendingReason, ReasonCode
from aifab.core.resources import format_gpus
from aifab.scheduler.checks import gpus, lenders
from aifab.scheduler.config import Fairness
from aifab.scheduler.context import CAPACITY_CODES, Context
from aifab.scheduler.jobs import PendingSet
from aifab.scheduler.session import QueueState


def explain(ctx: Context, unique_ids: bool = True) -> Reasons:
    """Every waiting workload's reason, worded when first read (the simulator never reads them).

    The wording reads only this cycle's final state, which nothing changes after the cycle.
    With ``unique_ids`` the count is known without wording anything; otherwise (workload ids
    repeat) the reasons are worded now and counted.
    """
    rebound = {b.workload_id for b in ctx.sess.binds}
    evicted = [ev for ev in ctx.sess.evictions if ev.workload_id not in rebound]
    jobs = ctx.sess.jobs
    # Only what the wording reads (not the session: it is freed when the cycle ends).
    quota_view = ctx.config.fairness is Fairness.FAIR_SHARE
    queues, leaves = ctx.sess.queues, ctx.leaves
    reasons = Reasons(lambda: _words(jobs, queues, leaves, quota_view, evicted))
    if unique_ids:
        reasons.size = jobs.count - jobs.bound_count() + len({ev.workload_id for ev in evicted})
    else:
        reasons.load()
    return reasons


def _words(
    jobs: PendingSet,
    queues: dict[str, QueueState],
    leaves: list[QueueState],
    quota_view: bool,
    evicted: list[Evict],
) -> dict[str, tuple[ReasonCode, str]]:
    out: dict[str, tuple[ReasonCode, str]] = {}
    views: dict[tuple[str, int], tuple[ReasonCode, str] | None] = {}
    worded: dict[tuple[object, str], tuple[ReasonCode, str]] = {}
    for lj, i in jobs.in_order():
        if lj.bound[i]:
            continue
        info = lj.group.infos[i]
        reason = lj.reason(i) or (ReasonCode.INSUFFICIENT_CAPACITY, "not tried this cycle; waiting for room")
        leaf = lj.leaf if lj.leaf is not None else queues.get(info.w.queue)
        if quota_view and reason[0] in CAPACITY_CODES and leaf is not None:
            key = (leaf.name, info.req[0])
            if key not in views:
                views[key] = _quota_view(leaves, leaf, info.req[0])
            view = views[key]
            if view is not None:
                wkey = (key, reason[1])
                got = worded.get(wkey)
                if got is None:
                    got = worded[wkey] = (view[0], f"{view[1]} ({reason[1]})")
                reason = got
        out[info.w.id] = reason
    # Workloads evicted this cycle wait again from the next one: say why (moved ones are re-bound).
    for ev in evicted:
        out[ev.workload_id] = (ReasonCode.EVICTED_THIS_CYCLE, f"evicted this cycle: {ev.reason}")
    return out


class Reasons(Mapping[str, PendingReason]):
    """Pending reasons by workload id, worded on first read and each PendingReason made when
    first read: a cycle may leave tens of thousands waiting and a caller often reads only a few
    of them (the simulator none)."""

    __slots__ = ("_made", "_make", "_raw", "size")

    def __init__(self, make: Callable[[], dict[str, tuple[ReasonCode, str]]]) -> None:
        self._make: Callable[[], dict[str, tuple[ReasonCode, str]]] | None = make
        self._raw: dict[str, tuple[ReasonCode, str]] = {}
        self._made: dict[str, PendingReason] = {}
        self.size = -1

    def load(self) -> dict[str, tuple[ReasonCode, str]]:
        if self._make is not None:
            self._raw = self._make()
            self._make = None  # drops the cycle's state
            self.size = len(self._raw)
        return self._raw

    def __getitem__(self, wid: str) -> PendingReason:
        got = self._made.get(wid)
        if got is None:
            code, message = self.load()[wid]
            got = self._made[wid] = PendingReason(wid, code, message)
        return got

    def __iter__(self) -> Iterator[str]:
        return iter(self.load())

    def __len__(self) -> int:
        return self.size if self.size >= 0 else len(self.load())

    def __contains__(self, wid: object) -> bool:
        return wid in self.load()

    def __repr__(self) -> str:
        return f"Reasons({dict(self.items())!r})"

    def __reduce__(self) -> tuple[object, ...]:
        return (_loaded, (self.load(),))


def _loaded(raw: dict[str, tuple[ReasonCode, str]]) -> Reasons:
    out = Reasons(lambda: raw)
    out.load()
    return out


def _quota_view(leaves: list[QueueState], leaf: QueueState, need: int) -> tuple[ReasonCode, str] | None:
    """Turn "no room" into what the queue can do about it: wait for reclaim, or wait to borrow."""
    used, fair, deserved = leaf.allocated[0], leaf.fair[0], leaf.deserved[0]
    if used >= fair and need > 0 and (used > 0 or fair > 0):
        return ReasonCode.OVER_FAIR_SHARE, (
            f"project {leaf.name} uses {gpus(used)} and its fair share is {gpus(fair)}; "
            f"beyond that it can only borrow idle GPUs, and none fit"
        )
    lent = lenders(leaves, leaf)
    if not lent:
        return None
    quota = deserved if used < deserved else fair
    owed = min(quota - used, sum(a for a, _ in lent))
    names = ", ".join(n for _, n in lent[:3]) + (" and others" if len(lent) > 3 else "")
    return ReasonCode.WAITING_FOR_RECLAIM, (
        f"waiting for quota: {format_gpus(max(owed, 0))} of {format_gpus(quota)} "
        f"{'deserved' if quota == deserved else 'fair-share'} GPUs are lent to project {names} "
        f"and will be reclaimed"
    )
