"""bench/time_split.py times the parts of a cycle without changing what the cycle decides, puts
the parts back afterwards, and its shares add up."""

from __future__ import annotations

from bench import time_split
from bench.time_split import Split, replay_split, timing_parts

from aifab.scheduler.actions import ACTIONS
from aifab.scheduler.memo import CycleMemo
from aifab.scheduler.session import Session
from aifab.sim.engine import simulate
from aifab.sim.policies import get_policy
from aifab.sim.scenarios import load_scenario

JOBS = 400


def test_a_timed_replay_decides_what_an_untimed_one_does() -> None:
    for policy in ("tiresias", "srtf"):
        plain = simulate(load_scenario("philly", limit_jobs=JOBS), get_policy(policy), policy=policy)
        timed = replay_split(policy, JOBS)
        expected = {k: v for k, v in plain.counters.items() if k != "wall_seconds"}
        assert timed["counters"] == expected
        assert timed["counters"]["preemptions"] > 0  # preemption ran, and was timed
        assert timed["parts_s"]["preempt"] > 0


def test_parts_add_up_to_the_wall_time_and_classes_to_the_cycles() -> None:
    got = replay_split("tiresias", JOBS)
    parts = got["parts_s"]
    assert abs(sum(parts.values()) - got["wall_s"]) < 1e-6
    assert all(seconds >= 0 for seconds in parts.values()), parts
    assert sum(int(c["cycles"]) for c in got["classes"].values()) == got["cycles"]
    free = got["if_free"]
    assert 1 <= free["preemption"] <= free["preemption and quiet cycles"] <= free["the whole scheduler"]


def test_the_wrapped_functions_are_put_back() -> None:
    before = (CycleMemo.refresh, Session.__init__, time_split.CYCLE._fair_shares, dict(ACTIONS))
    split = Split()
    try:
        with timing_parts(split):
            assert CycleMemo.refresh is not before[0] and ACTIONS["preempt"] is not before[3]["preempt"]
            raise RuntimeError("a replay that fails")
    except RuntimeError:
        pass
    after = (CycleMemo.refresh, Session.__init__, time_split.CYCLE._fair_shares, dict(ACTIONS))
    assert after == before
