"""Skipping cycles must never change the outcome: compare against a run that skips nothing."""

from __future__ import annotations

from typing import Any

import pytest

from aifab.sim.engine import Simulator
from aifab.sim.metrics import compute_metrics
from aifab.sim.policies import POLICIES
from aifab.sim.traces.synthetic import synthetic_scenario

from ._helpers import job, scenario


class NoSkip(Simulator):
    """Runs a cycle at every distinct event time with pending work (rules 2-4 off)."""

    def _nothing_can_change(self) -> bool:
        return False

    def _cycle(self) -> None:
        self.dirty = True
        super()._cycle()


def summary(sim: Simulator) -> dict[str, float]:
    m = compute_metrics(sim.run()).summary
    return {k: v for k, v in m.items() if k not in ("wall_s", "events_per_s", "events", "cycles")}


@pytest.mark.parametrize("policy", ["fifo", "fifo-backfill", "static", "tiresias", "srtf", "kai", "aifab"])
def test_skipping_is_invisible(policy: str) -> None:
    pytest.importorskip("aifab.scheduler", reason="needs run_cycle")
    sc = synthetic_scenario(seed=3, jobs=150, nodes=3, projects=3, load=1.3)
    fast = Simulator(sc, POLICIES[policy], policy=policy)
    slow = NoSkip(sc, POLICIES[policy], policy=policy)
    assert summary(fast) == summary(slow)
    config = POLICIES[policy]
    if "reclaim" in config.actions:
        # Rules 3 and 4 never apply to reclaiming policies; rule 5 does, on this overloaded trace.
        assert fast.counters["cycles_skipped_inert"] > 0
        assert fast.counters["cycles"] < slow.counters["cycles"]
    elif config.preempt_by_job_order:
        # Rules 8 and 9: nobody outranks a running job, or preemption is blocked.
        assert fast.counters["cycles_skipped_blocked"] > 0
        assert fast.counters["cycles"] < slow.counters["cycles"]
    else:
        assert fast.counters["cycles"] < slow.counters["cycles"]


def outcome(sim: Simulator) -> tuple[object, ...]:
    """Everything a replay decides: every job's start, end, evictions and lost work, and the
    timeline (what summary() reduces to numbers)."""
    out = sim.run()
    jobs = [(r.id, r.first_start, r.end, r.evictions, r.lost_gpu_seconds) for r in out.jobs]
    tl = out.timeline
    return jobs, out.pending_intervals, tl.t, tl.p, tl.alloc, tl.pend


def _head_of_line_scenario() -> Any:
    """Strict FIFO with big gangs at the head while small jobs come and go (rule 6)."""
    jobs = []
    for i in range(60):
        big = i % 10 == 3
        jobs.append(job(f"j{i}", submit=i * 50.0, work=400.0 + (i * 37) % 900, gpus=16 if big else 1 + i % 3))
    return scenario(jobs, nodes=3, gpus=8)


def _static_scenario() -> Any:
    """Static quotas with jobs above their project's quota arriving (rule 7)."""
    jobs = []
    for i in range(80):
        q = "p0" if i % 3 else "p1"
        jobs.append(job(f"j{i}", submit=i * 30.0, work=300.0 + (i * 53) % 700, gpus=1 + i % 4, queue=q))
    return scenario(jobs, nodes=2, gpus=8, deserved={"p0": 10, "p1": 6})


@pytest.mark.parametrize(
    ("make", "policy"),
    [(_head_of_line_scenario, "fifo"), (_static_scenario, "static"), (_static_scenario, "fifo")],
)
def test_head_of_line_and_static_rules_are_invisible(make: Any, policy: str) -> None:
    pytest.importorskip("aifab.scheduler", reason="needs run_cycle")
    sc = make()
    fast = Simulator(sc, POLICIES[policy], policy=policy)
    slow = NoSkip(sc, POLICIES[policy], policy=policy)
    assert outcome(fast) == outcome(slow)
    assert fast.counters["cycles"] < slow.counters["cycles"]


@pytest.mark.parametrize("policy", ["fifo", "fifo-backfill", "static", "tiresias", "srtf", "kai", "aifab"])
@pytest.mark.parametrize("seed", [5, 11])
def test_skipping_keeps_every_decision(policy: str, seed: int) -> None:
    pytest.importorskip("aifab.scheduler", reason="needs run_cycle")
    sc = synthetic_scenario(seed=seed, jobs=120, nodes=3, projects=3, load=1.5)
    fast = Simulator(sc, POLICIES[policy], policy=policy)
    slow = NoSkip(sc, POLICIES[policy], policy=policy)
    assert outcome(fast) == outcome(slow)


def _gangs_behind_small_jobs() -> Any:
    """Preemption by job order with two-node gangs (2 x 8 GPUs) among small jobs on three
    8-GPU nodes: a gang that has waited long outranks running small jobs, yet often one node
    too few could be freed whole (``_TOO_FEW_NODES``), which leaves preemption blocked."""
    jobs = []
    for i in range(90):
        gang = i % 6 == 2
        jobs.append(
            job(
                f"j{i}",
                submit=i * 40.0,
                work=500.0 + (i * 61) % 1300,
                gpus=16 if gang else 1 + i % 5,
                tasks=2 if gang else 1,
            )
        )
    return scenario(jobs, nodes=3, gpus=8)


@pytest.mark.parametrize("policy", ["tiresias", "srtf"])
def test_blocked_gangs_skip_cycles_invisibly(policy: str) -> None:
    pytest.importorskip("aifab.scheduler", reason="needs run_cycle")
    sc = _gangs_behind_small_jobs()
    fast = Simulator(sc, POLICIES[policy], policy=policy)
    slow = NoSkip(sc, POLICIES[policy], policy=policy)
    assert outcome(fast) == outcome(slow)
    assert fast.counters["cycles_skipped_blocked"] > 0
