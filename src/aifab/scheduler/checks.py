"""Quota checks before placement, and the words for each refusal."""

from __future__ import annotations

from aifab.core.decisions import ReasonCode
from aifab.core.resources import format_gpus
from aifab.scheduler.session import QueueState, Vec

Refusal = tuple[ReasonCode, str]


def gpus(milli: int) -> str:
    """2000 -> '2 GPUs', 1000 -> '1 GPU', 500 -> '0.5 GPU'."""
    return f"{format_gpus(milli)} GPU" + ("s" if milli > 1000 else "")


def amount(k: int, v: int) -> str:
    if k == 0:
        return gpus(v)
    if k == 1:
        return f"{v / 1000:g} CPUs"
    return f"{v} MiB memory"


def _counted(qs: QueueState, k: int) -> bool:
    """GPU always; CPU and memory only where the queue has a deserved quota for them."""
    return k == 0 or qs.deserved[k] > 0


def limit_refusal(leaf: QueueState, req: Vec) -> Refusal | None:
    """Never exceed a queue's limit, nor any of its ancestors' limits."""
    for qs, k, lim in leaf.limits:
        if req[k] > 0 and qs.allocated[k] + req[k] > lim:
            return ReasonCode.QUEUE_LIMIT, (
                f"{qs.kind_word} {qs.name} is at its limit of {amount(k, lim)} "
                f"(uses {amount(k, qs.allocated[k])}, needs {amount(k, req[k])} more)"
            )
    return None


def non_preemptible_refusal(leaf: QueueState, req: Vec) -> Refusal | None:
    """Non-preemptible work cannot be reclaimed, so it may only use deserved quota."""
    for k in range(3):
        if not _counted(leaf, k) or req[k] <= 0:
            continue
        used, quota = leaf.np_allocated[k], leaf.deserved[k]
        if used + req[k] > quota:
            free = max(0, quota - used)
            return ReasonCode.NON_PREEMPTIBLE_OVER_QUOTA, (
                f"non-preemptible workloads run only within deserved quota "
                f"({amount(k, free)} of {amount(k, quota)} free in quota of project {leaf.name}, "
                f"needs {amount(k, req[k])}); make it preemptible or raise the quota"
            )
    return None


def static_refusal(leaf: QueueState, req: Vec) -> Refusal | None:
    """Static quotas: a queue never borrows beyond what it deserves."""
    for k in range(3):
        if not _counted(leaf, k) or req[k] <= 0:
            continue
        if leaf.allocated[k] + req[k] > leaf.deserved[k]:
            return ReasonCode.OVER_FAIR_SHARE, (
                f"static quotas: project {leaf.name} uses {amount(k, leaf.allocated[k])} of its "
                f"{amount(k, leaf.deserved[k])} and needs {amount(k, req[k])} more"
            )
    return None


def quota_refusal(leaf: QueueState, req: Vec, preemptible: bool, static: bool) -> Refusal | None:
    """The queue checks, in the order try_job makes them: limits, then the non-preemptible
    quota, then (static quotas) the deserved quota. Every action that binds makes them, in the
    state it binds in (an earlier bind of the same cycle may have used the room)."""
    refusal = limit_refusal(leaf, req) if leaf.limits else None
    if refusal is None and not preemptible:
        refusal = non_preemptible_refusal(leaf, req)
    if refusal is None and static:
        refusal = static_refusal(leaf, req)
    return refusal


QUICK_CAPACITY = 1  # more GPUs asked for than the cluster has free
QUICK_BLOCK = 2  # more whole GPUs on one node than the largest free block


def quick_failure(gpu: int, free: int, biggest: int, largest_block: int) -> int:
    """Which O(1) check of :func:`quick_refusal` refuses (0: neither), without its words."""
    if gpu > free:
        return QUICK_CAPACITY
    if biggest > largest_block:
        return QUICK_BLOCK
    return 0


def quick_refusal(
    gpu: int,
    free: int,
    biggest: int,
    largest_block: int,
    memo: Refusal | None,
    words: dict[object, Refusal],
) -> Refusal | None:
    """O(1) answers for the common full-cluster case, then the per-shape memo of failures.

    ``words`` caches the messages (thousands of jobs share a few: word them once)."""
    quick = quick_failure(gpu, free, biggest, largest_block)
    if quick == QUICK_CAPACITY:
        key = ("capacity", gpu, free)
        got = words.get(key)
        if got is None:
            where = "no GPU is free" if free <= 0 else f"only {gpus(free)} free"
            got = words[key] = (
                ReasonCode.INSUFFICIENT_CAPACITY,
                f"needs {gpus(gpu)}; {where} in the cluster",
            )
        return got
    if quick == QUICK_BLOCK:
        key = ("block", biggest, largest_block)
        got = words.get(key)
        if got is None:
            got = words[key] = (
                ReasonCode.FRAGMENTED,
                f"needs {gpus(biggest * 1000)} on one node; the largest free block is {largest_block}",
            )
        return got
    return memo


def within_fair(leaf: QueueState, req: Vec) -> bool:
    return all(req[k] <= 0 or leaf.allocated[k] + req[k] <= leaf.fair[k] for k in range(3))


def lenders(queues: list[QueueState], leaf: QueueState) -> list[tuple[int, str]]:
    """Other leaf queues using GPUs beyond their fair share: (amount over, name), most first."""
    out = [
        (qs.allocated[0] - qs.fair[0], qs.name)
        for qs in queues
        if qs.is_leaf and qs is not leaf and qs.allocated[0] > qs.fair[0]
    ]
    out.sort(key=lambda t: (-t[0], t[1]))
    return out
