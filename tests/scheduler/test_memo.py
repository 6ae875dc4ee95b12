"""The cycle memo and the vectorised walks change the work of a cycle, never its result.

Every comparison is of the whole CycleResult: binds, evictions, every pending reason (in
order), fair shares, demands and stats.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aifab.core import (
    ClusterSnapshot,
    CycleResult,
    GpuRequest,
    QueueTree,
    TaskRequest,
    Workload,
    WorkloadChanges,
    gpu_queue,
    uniform_node,
)
from aifab.scheduler import Fairness, SchedulerConfig, run_cycle, search
from aifab.scheduler.memo import CycleMemo, diff
from aifab.sim.policies import POLICIES

from .helpers import Placer, apply, running
from .test_invariants import CONFIGS, _fits, contended, snapshots

ALL_CONFIGS = [*CONFIGS, *POLICIES.values(), SchedulerConfig(backfill=False, fairness=Fairness.STATIC)]


def full(r: CycleResult) -> tuple[object, ...]:
    reasons = [(k, v.code, v.message) for k, v in r.pending.items()]
    return (r.binds, r.evictions, reasons, len(r.pending), dict(r.fair_shares), dict(r.demands), r.stats)


@contextmanager
def vector_min(n: int, few: int | None = None) -> Iterator[None]:
    """Lists of ``n`` jobs or more are searched vectorised; ``few``: how many jobs the search
    first looks at one by one (0: none, the vectorised walk decides alone)."""
    old, old_few = search.VECTOR_MIN, search._FEW
    search.VECTOR_MIN = n
    search._FEW = old_few if few is None else few
    try:
        yield
    finally:
        search.VECTOR_MIN, search._FEW = old, old_few


@st.composite
def backlog(draw: Any) -> ClusterSnapshot:
    """A mostly full cluster and dozens of pending jobs in a few shapes: long job lists."""
    rng = random.Random(draw(st.integers(0, 2**32)))
    n_nodes = rng.randint(2, 4)
    nodes = tuple(
        uniform_node(f"n{i}", 8, gpu_model=rng.choice("AB"), topology={"rack": f"r{i % 2}"})
        for i in range(n_nodes)
    )
    total = 8 * n_nodes
    hierarchical = rng.random() < 0.3
    queues = [gpu_queue("d", total // 2, limit_gpus=rng.choice([None, total // 2]))] if hierarchical else []
    split = [total // 4, total // 4, total // 8]
    names = ["a", "b", "c"]
    for name, deserved in zip(names, split, strict=True):
        queues.append(
            gpu_queue(
                name,
                deserved,
                parent="d" if hierarchical and name != "c" else None,
                limit_gpus=rng.choice([None, None, deserved + 4]),
            )
        )
    placer = Placer(nodes)
    ws: list[Workload] = []
    for i in range(rng.randint(0, 4 * n_nodes)):
        w = Workload(
            id=f"r{i}",
            queue=rng.choice(names),
            tasks=(TaskRequest(GpuRequest.whole(rng.choice([1, 1, 2, 4]))),),
            priority=rng.choice([25, 50, 50]),
            preemptible=rng.random() < 0.9,
            checkpoint_interval=rng.choice([None, 20.0]),
            attained_gpu_seconds=float(rng.randint(0, 20000)),
        )
        on = rng.choice(nodes).name
        if _fits(placer, w, on):
            ws.append(running(w, placer, on, float(rng.randint(0, 99))))
    for j in range(rng.randint(20, 70)):
        g = rng.choice([1, 1, 1, 2, 4, 8])
        tasks = rng.choice([1, 1, 1, 2])
        ws.append(
            Workload(
                id=f"p{j}",
                queue=rng.choice([*names, *names, "d" if hierarchical else "a", "nowhere"]),
                tasks=(TaskRequest(GpuRequest.whole(g)),) * tasks,
                priority=rng.choice([50, 50, 50, 100, 25]),
                preemptible=rng.random() < 0.85,
                gpu_models=frozenset(rng.choice([(), (), (), ("A",)])),
                submit_time=float(rng.randint(0, 40)),
                attained_gpu_seconds=float(rng.choice([0, 0, 5000, 50000])),
                expected_duration=float(rng.randint(100, 10000)),
            )
        )
    rng.shuffle(ws)
    return ClusterSnapshot(nodes, QueueTree(queues), tuple(ws), now=100.0)


any_snapshot = st.one_of(snapshots(), contended(), backlog(), backlog())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(any_snapshot, st.sampled_from(ALL_CONFIGS))
def test_vectorised_walks_decide_as_the_job_by_job_walk(snap: ClusterSnapshot, cfg: SchedulerConfig) -> None:
    with vector_min(10**9):
        slow = full(run_cycle(snap, cfg))
    with vector_min(0):
        fast = full(run_cycle(snap, cfg))
    with vector_min(0, few=0):
        vectorised_only = full(run_cycle(snap, cfg))
    with vector_min(0, few=2):
        two_first = full(run_cycle(snap, cfg))
    assert fast == slow == vectorised_only == two_first


def _next(snap: ClusterSnapshot, r: CycleResult, rng: random.Random, step: int) -> ClusterSnapshot:
    """The snapshot after applying ``r``: some running work finishes, new work arrives, and the
    order of the workloads may change."""
    after = apply(snap, r, now=snap.now + 10)
    ws = [w for w in after.workloads if not (w.is_running and rng.random() < 0.2)]
    for k in range(rng.randint(0, 6)):
        src = rng.choice(ws) if ws else None
        if src is not None and not src.is_running:
            ws.append(replace(src, id=f"{src.id}-{step}-{k}", submit_time=src.submit_time + rng.random()))
    if rng.random() < 0.15:
        ws = [replace(w) for w in ws]  # equal workloads, other objects (a caller that rebuilds)
    if rng.random() < 0.2:
        rng.shuffle(ws)
    elif ws and rng.random() < 0.3:
        i = rng.randrange(len(ws))
        ws.insert(rng.randrange(len(ws)), ws.pop(i))
    return replace(after, workloads=tuple(ws))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(any_snapshot, st.sampled_from(ALL_CONFIGS), st.integers(0, 2**32), st.booleans(), st.booleans())
def test_a_memo_kept_between_cycles_changes_nothing(
    snap: ClusterSnapshot, cfg: SchedulerConfig, seed: int, forced: bool, with_changes: bool
) -> None:
    """With or without the caller's changes; and a result whose reasons are read only after
    the next cycle (which then may not change the job lists it reads) reads its own cycle."""
    rng = random.Random(seed)
    memo = CycleMemo()
    unread: tuple[CycleResult, CycleResult] | None = None
    token: object = None
    with vector_min(0 if forced else search.VECTOR_MIN):
        for step in range(6):
            fresh = run_cycle(snap, cfg)
            if with_changes:
                snap, token = _with_changes(memo, snap, token, rng)
            kept = run_cycle(snap, cfg, memo=memo)
            if unread is not None:
                assert full(unread[0]) == full(unread[1]), step - 1
                unread = None
            if rng.random() < 0.4:
                unread = (kept, fresh)
            else:
                assert full(kept) == full(fresh), step
            snap = _next(snap, fresh, rng, step)
        if unread is not None:
            assert full(unread[0]) == full(unread[1])


def _with_changes(
    memo: CycleMemo, snap: ClusterSnapshot, since: object, rng: random.Random
) -> tuple[ClusterSnapshot, object]:
    """``snap`` with the changes from the workloads the memo holds (what the previous
    snapshot had), and their token; now and then changes that follow no snapshot."""
    held = list(memo.running.running.values()) if memo.running is not None else []
    held += [i.w for i in memo.pending.infos.values()] if memo.pending is not None else []
    now = {id(w) for w in snap.workloads}
    before = {id(w) for w in held}
    token = object()
    changes = WorkloadChanges(
        since if rng.random() < 0.9 else object(),
        token,
        tuple(w for w in held if id(w) not in now),
        tuple(w for w in snap.workloads if id(w) not in before),
    )
    return replace(snap, changes=changes), token


def test_changes_that_do_not_match_the_workloads_are_an_error() -> None:
    nodes = (uniform_node("n0", 2),)
    tree = QueueTree([gpu_queue("a", 1)])
    w = [Workload(id=f"w{i}", queue="a", tasks=(TaskRequest(GpuRequest.whole(4)),)) for i in range(4)]
    cfg = SchedulerConfig()
    first = object()
    bad = {
        "was not in the last snapshot": ((w[0], w[1], w[2]), (w[3],), ()),
        "was already in the last snapshot": ((w[0], w[1], w[2]), (), (w[1],)),
        "do not match snapshot.workloads": ((w[0], w[1], w[3]), (), ()),
    }
    for message, (ws, gone, new) in bad.items():
        memo = CycleMemo()
        start = ClusterSnapshot(nodes, tree, (w[0], w[1]), changes=WorkloadChanges(None, first, (), ()))
        run_cycle(start, cfg, memo=memo)
        snap = ClusterSnapshot(nodes, tree, ws, changes=WorkloadChanges(first, object(), gone, new))
        with pytest.raises(ValueError, match=message):
            run_cycle(snap, cfg, memo=memo)
        # The memo starts over from the next snapshot, whatever its changes say.
        again = replace(snap, changes=WorkloadChanges(object(), object(), (), ()))
        assert full(run_cycle(again, cfg, memo=memo)) == full(run_cycle(again, cfg))


def test_unusual_snapshots_rebuild_and_match() -> None:
    """Repeated ids, repeated objects and NaN times make the memo fall back to a rebuild."""
    nodes = (uniform_node("n0", 2),)
    tree = QueueTree([gpu_queue("a", 1), gpu_queue("b", 1)])
    w = [
        Workload(
            id=f"w{i % 3}",
            queue="ab"[i % 2],
            tasks=(TaskRequest(GpuRequest.whole(1 + i % 2)),),
            submit_time=t,
        )
        for i, t in enumerate([1.0, 2.0, math.nan, 1.0, 3.0, 0.5])
    ]
    snaps = [
        (w[0], w[1], w[3], w[4], w[5]),  # w0 twice (w[0] and w[3])
        (w[0], w[0], w[1]),  # one object twice
        (w[2], w[1], w[4]),  # NaN submit time
        (w[1], w[4]),
        (w[4], w[1], w[5]),
    ]
    for cfg in ALL_CONFIGS:
        memo = CycleMemo()
        for ws in snaps:
            snap = ClusterSnapshot(nodes, tree, ws, now=10.0)
            assert full(run_cycle(snap, cfg, memo=memo)) == full(run_cycle(snap, cfg))


class _Item:
    def __init__(self, wid: str) -> None:
        self.id = wid


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 12), max_size=25), st.lists(st.integers(0, 20), max_size=25))
def test_diff_accounts_for_every_object(old_idx: list[int], cur_idx: list[int]) -> None:
    pool = [_Item(f"w{i % 7}") for i in range(21)]  # ids repeat: pairs by id are swaps
    old = tuple(pool[i] for i in old_idx)
    cur = tuple(pool[i] for i in cur_idx)
    gone, new, swapped = diff(old, cur)  # type: ignore[arg-type]
    have = Counter(map(id, old))
    have.subtract(map(id, gone))
    have.subtract(id(a) for a, _ in swapped)
    assert min(have.values(), default=0) >= 0  # only objects that were there leave
    have.update(map(id, new))
    have.update(id(b) for _, b in swapped)
    assert +have == Counter(map(id, cur))
