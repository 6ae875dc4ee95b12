"""Policy knobs through run_cycle: time-based fairness, queue order, no-fairness preemption."""

from __future__ import annotations

from aifab.core import ClusterSnapshot, EvictionCause, QueueTree, Resources, gpu_queue
from aifab.scheduler import Fairness, SchedulerConfig, run_cycle

from .helpers import Placer, nodes, running, workload


def _two_equal_queues(history: dict[str, Resources]) -> ClusterSnapshot:
    ws = [workload(f"a{i}", "a", submit_time=i) for i in range(8)]
    ws += [workload(f"b{i}", "b", submit_time=i) for i in range(8)]
    return ClusterSnapshot(
        nodes(1, 6), QueueTree([gpu_queue("a"), gpu_queue("b")]), tuple(ws), usage_history=history
    )


def test_time_based_fairness_favours_the_queue_that_used_less() -> None:
    # 6 GPUs, a and b alike. a used 6 GPUs recently: weight 1/(1+1) = 0.5 vs 1 -> a gets 2, b 4.
    snap = _two_equal_queues({"a": Resources(gpu=6000)})
    on = run_cycle(snap, SchedulerConfig(placement="binpack", time_fairness_half_life=3600.0))
    assert on.fair_shares["a"].gpu == 2000 and on.fair_shares["b"].gpu == 4000
    assert sum(1 for b in on.binds if b.workload_id.startswith("b")) == 4
    off = run_cycle(snap, SchedulerConfig(placement="binpack"))  # half-life None: history ignored
    assert off.fair_shares["a"].gpu == 3000 and off.fair_shares["b"].gpu == 3000


def test_priority_queue_order_serves_the_high_priority_queue_first() -> None:
    ws = (workload("lo", "lo", gpus=4), workload("hi", "hi", gpus=4))
    tree = QueueTree([gpu_queue("lo"), gpu_queue("hi", priority=10)])
    snap = ClusterSnapshot(nodes(1, 4), tree, ws)
    r = run_cycle(
        snap, SchedulerConfig(placement="binpack", queue_order="priority", fairness=Fairness.STATIC)
    )
    # Static quotas of 0 refuse both; with fair share the priority queue wins the idle GPUs.
    assert not r.binds
    r = run_cycle(snap, SchedulerConfig(placement="binpack", queue_order="priority"))
    assert r.bound_workloads() == {"hi"}


def test_without_fairness_preemption_crosses_queues_by_priority() -> None:
    ns = nodes(1, 2)
    placer = Placer(ns)
    low = running(workload("low", "a", gpus=2, priority=25), placer, "n0")
    snap = ClusterSnapshot(
        ns, QueueTree([gpu_queue("a"), gpu_queue("b")]), (low, workload("hi", "b", gpus=2, priority=100))
    )
    r = run_cycle(snap, SchedulerConfig(placement="binpack", fairness=Fairness.NONE))
    assert [(e.workload_id, e.cause) for e in r.evictions] == [("low", EvictionCause.PREEMPT)]
    assert r.bound_workloads() == {"hi"}
