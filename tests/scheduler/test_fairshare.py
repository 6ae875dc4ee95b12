"""Worked fair-share examples, numbers checked by hand in the comments (GPUs; the code is milli)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from aifab.core import QueueTree, ResourceKind, gpu_queue
from aifab.scheduler import Fairness, compute_fair_shares
from aifab.scheduler.fairshare import subtree_demand

from .helpers import tree

G = 1000


def gpus(shares: dict[str, tuple[int, int, int]]) -> dict[str, float]:
    return {n: v[0] / G for n, v in shares.items()}


def demand(**d: float) -> dict[str, tuple[int, int, int]]:
    return {n: (round(v * G), 0, 0) for n, v in d.items()}


def test_flat_weighted_split() -> None:
    # 10 GPUs; a(deserved 2, w1) b(deserved 3, w2) c(deserved 0, w1); demands 8, 4, 5.
    # Step 1 (deserved, capped by demand): a 2, b 3, c 0 -> 5 left.
    # Step 2, weights 1:2:1 of 5: a 1.25, b 2.5, c 1.25; b needs only 1 more -> b = 4, 4 left.
    #   Again, a:c = 1:1 of 4: 2 each, nobody saturates -> a 4, c 2.
    t = tree(gpu_queue("a", 2, weight=1), gpu_queue("b", 3, weight=2), gpu_queue("c", 0, weight=1))
    got = compute_fair_shares(t, (10 * G, 0, 0), demand(a=8, b=4, c=5), Fairness.FAIR_SHARE)
    assert gpus(got) == {"a": 4, "b": 4, "c": 2}


def test_hierarchical_departments_then_projects() -> None:
    # 16 GPUs. d1(deserved 8) holds p1(deserved 4, w1, demand 10) and p2(deserved 2, w3, demand 3);
    # d2(deserved 4) holds p3(deserved 4, demand 12).
    # Top: demands d1 13, d2 12. Deserved 8 and 4, 4 left split 1:1 -> d1 10, d2 6.
    # Inside d1 (10): p1 4, p2 2, 4 left by 1:3 -> p1 1, p2 3; p2 needs only 1 -> p2 3, 3 left -> p1 7.
    # Inside d2 (6): p3 4 + 2 = 6.
    t = tree(
        gpu_queue("d1", 8),
        gpu_queue("p1", 4, parent="d1", weight=1),
        gpu_queue("p2", 2, parent="d1", weight=3),
        gpu_queue("d2", 4),
        gpu_queue("p3", 4, parent="d2"),
    )
    got = compute_fair_shares(t, (16 * G, 0, 0), demand(p1=10, p2=3, p3=12), Fairness.FAIR_SHARE)
    assert gpus(got) == {"d1": 10, "d2": 6, "p1": 7, "p2": 3, "p3": 6}


def test_limit_caps_the_share_and_the_rest_goes_elsewhere() -> None:
    # 10 GPUs; a(deserved 2, limit 3, demand 8 -> capped to 3), b(deserved 2, demand 8).
    # Step 1: a 2, b 2; 6 left 1:1 -> 3 each, a needs only 1 -> a 3, 5 left -> b 7.
    t = tree(gpu_queue("a", 2, limit_gpus=3), gpu_queue("b", 2))
    got = compute_fair_shares(t, (10 * G, 0, 0), demand(a=8, b=8), Fairness.FAIR_SHARE)
    assert gpus(got) == {"a": 3, "b": 7}


def test_higher_priority_queues_take_idle_capacity_first() -> None:
    # 10 GPUs; hi(priority 1, deserved 0, demand 6), lo1(deserved 2, demand 8), lo2(deserved 0, demand 8).
    # Step 1: lo1 2 -> 8 left. Priority 1 first: hi 6 -> 2 left; lo1:lo2 1:1 -> 1 each.
    t = tree(gpu_queue("hi", 0, priority=1), gpu_queue("lo1", 2), gpu_queue("lo2", 0))
    got = compute_fair_shares(t, (10 * G, 0, 0), demand(hi=6, lo1=8, lo2=8), Fairness.FAIR_SHARE)
    assert gpus(got) == {"hi": 6, "lo1": 3, "lo2": 1}


def test_oversubscribed_deserved_goes_by_priority() -> None:
    # The cluster shrank to 4 GPUs but a and b deserve 3 each: higher priority b gets 3, a 1.
    t = tree(gpu_queue("a", 3), gpu_queue("b", 3, priority=5))
    got = compute_fair_shares(t, (4 * G, 0, 0), demand(a=3, b=3), Fairness.FAIR_SHARE)
    assert gpus(got) == {"a": 1, "b": 3}


def test_time_based_fairness_lowers_weight_of_heavy_past_users() -> None:
    # 10 GPUs, a and b alike (deserved 0, w1, demand 10). a used 10 GPUs (share 1.0) recently:
    # weight 1/(1+1) = 0.5 vs 1 -> a 10*0.5/1.5 = 3.333 (3333 milli + the 1 milli remainder), b 6.666.
    t = tree(gpu_queue("a"), gpu_queue("b"))
    got = compute_fair_shares(
        t, (10 * G, 0, 0), demand(a=10, b=10), Fairness.FAIR_SHARE, history={"a": (10 * G, 0, 0)}
    )
    assert got["a"][0] == 3334 and got["b"][0] == 6666
    assert sum(v[0] for v in got.values()) == 10 * G


def test_static_fairness_is_deserved_capped_by_demand() -> None:
    t = tree(gpu_queue("a", 2), gpu_queue("b", 3))
    got = compute_fair_shares(t, (10 * G, 0, 0), demand(a=8, b=1), Fairness.STATIC)
    assert gpus(got) == {"a": 2, "b": 1}


def test_no_fairness_gives_everyone_their_demand() -> None:
    t = tree(gpu_queue("a", 2), gpu_queue("b", 3))
    got = compute_fair_shares(t, (10 * G, 0, 0), demand(a=8, b=7), Fairness.NONE)
    assert gpus(got) == {"a": 8, "b": 7}


def test_never_hands_out_more_than_capacity_and_respects_demand() -> None:
    t = tree(gpu_queue("a", 1, weight=0.3), gpu_queue("b", 0, weight=0.7), gpu_queue("c", 5, weight=2))
    got = compute_fair_shares(t, (7 * G + 1, 0, 0), demand(a=3.3, b=2.9, c=9), Fairness.FAIR_SHARE)
    assert sum(v[0] for v in got.values()) == 7 * G + 1
    assert got["a"][0] <= 3300 and got["b"][0] <= 2900


@st.composite
def _split_case(
    draw: st.DrawFn,
) -> tuple[QueueTree, tuple[int, int, int], dict[str, tuple[int, int, int]], int]:
    depts = draw(st.integers(1, 3))
    queues = []
    leaves = []
    for d in range(depts):
        kids = []
        for p in range(draw(st.integers(1, 3))):
            name = f"d{d}p{p}"
            leaves.append(name)
            kids.append(
                gpu_queue(
                    name,
                    draw(st.integers(0, 4)),
                    parent=f"d{d}",
                    weight=draw(st.sampled_from([0.5, 1, 2])),
                    priority=draw(st.integers(0, 1)),
                    limit_gpus=draw(st.one_of(st.none(), st.integers(4, 20))),
                )
            )
        deserved = sum(k.quota(ResourceKind.GPU).deserved for k in kids) // G + draw(st.integers(0, 4))
        queues += [gpu_queue(f"d{d}", deserved, weight=draw(st.sampled_from([1, 2, 3]))), *kids]
    demand = {
        n: (draw(st.integers(0, 20)) * G // 2, draw(st.integers(0, 64)) * G, draw(st.integers(0, 4)))
        for n in leaves
    }
    capacity = (draw(st.integers(0, 40)) * G, draw(st.integers(0, 128)) * G, draw(st.integers(0, 8)))
    return QueueTree(queues), capacity, demand, draw(st.sampled_from([1, 1000]))


@settings(max_examples=300, deadline=None)
@given(case=_split_case(), data=st.data())
def test_more_demand_from_a_queue_above_its_share_changes_no_share(
    case: tuple[QueueTree, tuple[int, int, int], dict[str, tuple[int, int, int]], int], data: st.DataObject
) -> None:
    """The simulator skips a cycle after arrivals into queues that already ask for more than
    their fair share (rule 5): that is only sound if such demand moves no share at all."""
    t, capacity, demand, quantum = case
    fair = compute_fair_shares(t, capacity, demand, Fairness.FAIR_SHARE, gpu_quantum=quantum)
    full = subtree_demand(t, demand)
    leaf = data.draw(st.sampled_from(sorted(demand)))
    path = [leaf, *t.ancestors(leaf)]
    extra = tuple(
        data.draw(st.integers(1, 5 * G)) if all(full[q][k] > fair[q][k] for q in path) else 0
        for k in range(3)
    )
    if not any(extra):
        return
    more = dict(demand)
    more[leaf] = (demand[leaf][0] + extra[0], demand[leaf][1] + extra[1], demand[leaf][2] + extra[2])
    assert compute_fair_shares(t, capacity, more, Fairness.FAIR_SHARE, gpu_quantum=quantum) == fair
