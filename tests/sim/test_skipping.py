"""Skipping cycles must never change the outcome: compare against a run that skips nothing."""

from __future__ import annotations

import pytest

from aifab.sim.engine import Simulator
from aifab.sim.metrics import compute_metrics
from aifab.sim.policies import POLICIES
from aifab.sim.traces.synthetic import synthetic_scenario


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
        assert fast.counters["cycles"] <= slow.counters["cycles"]
    else:
        assert fast.counters["cycles"] < slow.counters["cycles"]
