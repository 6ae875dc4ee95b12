"""Shortcuts that only spare work bound to come to nothing: with each one switched off, every
cycle must decide exactly the same.

* ``room_for_whole_gpus`` turns a gang away before any node is scored when the cluster's fully
  free GPUs could not hold it (a necessary condition);
* reclaim leaves out the victims whose own queue could not let them go (``_Victims.lists``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aifab.core import ClusterSnapshot, GpuRequest, QueueTree, TaskRequest, Workload, gpu_queue, uniform_node
from aifab.scheduler import Fairness, SchedulerConfig, run_cycle
from aifab.scheduler import placer as placer_module
from aifab.scheduler.actions import evict as evict_module

from .helpers import Placer, running
from .test_invariants import CONFIGS, contended, snapshots

PREEMPTING = SchedulerConfig(
    placement="aifab", fairness=Fairness.NONE, job_order="las", preempt_by_job_order=True
)


@contextmanager
def counted(monkeypatch: pytest.MonkeyPatch, *, check: bool = True) -> Iterator[list[int]]:
    """Count the check's refusals; with ``check=False`` it lets every gang through."""
    real = placer_module.room_for_whole_gpus
    refused = [0]

    def wrapper(*args: Any) -> bool:
        ok = real(*args)
        refused[0] += not ok
        return ok or not check

    monkeypatch.setattr(placer_module, "room_for_whole_gpus", wrapper)
    try:
        yield refused
    finally:
        monkeypatch.setattr(placer_module, "room_for_whole_gpus", real)


def _every_list(self: Any, q: Any, step: int) -> list[Any]:
    return [lst for _, _, lst in self[q.name]]


def _same_with_and_without(snap: ClusterSnapshot, cfg: SchedulerConfig) -> None:
    with pytest.MonkeyPatch.context() as mp, counted(mp) as _:
        checked = run_cycle(snap, cfg)
    with pytest.MonkeyPatch.context() as mp, counted(mp, check=False) as _:
        mp.setattr(evict_module._Victims, "lists", _every_list)
        unchecked = run_cycle(snap, cfg)
    assert checked == unchecked


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(snapshots(), st.sampled_from([*CONFIGS, PREEMPTING]))
def test_shortcuts_never_change_a_cycle(snap: ClusterSnapshot, cfg: SchedulerConfig) -> None:
    _same_with_and_without(snap, cfg)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(contended(), st.sampled_from([*CONFIGS, PREEMPTING]))
def test_shortcuts_never_change_a_contended_cycle(snap: ClusterSnapshot, cfg: SchedulerConfig) -> None:
    _same_with_and_without(snap, cfg)


def _two_node_gang_snapshot() -> ClusterSnapshot:
    """Three 8-GPU nodes, two of them half used: 16 GPUs free and a node with 8 free, so the
    queue checks let a 2 x 8 gang through, yet only one node could take an 8-GPU task."""
    nodes = (uniform_node("n0", 8), uniform_node("n1", 8), uniform_node("n2", 8))
    placer = Placer(nodes)
    busy = [
        running(
            Workload(id=f"r{i}", queue="a", tasks=(TaskRequest(GpuRequest.whole(4)),)), placer, n.name, 0.0
        )
        for i, n in enumerate(nodes[1:])
    ]
    gang = Workload(id="gang", queue="a", tasks=(TaskRequest(GpuRequest.whole(8)),) * 2, submit_time=1.0)
    small = Workload(id="small", queue="a", tasks=(TaskRequest(GpuRequest.whole(4)),) * 2, submit_time=2.0)
    return ClusterSnapshot(nodes, QueueTree([gpu_queue("a", 24)]), (*busy, gang, small), now=10.0)


def test_room_check_turns_away_a_gang_that_cannot_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    snap = _two_node_gang_snapshot()
    with counted(monkeypatch) as refused:
        result = run_cycle(snap, SchedulerConfig(placement="binpack", backfill=True))
    assert refused[0] >= 1  # the 2 x 8 gang: one node has 8 free GPUs, not two
    assert {b.workload_id for b in result.binds} == {"small"}  # a gang that fits is not turned away
    assert "gang" in result.pending
