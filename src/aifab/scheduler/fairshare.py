"""Hierarchical fair share by water-filling, one resource at a time.

Each level of the queue tree splits what its parent got among its children:

1. every child first gets ``min(deserved, demand)`` (children of higher priority first, in case
   the deserved quotas over-commit a shrunken cluster);
2. what is left goes to children of the highest priority first, split in proportion to their
   over-quota weight, each capped by its demand (demand is already capped by the limit);
   children that saturate drop out and the rest is split again until nothing is left or
   nobody wants more.

Integers throughout (milli-GPU, millicores, MiB) so the result is exact and deterministic;
rounding remainders go one unit at a time to children in name order.

Idle GPUs can be split in coarser units (``gpu_quantum``, e.g. 1000 = whole GPUs; the
scheduler's default): with milli-GPU precision a borrowing queue's fair share is typically
fractional (52.125 GPUs), and a queue 0.875 GPUs above it has no whole-GPU workload that
reclaim may take without putting it below its fair share, so a project below its deserved
quota could wait for reclaim forever. Whole-GPU units make every excess a whole number of GPUs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from aifab.core.queues import QueueTree
from aifab.scheduler.config import Fairness
from aifab.scheduler.static import TreeInfo, tree_info

Vec = tuple[int, int, int]
ZERO: Vec = (0, 0, 0)


def compute_fair_shares(
    tree: QueueTree,
    capacity: Vec,
    demand: Mapping[str, Vec],
    fairness: Fairness,
    history: Mapping[str, Vec] | None = None,
    gpu_quantum: int = 1,
) -> dict[str, Vec]:
    """Fair share of every queue. ``demand`` holds leaf demands (allocated + pending).

    ``history`` (decayed past usage per leaf) lowers a queue's over-quota weight to
    ``weight / (1 + past_usage / capacity)`` so a queue that used a lot recently borrows less.
    """
    return fair_shares_and_demands(tree, capacity, demand, fairness, history, gpu_quantum)[0]


Columns = dict[tuple[object, ...], dict[str, int]]


def fair_shares_and_demands(
    tree: QueueTree,
    capacity: Vec,
    demand: Mapping[str, Vec],
    fairness: Fairness,
    history: Mapping[str, Vec] | None = None,
    gpu_quantum: int = 1,
    columns: Columns | None = None,
) -> tuple[dict[str, Vec], dict[str, Vec]]:
    """(:func:`compute_fair_shares`, :func:`subtree_demand`) in one pass.

    Each resource is split on its own, from that resource's numbers only; ``columns`` (kept by
    the caller for one tree) remembers each resource's split by those numbers, so a cycle in
    which only the GPU demand moved splits only GPUs again."""
    info = tree_info(tree)
    full = _subtree_demand(info, demand)
    if fairness is Fairness.NONE:
        return full, dict(full)  # one global pool: every queue may have what it asks for
    hist = _subtree_demand(info, history) if history else {}
    names = list(info.by_name)
    out: dict[str, list[int]] = {name: [0, 0, 0] for name in names}
    for k in range(3):
        unit = max(1, gpu_quantum) if k == 0 else 1
        key: tuple[object, ...] | None = None
        if columns is not None:
            key = (
                k,
                capacity[k],
                unit,
                fairness,
                tuple(full[n][k] for n in names),
                tuple(hist.get(n, ZERO)[k] for n in names) if hist else None,
            )
            got = columns.get(key)
            if got is not None:
                for n, share in got.items():
                    out[n][k] = share
                continue
        col: dict[str, list[int]] = {name: [0, 0, 0] for name in names}
        _split_level(info, info.roots, capacity[k], k, full, hist, capacity[k], fairness, col, unit)
        for n, vec in col.items():
            out[n][k] = vec[k]
        if columns is not None and key is not None:
            if len(columns) >= 64:
                columns.clear()
            columns[key] = {n: v[k] for n, v in col.items()}
    return {name: (v[0], v[1], v[2]) for name, v in sorted(out.items())}, full


def subtree_demand(tree: QueueTree, leaf_demand: Mapping[str, Vec]) -> dict[str, Vec]:
    """Demand of every queue as the split sees it: its subtree's leaves summed, capped by limits."""
    return _subtree_demand(tree_info(tree), leaf_demand)


def _subtree_demand(info: TreeInfo, leaf_values: Mapping[str, Vec]) -> dict[str, Vec]:
    """Sum leaf values up the tree, capping each queue by its own limit."""
    out: dict[str, Vec] = {}
    for root in info.roots:
        _sum_subtree(info, leaf_values, out, root)
    return out


def _sum_subtree(info: TreeInfo, leaf_values: Mapping[str, Vec], out: dict[str, Vec], name: str) -> Vec:
    # A module function, not a closure that calls itself: that would be a reference cycle
    # left to the garbage collector after every cycle.
    q = info.by_name[name]
    if q.children:
        g = c = m = 0
        for kid in q.children:
            v = _sum_subtree(info, leaf_values, out, kid)
            g, c, m = g + v[0], c + v[1], m + v[2]
    else:
        g, c, m = leaf_values.get(name, ZERO)
    lg, lc, lm = q.limit
    total: Vec = (
        g if lg is None else min(g, lg),
        c if lc is None else min(c, lc),
        m if lm is None else min(m, lm),
    )
    out[name] = total
    return total


def _split_level(
    info: TreeInfo,
    kids: list[str],
    total: int,
    k: int,
    demand: Mapping[str, Vec],
    hist: Mapping[str, Vec],
    capacity_k: int,
    fairness: Fairness,
    out: dict[str, list[int]],
    unit: int = 1,
) -> None:
    if not kids:
        return
    queues = [info.by_name[n] for n in kids]
    give = {n: 0 for n in kids}
    remaining = total
    # Step 1: deserved quota, higher priority first if the cluster cannot honour all of it.
    for q in sorted(queues, key=lambda q: (-q.priority, q.name)):
        g = min(q.deserved[k], demand[q.name][k], remaining)
        give[q.name] = g
        remaining -= g
    # Step 2: idle capacity by priority group, weighted water-filling inside a group.
    if fairness is Fairness.FAIR_SHARE and remaining > 0:
        for prio in sorted({q.priority for q in queues}, reverse=True):
            if remaining <= 0:
                break
            group = [q.name for q in queues if q.priority == prio]
            weights = {}
            for q in queues:
                if q.priority != prio:
                    continue
                past = hist.get(q.name, ZERO)[k] if hist else 0
                share = past / capacity_k if capacity_k > 0 else 0.0
                weights[q.name] = q.weight[k] / (1.0 + share)
            remaining = water_fill(group, weights, give, {n: demand[n][k] for n in group}, remaining, unit)
    for q in queues:
        n = q.name
        out[n][k] = give[n]
        if q.children:
            _split_level(info, q.children, give[n], k, demand, hist, capacity_k, fairness, out, unit)


def water_fill(
    names: Sequence[str],
    weights: Mapping[str, float],
    give: dict[str, int],
    caps: Mapping[str, int],
    remaining: int,
    unit: int = 1,
) -> int:
    """Split ``remaining`` among ``names`` by weight, each capped; updates ``give``, returns
    leftover. Shares are whole multiples of ``unit`` (except where a cap or the remainder is not)."""
    active = sorted(n for n in names if give[n] < caps[n] and weights[n] > 0)
    while remaining > 0 and active:
        total_w = sum(weights[n] for n in active)
        shares = {n: int(remaining * weights[n] / total_w) // unit * unit for n in active}
        saturated = [n for n in active if caps[n] - give[n] <= shares[n]]
        if saturated:
            # Fill the saturated ones exactly and split again what they did not need.
            for n in saturated:
                remaining -= caps[n] - give[n]
                give[n] = caps[n]
            active = [n for n in active if n not in saturated]
            continue
        for n in active:
            give[n] += shares[n]
            remaining -= shares[n]
        # Rounding leftovers (fewer units than queues): one unit each, in name order.
        for n in active:
            if remaining <= 0:
                break
            if give[n] < caps[n]:
                step = min(unit, caps[n] - give[n], remaining)
                give[n] += step
                remaining -= step
        active = [n for n in active if give[n] < caps[n]]
    return remaining
