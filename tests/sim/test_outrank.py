"""Skip rules 8 and 9's book-keeping: bounds of running keys, and the running views.

What the rules rest on is checked directly against brute force: the job orders' promise
(KEY_STEADY_BELOW), RunningKeys' answer at every check, and that a RunningView reads exactly
what the refreshed copy it replaces holds. Whole replays with and without skipping are compared
in test_skipping.
"""

from __future__ import annotations

import math
from dataclasses import fields, replace

from hypothesis import given, settings
from hypothesis import strategies as st

from aifab.core.workloads import GpuRequest, TaskRequest, Workload, WorkloadPhase
from aifab.scheduler.plugins.orders import JOB_ORDERS, KEY_STEADY_BELOW, LAS_QUEUE_THRESHOLDS
from aifab.sim.outcome import JobRecord
from aifab.sim.outrank import RunningKeys, attained_now
from aifab.sim.state import Clock, JobState, running_view, with_attained

from ._helpers import job

attained = st.floats(0, 1e6, allow_nan=False)
gpus = st.sampled_from([1, 2, 4, 8])


def workload(a: float, g: int, expected: float | None, wid: str = "w", submit: float = 1.0) -> Workload:
    return Workload(
        id=wid,
        queue="p0",
        tasks=(TaskRequest(GpuRequest.whole(g)),),
        submit_time=submit,
        attained_gpu_seconds=a,
        expected_duration=expected,
    )


@settings(max_examples=400, deadline=None)
@given(
    st.sampled_from(sorted(KEY_STEADY_BELOW)),
    attained,
    st.floats(0, 1, allow_nan=False),
    gpus,
    st.one_of(st.none(), st.floats(1, 1e6, allow_nan=False)),
)
def test_a_key_stays_at_most_its_value_below_the_promised_attained_service(
    order: str, a: float, share: float, g: int, expected: float | None
) -> None:
    w = workload(a, g, expected)
    bound = KEY_STEADY_BELOW[order](w)
    later = a + share * (min(bound, a + 1e6) - a)
    if later >= bound:
        return
    key = JOB_ORDERS[order]
    assert key(replace(w, attained_gpu_seconds=later)) <= key(w)


def test_las_steps_are_its_thresholds() -> None:
    steady = KEY_STEADY_BELOW["las"]
    assert steady(workload(0.0, 1, None)) == LAS_QUEUE_THRESHOLDS[0]
    assert steady(workload(LAS_QUEUE_THRESHOLDS[0], 1, None)) == LAS_QUEUE_THRESHOLDS[1]
    assert steady(workload(LAS_QUEUE_THRESHOLDS[-1], 1, None)) == math.inf


def _state(i: int, w: Workload, start: float) -> JobState:
    sj = job(w.id, w.submit_time, 1e9, w.tasks[0].gpu.count)
    sj = replace(sj, workload=w)
    st_ = JobState(i, sj, 0, JobRecord(w.id, "p0", sj.gpus, w.submit_time, 1e9))
    st_.run_start = start
    st_.wl = replace(w, phase=WorkloadPhase.RUNNING, start_time=start)
    return st_


@settings(max_examples=150, deadline=None)
@given(
    st.sampled_from(["las", "srtf"]),
    st.lists(
        st.tuples(
            st.sampled_from(["start", "stop", "check"]),
            st.integers(0, 7),  # which job
            st.floats(0, 3000, allow_nan=False),  # time step
            attained,  # attained service at start / first pending key's attained
            gpus,
            st.floats(100, 1e5, allow_nan=False),  # expected duration
        ),
        max_size=40,
    ),
)
def test_running_keys_answer_as_brute_force(
    order: str, ops: list[tuple[str, int, float, float, int, float]]
) -> None:
    jkey = JOB_ORDERS[order]
    keys = RunningKeys(jkey, KEY_STEADY_BELOW[order])
    running: dict[int, JobState] = {}
    now = 0.0
    for op, i, step, a, g, expected in ops:
        now += step
        if op == "start" and i not in running:
            s = _state(i, workload(a, g, expected, f"w{i}", submit=float(i)), now)
            running[i] = s
            keys.start(s, now)
        elif op == "stop" and i in running:
            keys.stop(running.pop(i))
        elif op == "check":
            first = jkey(workload(a, g, expected, "p", submit=3.5))
            truth = any(first < jkey(attained_now(s, now)) for s in running.values())
            assert keys.any_after(first, now) == truth


@given(attained, st.floats(0, 1e5, allow_nan=False), st.floats(0, 1e5, allow_nan=False), gpus)
def test_a_running_view_reads_as_the_refreshed_copy(a: float, start: float, ran: float, g: int) -> None:
    w = replace(workload(a, g, 1000.0), phase=WorkloadPhase.RUNNING, start_time=start)
    clock = Clock()
    view = running_view(w, clock, start, float(g))
    clock.now = start + ran
    copy = with_attained(w, a + (clock.now - start) * g)
    for f in fields(Workload):
        assert getattr(view, f.name) == getattr(copy, f.name), f.name
    assert isinstance(view, Workload)
    for order in ("las", "srtf"):
        assert JOB_ORDERS[order](view) == JOB_ORDERS[order](copy)
