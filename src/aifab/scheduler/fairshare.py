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
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from aifab.core.queues import QueueTree
from aifab.core.resources import RESOURCE_KINDS
from aifab.scheduler.config import Fairness

Vec = tuple[int, int, int]


def compute_fair_shares(
    tree: QueueTree,
    capacity: Vec,
    demand: Mapping[str, Vec],
    fairness: Fairness,
    history: Mapping[str, Vec] | None = None,
) -> dict[str, Vec]:
    """Fair share of every queue. ``demand`` holds leaf demands (allocated + pending).

    ``history`` (decayed past usage per leaf) lowers a queue's over-quota weight to
    ``weight / (1 + past_usage / capacity)`` so a queue that used a lot recently borrows less.
    """
    full = _subtree_demand(tree, demand)
    if fairness is Fairness.NONE:
        return full  # one global pool: every queue may have what it asks for
    hist = _subtree_demand(tree, history) if history else {}
    out: dict[str, list[int]] = {q.name: [0, 0, 0] for q in tree}
    for k in range(3):
        _split_level(tree, None, capacity[k], k, full, hist, capacity[k], fairness, out)
    return {name: (v[0], v[1], v[2]) for name, v in sorted(out.items())}


def _subtree_demand(tree: QueueTree, leaf_values: Mapping[str, Vec]) -> dict[str, Vec]:
    """Sum leaf values up the tree, capping each queue by its own limit."""
    out: dict[str, Vec] = {}

    def visit(name: str) -> Vec:
        kids = tree.children(name)
        if kids:
            g = c = m = 0
            for kid in kids:
                v = visit(kid)
                g, c, m = g + v[0], c + v[1], m + v[2]
            total: Vec = (g, c, m)
        else:
            total = leaf_values.get(name, (0, 0, 0))
        q = tree.get(name)
        capped = []
        for k, kind in enumerate(RESOURCE_KINDS):
            lim = q.limit(kind)
            capped.append(total[k] if lim is None else min(total[k], lim))
        out[name] = (capped[0], capped[1], capped[2])
        return out[name]

    for root in tree.roots():
        visit(root)
    return out


def _split_level(
    tree: QueueTree,
    parent: str | None,
    total: int,
    k: int,
    demand: Mapping[str, Vec],
    hist: Mapping[str, Vec],
    capacity_k: int,
    fairness: Fairness,
    out: dict[str, list[int]],
) -> None:
    kids = tree.children(parent)
    if not kids:
        return
    kind = RESOURCE_KINDS[k]
    queues = [tree.get(n) for n in kids]
    give = {n: 0 for n in kids}
    remaining = total
    # Step 1: deserved quota, higher priority first if the cluster cannot honour all of it.
    for q in sorted(queues, key=lambda q: (-q.priority, q.name)):
        g = min(q.quota(kind).deserved, demand[q.name][k], remaining)
        give[q.name] = g
        remaining -= g
    # Step 2: idle capacity by priority group, weighted water-filling inside a group.
    if fairness is Fairness.FAIR_SHARE:
        for prio in sorted({q.priority for q in queues}, reverse=True):
            if remaining <= 0:
                break
            group = [q.name for q in queues if q.priority == prio]
            weights = {}
            for q in queues:
                if q.priority != prio:
                    continue
                past = hist.get(q.name, (0, 0, 0))[k] if hist else 0
                share = past / capacity_k if capacity_k > 0 else 0.0
                weights[q.name] = q.quota(kind).over_quota_weight / (1.0 + share)
            remaining = water_fill(group, weights, give, {n: demand[n][k] for n in group}, remaining)
    for n in kids:
        out[n][k] = give[n]
        _split_level(tree, n, give[n], k, demand, hist, capacity_k, fairness, out)


def water_fill(
    names: Sequence[str],
    weights: Mapping[str, float],
    give: dict[str, int],
    caps: Mapping[str, int],
    remaining: int,
) -> int:
    """Split ``remaining`` among ``names`` by weight, each capped; updates ``give``, returns leftover."""
    active = sorted(n for n in names if give[n] < caps[n] and weights[n] > 0)
    while remaining > 0 and active:
        total_w = sum(weights[n] for n in active)
        shares = {n: int(remaining * weights[n] / total_w) for n in active}
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
        # Rounding leftovers (fewer units than queues): one each, in name order.
        for n in active:
            if remaining <= 0:
                break
            if give[n] < caps[n]:
                give[n] += 1
                remaining -= 1
        active = [n for n in active if give[n] < caps[n]]
    return remaining
