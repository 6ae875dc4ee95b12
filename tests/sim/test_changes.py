"""The simulator hands each cycle the changes since the last one (WorkloadChanges): the memo
then follows them instead of comparing workload lists. That must never change a decision."""

from __future__ import annotations

import gc
from dataclasses import replace

import pytest

from aifab.core.decisions import CycleResult
from aifab.core.snapshot import ClusterSnapshot
from aifab.core.workloads import GpuRequest, TaskRequest, Workload
from aifab.scheduler import SchedulerConfig, run_cycle
from aifab.scheduler.memo import CycleMemo
from aifab.sim.engine import Simulator
from aifab.sim.model import FailureModel, SimConfig
from aifab.sim.policies import POLICIES
from aifab.sim.state import ActiveWorkloads, Listing
from aifab.sim.traces.synthetic import synthetic_scenario

from .test_skipping import outcome


class _Watched:
    """The production cycle with a memo, noting what each snapshot carried and whether the
    cycle had to list the workloads."""

    def __init__(self) -> None:
        self.memo = CycleMemo()
        self.with_changes = 0
        self.listed = 0

    def __call__(self, snap: ClusterSnapshot, config: SchedulerConfig) -> CycleResult:
        result = run_cycle(snap, config, memo=self.memo)
        self.with_changes += snap.changes is not None
        assert isinstance(snap.workloads, Listing)
        self.listed += snap.workloads._items is not None
        return result


def _by_comparing(memo: CycleMemo | None) -> object:
    """The production cycle on the same snapshots as plain tuples without changes: a memo, if
    any, compares the lists."""

    def cycle(snap: ClusterSnapshot, config: SchedulerConfig) -> CycleResult:
        plain = replace(snap, workloads=tuple(snap.workloads), changes=None)
        return run_cycle(plain, config, memo=memo)

    return cycle


@pytest.mark.parametrize("policy", ["fifo", "fifo-backfill", "static", "tiresias", "srtf", "kai", "aifab"])
@pytest.mark.parametrize("failures", [False, True])
def test_changes_keep_every_decision(policy: str, failures: bool) -> None:
    sim = SimConfig(failures=FailureModel(mtbf=20_000.0, repair=2_000.0, seed=4) if failures else None)
    sc = synthetic_scenario(seed=7, jobs=120, nodes=3, projects=3, load=1.5, sim=sim)
    config = POLICIES[policy]
    watched = _Watched()
    fast = Simulator(sc, config, policy=policy, scheduler=watched)
    got = outcome(fast)
    assert got == outcome(Simulator(sc, config, policy=policy, scheduler=_by_comparing(CycleMemo())))  # type: ignore[arg-type]
    assert got == outcome(Simulator(sc, config, policy=policy, scheduler=_by_comparing(None)))  # type: ignore[arg-type]
    assert watched.with_changes == fast.counters["cycles"] > 10
    if not failures:
        # Only the first cycle lists the workloads (a node failure changes the node tuple, which
        # makes the memo rebuild from the listing), and those that consolidate (which walks the
        # running workloads node by node in snapshot order).
        if "consolidate" in config.actions:
            assert 1 <= watched.listed < watched.with_changes
        else:
            assert watched.listed == 1


def test_active_workloads_report_what_changed() -> None:
    def wl(wid: str) -> Workload:
        return Workload(id=wid, queue="p", tasks=(TaskRequest(GpuRequest.whole(1)),))

    live = ActiveWorkloads()
    a, b, c = wl("a"), wl("b"), wl("c")
    live.put(a)
    live.put(b)
    first, ch1 = live.snapshot()
    assert list(first) == [a, b] and ch1.gone == () and ch1.new == (a, b)
    a2 = replace(a)
    live.put(a2)  # a's job changed: a is gone, a2 is new, in a's place
    live.put(c)
    live.remove("c")  # came and went between snapshots: neither gone nor new
    live.remove("b")
    second, ch2 = live.snapshot()
    assert ch2.since is ch1.token
    assert ch2.gone == (a, b) and ch2.new == (a2,)
    assert len(second) == 1 and list(second) == [a2]


def test_a_listing_cannot_be_read_after_its_cycle() -> None:
    live = ActiveWorkloads()
    live.put(Workload(id="a", queue="p", tasks=(TaskRequest(GpuRequest.whole(1)),)))
    read, _ = live.snapshot()
    assert [w.id for w in read] == ["a"]
    read.close()
    assert read[0].id == "a"  # what it listed during its cycle stays
    unread, _ = live.snapshot()
    unread.close()
    live.remove("a")
    with pytest.raises(RuntimeError, match="after the cycle"):
        list(unread)


@pytest.mark.parametrize("policy", list(POLICIES))
def test_a_replay_leaves_no_reference_cycles(policy: str) -> None:
    """Simulator.run pauses the cyclic garbage collector: that is only sound while the event
    loop and every cycle free what they make by reference counting alone."""
    sim = SimConfig(failures=FailureModel(mtbf=20_000.0, repair=2_000.0, seed=4))
    sc = synthetic_scenario(seed=7, jobs=120, nodes=3, projects=3, load=1.5, sim=sim)
    Simulator(sc, POLICIES[policy], policy=policy).run()  # first-time imports and caches
    gc.collect()
    was_on = gc.isenabled()
    gc.disable()
    try:
        sim_run = Simulator(sc, POLICIES[policy], policy=policy)
        sim_run.run()
        del sim_run
        assert gc.collect() == 0
    finally:
        if was_on:
            gc.enable()
    assert gc.isenabled() == was_on
