"""The public entry point: never raises for a workload, resolves plugins by name, is deterministic."""

from __future__ import annotations

import pytest

from aifab.core import ClusterSnapshot, QueueTree, ReasonCode, ValidationError, Workload, gpu_queue
from aifab.scheduler import (
    ACTIONS,
    JOB_ORDERS,
    NODE_SCORERS,
    QUEUE_ORDERS,
    VICTIM_ORDERS,
    SchedulerConfig,
    run_cycle,
)

from .helpers import Placer, apply, nodes, running, workload


def snap(*ws: Workload, gpus: int = 8, count: int = 1) -> ClusterSnapshot:
    return ClusterSnapshot(nodes(count, gpus), QueueTree([gpu_queue("a", gpus * count), gpu_queue("d")]), ws)


def test_unplaceable_workloads_are_explained_not_raised() -> None:
    s = snap(
        workload("huge", "a", gpus=16),
        workload("lost", "nowhere"),
        workload("cpu-hog", "a", gpus=0, cpu=10**9),
    )
    r = run_cycle(s)
    assert not r.binds
    assert r.pending["huge"].code is ReasonCode.INSUFFICIENT_CAPACITY
    assert r.pending["lost"].code is ReasonCode.UNKNOWN_QUEUE
    assert "queue nowhere is not known" in r.pending["lost"].message
    assert r.pending["cpu-hog"].code is ReasonCode.INSUFFICIENT_CAPACITY


def test_empty_cluster_and_empty_snapshot() -> None:
    r = run_cycle(ClusterSnapshot((), QueueTree([gpu_queue("a")]), (workload("w", "a"),)))
    assert r.pending["w"].code is ReasonCode.INSUFFICIENT_CAPACITY
    assert run_cycle(ClusterSnapshot((), QueueTree([]), ())).binds == ()


def test_elastic_gang_binds_at_least_min_available() -> None:
    r = run_cycle(
        snap(workload("e", "a", gpus=4, tasks=3, min_available=2)), SchedulerConfig(placement="binpack")
    )
    assert sorted(b.task_index for b in r.binds) == [0, 1]


def test_default_policy_and_external_placement_policies_work() -> None:
    for name in [
        "aifab",
        "fgd",
        "bestfit",
        "gpupacking",
        "random",
        "binpack",
        "spread",
        "topology",
        "nonexistent",
    ]:
        s = snap(*(workload(f"w{i}", "a", gpus=g) for i, g in enumerate([1, 2, 0.5, 4])), count=2)
        r = run_cycle(s, SchedulerConfig(placement=name))
        assert r.bound_workloads() == {"w0", "w1", "w2", "w3"}, name
        assert run_cycle(s, SchedulerConfig(placement=name)) == r


def test_unknown_plugin_names_are_config_errors() -> None:
    with pytest.raises(ValidationError):
        run_cycle(snap(), SchedulerConfig(job_order="nope"))
    with pytest.raises(ValidationError):
        run_cycle(snap(), SchedulerConfig(actions=("allocate", "dance")))


def test_registries_name_every_plugin() -> None:
    assert set(ACTIONS) == {"allocate", "consolidate", "reclaim", "preempt"}
    assert {"fair_share", "priority"} <= set(QUEUE_ORDERS)
    assert {"priority_fifo", "fifo", "las", "srtf"} <= set(JOB_ORDERS)
    assert {"cost_aware", "priority", "newest"} <= set(VICTIM_ORDERS)
    assert {"binpack", "spread", "topology"} <= set(NODE_SCORERS)


def test_repeated_cycles_converge_and_stay_identical() -> None:
    ns = nodes(2, 4)
    placer = Placer(ns)
    ws = [running(workload(f"r{i}", "b", gpus=2), placer, "n0") for i in range(2)]
    ws += [workload(f"p{i}", "a", gpus=1, submit_time=i) for i in range(6)]
    s = ClusterSnapshot(ns, QueueTree([gpu_queue("a", 6), gpu_queue("b", 2)]), tuple(ws), now=10.0)
    results = []
    for _ in range(4):
        r = run_cycle(s)
        assert run_cycle(s) == r
        results.append(r)
        s = apply(s, r, now=s.now + 1)
    assert not results[-1].binds and not results[-1].evictions
    running_ids = {w.id for w in s.workloads if w.is_running}
    assert {f"p{i}" for i in range(6)} <= running_ids  # a reclaimed up to its fair share


def test_stats_and_fair_shares_are_reported() -> None:
    r = run_cycle(snap(workload("w", "a")))
    assert r.stats["binds"] == 1 and r.fair_shares["a"].gpu == 1000


def test_cyclic_gc_state_is_restored() -> None:
    import gc

    was = gc.isenabled()
    try:
        gc.enable()
        run_cycle(snap(workload("w", "a")))
        assert gc.isenabled()
        gc.disable()
        run_cycle(snap(workload("w", "a")))
        assert not gc.isenabled()
    finally:
        (gc.enable if was else gc.disable)()


_DETERMINISM_SCRIPT = """
from aifab.core import ClusterSnapshot, QueueTree, gpu_queue, uniform_node, Workload, TaskRequest, GpuRequest
from aifab.scheduler import run_cycle, SchedulerConfig
nodes = tuple(uniform_node(f"n{i}", 4, topology={"rack": f"r{i % 3}"}) for i in range(9))
qs = QueueTree([gpu_queue(f"q{i}", 4, weight=i + 1) for i in range(5)])
ws = tuple(
    Workload(id=f"w{i}", queue=f"q{i % 5}", tasks=(TaskRequest(GpuRequest.parse([0.5, 1, 2, 4][i % 4])),) * (1 + i % 3),
             gpu_models=frozenset({"A100-80GB", "H100"}) if i % 7 == 0 else frozenset(), submit_time=float(i % 11))
    for i in range(60)
)
for placement in ("binpack", "topology", "spread"):
    r = run_cycle(ClusterSnapshot(nodes, qs, ws), SchedulerConfig(placement=placement))
    print(r.binds, r.evictions, sorted(r.pending.items()), sorted(r.fair_shares.items()))
"""


def test_same_output_whatever_the_hash_seed() -> None:
    import subprocess
    import sys

    outs = {
        subprocess.run(
            [sys.executable, "-c", _DETERMINISM_SCRIPT],
            env={"PYTHONHASHSEED": seed, "PATH": ""},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in ("1", "2")
    }
    assert len(outs) == 1 and next(iter(outs))


def test_a_changed_workload_under_the_same_id_is_read_afresh() -> None:
    # Cycles remember what each pending workload's tasks flatten to (by object identity), so a
    # workload replaced by a new object with the same id must be read again, not remembered.
    small = workload("w", "a", gpus=1)
    assert sum(len(b.devices) for b in run_cycle(snap(small)).binds) == 1
    big = workload("w", "a", gpus=4)
    assert sum(len(b.devices) for b in run_cycle(snap(big)).binds) == 4
    assert sum(len(b.devices) for b in run_cycle(snap(small)).binds) == 1
