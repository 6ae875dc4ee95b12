"""The event loop against hand-computed timelines (with a stand-in scheduler)."""

from __future__ import annotations

import pytest

from aifab.core.decisions import Bind, CycleResult, Evict, EvictionCause
from aifab.core.snapshot import ClusterSnapshot
from aifab.core.workloads import WorkloadPhase
from aifab.scheduler.config import SchedulerConfig
from aifab.sim.engine import SimulationError, Simulator, simulate
from aifab.sim.model import FailureModel, SimConfig
from aifab.sim.policies import POLICIES
from tests.sim._fake_scheduler import greedy_cycle
from tests.sim._helpers import job, scenario


def jcts(outcome) -> dict[str, float]:  # type: ignore[no-untyped-def]
    return {r.id: r.end - r.submit for r in outcome.jobs}


THREE = [job("a", 0, 100, 8), job("b", 10, 50, 16, tasks=2), job("c", 20, 30, 4)]


def test_fifo_without_backfill_blocks_behind_the_gang() -> None:
    out = simulate(scenario(THREE), SchedulerConfig(backfill=False), scheduler=greedy_cycle)
    # a runs 0-100; b needs both nodes: 100-150; c waits behind b: 150-180.
    assert jcts(out) == {"a": 100, "b": 140, "c": 160}
    starts = {r.id: r.first_start for r in out.jobs}
    assert starts == {"a": 0, "b": 100, "c": 150}


def test_backfill_lets_the_small_job_through() -> None:
    out = simulate(scenario(THREE), SchedulerConfig(backfill=True), scheduler=greedy_cycle)
    # c fits on the second node at 20 and is done at 50, before a frees its node at 100.
    assert jcts(out) == {"a": 100, "b": 140, "c": 30}
    assert out.counters["binds"] == 3


def preempting_cycle(snapshot: ClusterSnapshot, config: SchedulerConfig) -> CycleResult:
    """Whole-node jobs on one node: a pending higher-priority job evicts the running one."""
    running = [w for w in snapshot.workloads if w.phase is WorkloadPhase.RUNNING]
    pending = sorted(
        (w for w in snapshot.workloads if w.phase is WorkloadPhase.PENDING), key=lambda w: (-w.priority, w.id)
    )
    if not pending:
        return CycleResult()
    top = pending[0]
    bind = Bind(top.id, 0, "n0", tuple(range(8)), 1000, 0)
    if not running:
        return CycleResult(binds=(bind,))
    victim = running[0]
    if top.priority > victim.priority:
        # The scheduler's own view of the loss must match what the simulator will charge.
        assert victim.work_since_checkpoint(snapshot.now) == pytest.approx(400.0)
        return CycleResult(
            evictions=(Evict(victim.id, EvictionCause.PREEMPT, "test", top.id),), binds=(bind,)
        )
    return CycleResult()


def test_eviction_restarts_from_checkpoint_plus_overhead() -> None:
    jobs = [job("low", 0, 5000, 8, priority=10), job("high", 4000, 1000, 8, priority=90)]
    sc = scenario(jobs, nodes=1, restart_overhead=60.0)
    out = simulate(sc, SchedulerConfig(), scheduler=preempting_cycle)
    rec = {r.id: r for r in out.jobs}
    # low: 4000 s of progress, checkpoint at 3600 -> 400 s lost, 1400 s left; high runs
    # 4000-5000; low restarts at 5000, restores for 60 s, finishes at 5000 + 60 + 1400.
    assert rec["high"].end == 5000
    assert rec["low"].end == 6460
    assert rec["low"].evictions == 1
    assert rec["low"].lost_gpu_seconds == pytest.approx(400 * 8)
    assert out.counters["preemptions"] == 1
    # Allocated GPU-time = useful work + lost, exactly.
    allocated = (4000 + (6460 - 5000)) * 8
    assert allocated == 5000 * 8 + rec["low"].lost_gpu_seconds + 60 * 8


def test_eviction_without_checkpoints_restarts_from_scratch() -> None:
    jobs = [job("low", 0, 5000, 8, priority=10, checkpoint=None), job("high", 400, 1000, 8, priority=90)]
    sc = scenario(jobs, nodes=1, restart_overhead=0.0)

    def cycle(snapshot: ClusterSnapshot, config: SchedulerConfig) -> CycleResult:
        running = [w for w in snapshot.workloads if w.phase is WorkloadPhase.RUNNING]
        pending = sorted((w for w in snapshot.workloads if not w.is_running), key=lambda w: -w.priority)
        if not pending:
            return CycleResult()
        bind = Bind(pending[0].id, 0, "n0", tuple(range(8)), 1000, 0)
        if running and pending[0].priority > running[0].priority:
            return CycleResult(evictions=(Evict(running[0].id, EvictionCause.PREEMPT, "t"),), binds=(bind,))
        return CycleResult(binds=() if running else (bind,))

    rec = {r.id: r for r in simulate(sc, SchedulerConfig(), scheduler=cycle).jobs}
    assert rec["low"].end == 1400 + 5000
    assert rec["low"].lost_gpu_seconds == 400 * 8


class _OneFailure(Simulator):
    """Node n0 fails once at t=100 (instead of random draws)."""

    def _next_failure(self, after: float) -> float:
        if not hasattr(self, "_drawn"):
            self._drawn = 0
        self._drawn += 1
        return 100.0 if self._drawn == 1 else float("inf")


def test_node_failure_requeues_and_restarts_elsewhere() -> None:
    jobs = [job("a", 0, 1000, 8), job("b", 50, 10, 8)]
    sim = SimConfig(restart_overhead=60.0, failures=FailureModel(mtbf=1.0, repair=500.0, seed=0))
    sc = scenario(jobs, nodes=2)
    sc = type(sc)(sc.name, sc.nodes, sc.queues, sc.jobs, sim)
    out = _OneFailure(sc, SchedulerConfig(), scheduler=greedy_cycle).run()
    rec = {r.id: r for r in out.jobs}
    # a on n0 from 0; b on n1 50-60; n0 fails at 100: a loses 100 s (no checkpoint yet) and
    # restarts at 100 on n1 with 60 s restore: done at 100 + 60 + 1000.
    assert rec["b"].end == 60
    assert rec["a"].end == 1160
    assert rec["a"].lost_gpu_seconds == 100 * 8
    assert out.counters["failure_evictions"] == 1 and out.counters["node_failures"] == 1
    assert out.timeline.cap_t == [100.0, 600.0] and out.timeline.cap == [-8.0, 8.0]


def test_oversubscribing_bind_is_a_bug() -> None:
    def bad(snapshot: ClusterSnapshot, config: SchedulerConfig) -> CycleResult:
        return CycleResult(
            binds=tuple(
                Bind(w.id, 0, "n0", tuple(range(8)), 1000, 0) for w in snapshot.workloads if not w.is_running
            )
        )

    sc = scenario([job("a", 0, 100, 8), job("b", 0, 100, 8)], nodes=1)
    with pytest.raises(SimulationError, match="oversubscribed"):
        simulate(sc, SchedulerConfig(), scheduler=bad)


def test_job_that_never_fits_is_reported() -> None:
    sc = scenario([job("huge", 0, 100, 8), job("ok", 5, 10, 4)], nodes=1, gpus=4)
    with pytest.raises(SimulationError, match="can never start"):
        simulate(sc, SchedulerConfig(), scheduler=greedy_cycle, strict=True)
    out = simulate(sc, SchedulerConfig(), scheduler=greedy_cycle)
    assert out.counters["unfinished"] == 1
    assert {r.id: r.end for r in out.jobs} == {"huge": None, "ok": 15}
    # The never-started job's wait is still on record (until the replay stopped).
    assert out.open_intervals == [(0, 0.0, 15.0)]


@pytest.mark.parametrize("policy", ["static", "fifo-backfill", "kai", "tiresias"])
def test_job_that_never_fits_ends_a_replay_with_node_failures(policy: str) -> None:
    """Failure events never run out; the replay still ends once nothing else can happen."""
    failures = FailureModel(mtbf=300.0, repair=50.0, seed=1)
    jobs = [job("huge", 0, 100, 8), job("ok", 5, 1000, 4), job("late", 2000, 10, 2)]
    sc = scenario(jobs, nodes=2, gpus=4, deserved={"p0": 6}, failures=failures)  # type: ignore[arg-type]
    out = simulate(sc, POLICIES[policy])
    assert out.counters["unfinished"] == 1
    assert {r.id for r in out.jobs if r.end is None} == {"huge"}
    assert out.counters["node_failures"] > 0
    with pytest.raises(SimulationError, match="can never start"):
        simulate(sc, POLICIES[policy], strict=True)


def test_cycles_are_skipped_when_nothing_changed() -> None:
    # Ten jobs at the same instant: one coalesced cycle binds what fits; the rest wait for
    # completions, and no cycle runs in between.
    jobs = [job(f"j{i}", 0, 100 * (i + 1), 8) for i in range(10)]
    out = simulate(scenario(jobs, nodes=2), SchedulerConfig(backfill=False), scheduler=greedy_cycle)
    assert out.counters["cycles"] <= 10
    assert all(r.end is not None for r in out.jobs)


def test_time_fairness_history_is_a_decayed_average() -> None:
    seen: list[dict[str, float]] = []

    def cycle(snapshot: ClusterSnapshot, config: SchedulerConfig) -> CycleResult:
        seen.append({q: r.gpu / 1000 for q, r in snapshot.usage_history.items()})
        return greedy_cycle(snapshot, config)

    # 8 GPUs busy from 0 to 1000 (one half-life); the second job arrives at 1000.
    sc = scenario([job("a", 0, 1000, 8), job("b", 1000, 10, 8)], nodes=1)
    simulate(sc, SchedulerConfig(time_fairness_half_life=1000.0), scheduler=cycle)
    assert seen[0] == {}
    assert seen[-1]["p0"] == pytest.approx(4.0, abs=0.01)  # 8 x (1 - 2^-1)
