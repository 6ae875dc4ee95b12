"""Metrics on hand-made timelines."""

from __future__ import annotations

import pytest

from aifab.sim.metrics import compute_metrics, jain_index, water_fill
from aifab.sim.outcome import JobRecord, SimOutcome, Timeline


def outcome(
    jobs: list[JobRecord], rows: list[tuple[float, int, float, float]], intervals, deserved
) -> SimOutcome:  # type: ignore[no-untyped-def]
    tl = Timeline()
    for t, p, a, d in rows:
        tl.t.append(t)
        tl.p.append(p)
        tl.alloc.append(a)
        tl.pend.append(d)
    return SimOutcome(
        scenario="hand",
        policy="x",
        projects=[f"p{i}" for i in range(len(deserved))],
        deserved=deserved,
        capacity=8.0,
        jobs=jobs,
        pending_intervals=intervals,
        timeline=tl,
        counters={"events": 10, "preemptions": 0},
        wall_seconds=1.0,
    )


def test_two_projects_by_hand() -> None:
    jobs = [
        JobRecord("a", "p0", 4, 0, 200, first_start=0, end=200),
        JobRecord("b", "p1", 4, 0, 100, first_start=100, end=200),
    ]
    rows = [
        (0, 0, 0, 4),
        (0, 0, 4, -4),  # a arrives and starts at once
        (0, 1, 0, 4),  # b arrives, waits
        (100, 1, 4, -4),  # b starts
        (200, 0, -4, 0),
        (200, 1, -4, 0),
    ]
    m = compute_metrics(outcome(jobs, rows, [(0, 0, 0), (1, 0, 100)], [4.0, 4.0])).summary
    assert m["avg_jct_s"] == 200 and m["avg_wait_s"] == 50 and m["makespan_s"] == 200
    assert m["gpu_alloc_pct"] == pytest.approx(75.0)  # (4*100 + 8*100) / (8*200)
    assert m["idle_gpus_while_pending"] == pytest.approx(4.0)  # 4 idle while b waited
    # Reference fair share is 4 + 4 throughout: p0 got 1.0 of it, p1 0.5.
    assert m["min_share_over_fair"] == pytest.approx(0.5)
    assert m["jain"] == pytest.approx(2.25 / 2.5)
    assert m["fair_deviation_pct"] == pytest.approx(100 * 200 / 1600)
    # a: instant start within quota (kept); b: 100 s inside its unused quota (broken).
    assert m["quota_cases"] == 2
    assert m["quota_promise_pct"] == pytest.approx(50.0)


def test_quota_promise_one_case_per_pending_period() -> None:
    # Project p0 deserves 4. x (2 GPUs) waits 0-200; y1, y2 (2 GPUs each) run from 30,
    # y2 ends at 50. x is eligible 0-30 (30 s), not 30-50 (4 + 2 > 4), eligible again
    # 50-200 (150 s > 60 s: broken). y1, y2 start the instant they arrive, within quota.
    jobs = [
        JobRecord("x", "p0", 2, 0, 10, first_start=200, end=210),
        JobRecord("y1", "p0", 2, 30, 500, first_start=30, end=530),
        JobRecord("y2", "p0", 2, 30, 20, first_start=30, end=50),
    ]
    rows = [
        (0, 0, 0, 2),
        (30, 0, 0, 2),
        (30, 0, 2, -2),
        (30, 0, 0, 2),
        (30, 0, 2, -2),
        (50, 0, -2, 0),
        (200, 0, 2, -2),
        (210, 0, -2, 0),
        (530, 0, -2, 0),
    ]
    intervals = [(1, 30, 30), (2, 30, 30), (0, 0, 200)]
    m = compute_metrics(outcome(jobs, rows, intervals, [4.0, 4.0])).summary
    # One case per pending period: x's is broken (150 s eligible), y1's and y2's kept.
    assert m["quota_cases"] == 3
    assert m["quota_promise_pct"] == pytest.approx(200 / 3)


def test_quota_promise_short_eligibility_is_kept() -> None:
    # z (2 GPUs) waits 0-100; its project (deserves 2) frees 2 GPUs at 40 and another of its
    # jobs takes them at 70: eligible 30 s only, then the quota is used: kept.
    jobs = [
        JobRecord("w", "p0", 2, 0, 40, first_start=0, end=40),
        JobRecord("v", "p0", 2, 0, 500, first_start=70, end=570),
        JobRecord("z", "p0", 2, 0, 10, first_start=570, end=580),
    ]
    rows = [
        (0, 0, 0, 2),
        (0, 0, 2, -2),
        (0, 0, 0, 2),
        (0, 0, 0, 2),
        (40, 0, -2, 0),
        (70, 0, 2, -2),
        (570, 0, -2, 0),
        (570, 0, 2, -2),
        (580, 0, -2, 0),
    ]
    intervals = [(0, 0, 0), (1, 0, 70), (2, 0, 570)]
    m = compute_metrics(outcome(jobs, rows, intervals, [2.0])).summary
    # w: instant, kept. v: eligible 40-70 (30 s), started: kept. z: eligible 40-70 (kept
    # stretch) and starts within quota at 570: kept.
    assert m["quota_cases"] == 3
    assert m["quota_promise_pct"] == pytest.approx(100.0)


def test_jain_index() -> None:
    assert jain_index([1, 1, 1]) == pytest.approx(1.0)
    assert jain_index([1, 0, 0, 0]) == pytest.approx(0.25)
    assert jain_index([1, 2]) == pytest.approx(9 / 10)


def test_water_fill_gives_deserved_then_splits_the_rest() -> None:
    import numpy as np

    demand = np.array([[10.0, 1.0, 0.0], [2.0, 2.0, 2.0]])
    fair = water_fill(demand, np.array([2.0, 2.0, 2.0]), np.array([8.0, 8.0]))
    assert fair[0].tolist() == pytest.approx([7.0, 1.0, 0.0])
    assert fair[1].tolist() == pytest.approx([2.0, 2.0, 2.0])
