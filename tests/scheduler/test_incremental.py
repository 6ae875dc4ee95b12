"""Structures kept or updated between cycles answer exactly as building them from scratch.

* ``Group.spliced`` (the pending job lists updated in one pass) against a sorted rebuild;
* ``KeyBounds`` (bounds of running workloads' job-order keys, for preemption by job order)
  against asking every running workload, while their attained service grows between questions.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aifab.core.workloads import GpuRequest, TaskRequest, Workload, WorkloadPhase
from aifab.scheduler.keybounds import KeyBounds
from aifab.scheduler.pending import Group, JobInfo
from aifab.scheduler.plugins.orders import JOB_ORDERS, KEY_NEVER_FALLS, KEY_NEVER_RISES, KEY_STEADY_BELOW
from aifab.sim.state import Clock, running_view


def _info(i: int, g: int, prio: int, cache: dict[object, object]) -> JobInfo:
    w = Workload(
        id=f"w{i:03d}",
        queue="a",
        tasks=(TaskRequest(GpuRequest.whole(g)),),
        priority=prio,
        submit_time=float(i % 7),
        preemptible=i % 3 != 0,
    )
    return JobInfo(w, JOB_ORDERS["priority_fifo"](w), cache, 0)  # type: ignore[arg-type]


def _same(a: Group, b: Group) -> None:
    assert a.keys == b.keys
    assert [i.w.id for i in a.infos] == [i.w.id for i in b.infos]
    assert np.array_equal(a.data, b.data)
    assert (a.min_gpu, a.max_prio, a.all_pre) == (b.min_gpu, b.max_prio, b.all_pre)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 8), st.sampled_from([25, 50, 100])), max_size=40),
    st.data(),
)
def test_a_spliced_group_is_the_group_built_from_its_jobs(
    jobs: list[tuple[int, int]], data: st.DataObject
) -> None:
    cache: dict[object, object] = {}
    infos = sorted((_info(i, g, p, cache) for i, (g, p) in enumerate(jobs)), key=lambda x: x.key)
    shapes: dict[object, int] = {}

    def sid(shape: object) -> int:
        return shapes.setdefault(shape, len(shapes))

    n_old = data.draw(st.integers(0, len(infos)))
    picked = data.draw(st.permutations(range(len(infos))))
    old = sorted(picked[:n_old])
    new = sorted(picked[n_old:])
    removed = sorted(data.draw(st.sets(st.integers(0, max(n_old - 1, 0)), max_size=n_old)) if n_old else [])
    group = Group("a", [infos[i] for i in old], sid)
    added = [infos[i] for i in new]
    got = group.spliced(removed, added, sid)
    kept = [infos[i] for k, i in enumerate(old) if k not in set(removed)]
    want = Group("a", sorted(kept + added, key=lambda x: x.key), sid)
    _same(got, want)


def _running(i: int, g: int, attained: float, expected: float) -> Workload:
    return Workload(
        id=f"r{i:03d}",
        queue=f"q{i % 2}",
        tasks=(TaskRequest(GpuRequest.whole(g)),),
        priority=50 if i % 4 else 25,
        submit_time=float(i),
        phase=WorkloadPhase.RUNNING,
        attained_gpu_seconds=attained,
        expected_duration=expected,
    )


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(sorted(KEY_NEVER_RISES | KEY_NEVER_FALLS)),
    st.lists(
        st.tuples(
            st.sampled_from(["start", "stop", "tick", "ask"]),
            st.integers(0, 9),
            st.floats(0, 5e4, allow_nan=False),  # attained at start / time step / pending's
            st.sampled_from([1, 2, 4]),
            st.floats(10, 1e5, allow_nan=False),
        ),
        max_size=40,
    ),
)
def test_key_bounds_answer_as_asking_every_workload(
    order: str, ops: list[tuple[str, int, float, int, float]]
) -> None:
    """Running workloads are the simulator's views: the same objects from one question to the
    next, their attained service growing with the clock (the case bounds are kept for)."""
    jkey = JOB_ORDERS[order]
    steady = None if order in KEY_NEVER_RISES else KEY_STEADY_BELOW[order]
    bounds = KeyBounds(order, jkey, steady)
    clock = Clock()
    running: dict[int, Workload] = {}
    for op, i, a, g, expected in ops:
        gone: list[Workload] = []
        new: list[Workload] = []
        if op == "start" and i not in running:
            running[i] = running_view(_running(i, g, a, expected), clock, clock.now, float(g))
            new.append(running[i])
        elif op == "stop" and i in running:
            gone.append(running.pop(i))
        elif op == "tick":
            clock.now += a
        bounds.update(gone, new, clock.now)  # once per cycle
        if op == "ask":
            prio = 50 if g != 4 else 100
            pending = Workload(
                id="p",
                queue="q0",
                tasks=(TaskRequest(GpuRequest.whole(g)),),
                priority=prio,
                submit_time=4.5,
                attained_gpu_seconds=a,
                expected_duration=expected,
            )
            key = jkey(pending)
            queues = {"q0", "q1"} if i % 2 else {"q0"}
            for _ in range(2):  # a second question in the same cycle
                # The superset is exactly the entries whose kept key is above (preempt's room
                # check reads it as it is, so a looser one could change its verdicts).
                maybe = bounds.maybe_outranked(prio, key, queues)
                by_bounds = [
                    w
                    for w, p, kept, _, _ in bounds._entries.values()
                    if w.queue in queues and (p < prio or (p == prio and key < kept))
                ]
                assert maybe is not None
                assert sorted(w.id for w in maybe) == sorted(w.id for w in by_bounds)
                got = bounds.outranked(prio, key, queues)
                want = [
                    w
                    for w in running.values()
                    if w.queue in queues and (w.priority < prio or (w.priority == prio and jkey(w) > key))
                ]
                assert got is not None
                assert sorted(w.id for w in got) == sorted(w.id for w in want)


def test_srtf_bounds_drop_a_workload_whose_key_fell_below_the_question() -> None:
    """A key that never rises is filed once, at its first value; after a question computed it
    again (lower), the next question must not count the workload on the old value."""
    jkey = JOB_ORDERS["srtf"]
    bounds = KeyBounds("srtf", jkey, None)
    clock = Clock()
    r = running_view(_running(1, 1, 0.0, 1000.0), clock, 0.0, 1.0)  # 1000 s left at t=0
    bounds.update([], [r], clock.now)
    clock.now = 600.0  # 400 s left now; still filed at 1000
    bounds.update([], [], clock.now)
    pending = Workload(
        id="p",
        queue="q0",
        tasks=(TaskRequest(GpuRequest.whole(1)),),
        priority=50,
        submit_time=0.5,
        expected_duration=500.0,
    )
    key = jkey(pending)  # 500 s left: below the filed 1000, above the 400 now
    assert bounds.maybe_outranked(50, key, {"q1"}) == [r]  # the kept bound says maybe
    assert bounds.outranked(50, key, {"q1"}) == []  # asking it says no, and keeps 400
    assert bounds.maybe_outranked(50, key, {"q1"}) == []
    assert bounds.outranked(50, key, {"q1"}) == []


@pytest.mark.parametrize("gpus", [1, 2, 4])
@pytest.mark.parametrize("start", [0.0, 1234.5])
def test_las_bounds_see_a_step_the_moment_it_is_reached(gpus: int, start: float) -> None:
    """The bounds look again at a running LAS workload only once its attained service could
    have reached its next step (see KeyBounds._wait): never later than the step itself."""
    order = "las"
    jkey = JOB_ORDERS[order]
    bounds = KeyBounds(order, jkey, KEY_STEADY_BELOW[order])
    clock = Clock()
    clock.now = start
    w = running_view(_running(1, gpus, 0.0, 1e5), clock, start, float(gpus))
    step = KEY_STEADY_BELOW[order](w)
    crossing = start + step / gpus  # attained service reaches the step here
    pending = replace(_running(2, 1, 0.0, 1e5), phase=WorkloadPhase.PENDING, submit_time=9.0)
    bounds.update([], [w], clock.now)
    for t in [crossing - 1.0, crossing - 1e-6, crossing, crossing + 1e-6, crossing + 5.0]:
        clock.now = t
        bounds.update([], [], t)
        want = [x for x in [w] if jkey(x) > jkey(pending)]
        assert bounds.outranked(50, jkey(pending), {"q0", "q1"}) == want, t
        assert (want != []) == (t >= crossing)


@settings(max_examples=200, deadline=None)
@given(st.floats(0, 1e6, allow_nan=False), st.floats(0, 1e6, allow_nan=False), st.sampled_from([1, 2, 4]))
def test_orders_keep_their_promises(a: float, more: float, g: int) -> None:
    w = _running(1, g, a, 5000.0)
    later = replace(w, attained_gpu_seconds=a + more)
    for order in KEY_NEVER_RISES:
        assert KEY_STEADY_BELOW[order](w) == float("inf")
        assert JOB_ORDERS[order](later) <= JOB_ORDERS[order](w)
    for order in KEY_NEVER_FALLS:
        assert JOB_ORDERS[order](later) >= JOB_ORDERS[order](w)
