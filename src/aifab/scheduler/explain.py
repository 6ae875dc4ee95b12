"""Give every pending workload that did not start a reason a user can act on."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from aifab.core.decisions import PendingReason, ReasonCode
from aifab.core.resources import format_gpus
from aifab.scheduler.checks import gpus, lenders
from aifab.scheduler.config import Fairness
from aifab.scheduler.context import CAPACITY_CODES, Context
from aifab.scheduler.session import QueueState


def explain(ctx: Context) -> Mapping[str, PendingReason]:
    out: dict[str, tuple[ReasonCode, str]] = {}
    views: dict[tuple[str, int], tuple[ReasonCode, str] | None] = {}
    worded: dict[tuple[object, str], tuple[ReasonCode, str]] = {}
    quota_view = ctx.config.fairness is Fairness.FAIR_SHARE
    for pj in ctx.sess.pending:
        if pj.bound:
            continue
        reason = pj.reason or (ReasonCode.INSUFFICIENT_CAPACITY, "not tried this cycle; waiting for room")
        if quota_view and reason[0] in CAPACITY_CODES and pj.leaf is not None:
            key = (pj.leaf.name, pj.req[0])
            if key not in views:
                views[key] = _quota_view(ctx, pj.leaf, pj.req[0])
            view = views[key]
            if view is not None:
                wkey = (key, reason[1])
                got = worded.get(wkey)
                if got is None:
                    got = worded[wkey] = (view[0], f"{view[1]} ({reason[1]})")
                reason = got
        out[pj.w.id] = reason
    # Workloads evicted this cycle wait again from the next one: say why (moved ones are re-bound).
    rebound = {b.workload_id for b in ctx.sess.binds}
    for ev in ctx.sess.evictions:
        if ev.workload_id not in rebound:
            out[ev.workload_id] = (ReasonCode.EVICTED_THIS_CYCLE, f"evicted this cycle: {ev.reason}")
    return Reasons(out)


class Reasons(Mapping[str, PendingReason]):
    """Pending reasons by workload id, each PendingReason made when first read: a cycle may
    leave tens of thousands waiting and a caller often reads only a few of them."""

    __slots__ = ("_made", "_raw")

    def __init__(self, raw: dict[str, tuple[ReasonCode, str]]) -> None:
        self._raw = raw
        self._made: dict[str, PendingReason] = {}

    def __getitem__(self, wid: str) -> PendingReason:
        got = self._made.get(wid)
        if got is None:
            code, message = self._raw[wid]
            got = self._made[wid] = PendingReason(wid, code, message)
        return got

    def __iter__(self) -> Iterator[str]:
        return iter(self._raw)

    def __len__(self) -> int:
        return len(self._raw)

    def __contains__(self, wid: object) -> bool:
        return wid in self._raw

    def __repr__(self) -> str:
        return f"Reasons({dict(self.items())!r})"


def _quota_view(ctx: Context, leaf: QueueState, need: int) -> tuple[ReasonCode, str] | None:
    """Turn "no room" into what the queue can do about it: wait for reclaim, or wait to borrow."""
    used, fair, deserved = leaf.allocated[0], leaf.fair[0], leaf.deserved[0]
    if used >= fair and need > 0 and (used > 0 or fair > 0):
        return ReasonCode.OVER_FAIR_SHARE, (
            f"project {leaf.name} uses {gpus(used)} and its fair share is {gpus(fair)}; "
            f"beyond that it can only borrow idle GPUs, and none fit"
        )
    lent = lenders(ctx.leaves, leaf)
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
