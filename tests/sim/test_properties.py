"""Hypothesis over random small clusters and job streams (with evictions and node failures)."""

from __future__ import annotations

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aifab.core.decisions import CycleResult, Evict, EvictionCause
from aifab.core.snapshot import ClusterSnapshot
from aifab.scheduler.config import SchedulerConfig
from aifab.sim.engine import simulate
from aifab.sim.metrics import compute_metrics
from aifab.sim.model import FailureModel, SimConfig
from aifab.sim.outcome import SimOutcome
from aifab.sim.traces.synthetic import synthetic_scenario
from tests.sim._fake_scheduler import greedy_cycle


def check_no_oversubscription(snapshot: ClusterSnapshot) -> None:
    used: dict[tuple[str, int], int] = {}
    up = {n.name: n for n in snapshot.nodes}
    for w in snapshot.workloads:
        assert (w.phase.value == "running") == bool(w.placements)
        for p in w.placements:
            assert up[p.node].schedulable, "a workload still runs on a down node"
            for d in p.devices:
                used[(p.node, d)] = used.get((p.node, d), 0) + p.gpu_milli
                assert used[(p.node, d)] <= 1000


def chaotic_cycle(snapshot: ClusterSnapshot, config: SchedulerConfig) -> CycleResult:
    """Greedy binds plus pseudo-random evictions that depend only on the snapshot."""
    check_no_oversubscription(snapshot)
    rng = random.Random(hash((round(snapshot.now, 3), len(snapshot.workloads))))
    running = [w for w in snapshot.workloads if w.is_running]
    victims = [w for w in running if rng.random() < 0.15]
    if victims:
        return CycleResult(evictions=tuple(Evict(w.id, EvictionCause.RECLAIM, "chaos") for w in victims))
    return greedy_cycle(snapshot, config)


def run(seed: int, jobs: int, nodes: int, failures: bool) -> SimOutcome:
    sim = SimConfig(
        restart_overhead=30.0,
        failures=FailureModel(mtbf=5_000.0, repair=1_000.0, seed=seed) if failures else None,
    )
    sc = synthetic_scenario(seed=seed, jobs=jobs, nodes=nodes, gpus_per_node=8, mean_duration=1500.0, sim=sim)
    return simulate(sc, SchedulerConfig(), scheduler=chaotic_cycle)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10_000),
    jobs=st.integers(1, 25),
    nodes=st.integers(2, 3),
    failures=st.booleans(),
)
def test_random_runs_finish_without_oversubscription(
    seed: int, jobs: int, nodes: int, failures: bool
) -> None:
    out = run(seed, jobs, nodes, failures)
    assert all(r.end is not None and r.first_start is not None for r in out.jobs)
    for r in out.jobs:
        assert r.submit <= r.first_start <= r.end  # type: ignore[operator]
        # Never faster than the work itself; lost time only adds.
        assert r.end - r.submit >= r.work - 1e-6  # type: ignore[operator]
    m = compute_metrics(out).summary
    assert 0.0 <= m["gpu_alloc_pct"] <= 100.0 + 1e-9
    assert 0.0 <= m["quota_promise_pct"] <= 100.0
    # Same seed, same everything (wall time aside).
    again = compute_metrics(run(seed, jobs, nodes, failures)).summary
    for k in m:
        if k not in ("wall_s", "events_per_s"):
            assert m[k] == again[k], k
