"""Shortcuts that only spare work bound to come to nothing: with each one switched off, every
cycle must decide exactly the same.

* ``room_for_whole_gpus`` turns a gang away before any node is scored when the cluster's fully
  free GPUs could not hold it (a necessary condition);
* reclaim leaves out the victims whose own queue, or its department, could not let them go
  (``_Victims.lists``);
* preempt passes over a gang the nodes could not hold even with every workload it outranks
  evicted (``preempt._plan_room``'s ``_TOO_FEW_NODES``), without trying to evict and place it;
* allocate refuses a whole job list in one step when one check refuses each of its jobs (no
  room for the smallest, or the static quota: ``search.refuses_all``), short lists included,
  with the reasons worded lazily;
* aifab's placement chooses through boards (``placement.board``) that look only at the best
  groups of nodes, instead of scoring every feasible node;
* a few nodes are evaluated without numpy (``FillFgdPolicy.rows_in_python``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from importlib import import_module
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aifab.core import ClusterSnapshot, GpuRequest, QueueTree, TaskRequest, Workload, gpu_queue, uniform_node
from aifab.scheduler import Fairness, SchedulerConfig, run_cycle, search
from aifab.scheduler import placer as placer_module
from aifab.scheduler.actions import evict as evict_module
from aifab.scheduler.placement.aifab import AifabPolicy, FillFgdPolicy

from .helpers import Placer, running
from .test_invariants import CONFIGS, contended, contended_departments, snapshots

# The package exports the action functions under the modules' names.
preempt_module = import_module("aifab.scheduler.actions.preempt")

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


def _every_list(self: Any, q: Any, step: int, reclaimer: Any) -> list[Any]:
    return [bucket.keyed() for bucket in self[q.name]]


_plan_room = preempt_module._plan_room


def _plan_room_without_counting(*args: Any) -> int:
    got = _plan_room(*args)
    return preempt_module._MAYBE if got == preempt_module._TOO_FEW_NODES else got


def _same_with_and_without(snap: ClusterSnapshot, cfg: SchedulerConfig) -> None:
    with pytest.MonkeyPatch.context() as mp, counted(mp) as _:
        checked = run_cycle(snap, cfg)
    with pytest.MonkeyPatch.context() as mp, counted(mp, check=False) as _:
        mp.setattr(evict_module._Victims, "lists", _every_list)
        mp.setattr(search, "static_refuses_all", lambda ctx, lj: False)
        mp.setattr(search, "refuses_all", lambda ctx, lj: False)
        mp.setattr(preempt_module, "_plan_room", _plan_room_without_counting)
        mp.setattr(AifabPolicy, "boards", False)
        mp.setattr(FillFgdPolicy, "rows_in_python", False)
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


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(contended_departments(), st.sampled_from(CONFIGS[:3]))
def test_shortcuts_never_change_a_cycle_with_departments(snap: ClusterSnapshot, cfg: SchedulerConfig) -> None:
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


@st.composite
def static_backlogs(draw: Any) -> ClusterSnapshot:
    """Projects running near their deserved GPUs with waiting lists short and long (below and
    above the length from which lists are searched vectorised), some with limits or
    non-preemptible jobs, so that every check can come first."""
    nodes = tuple(uniform_node(f"n{i}", 8) for i in range(4))
    placer = Placer(nodes)
    queues, ws = [], []
    for q in range(3):
        deserved = draw(st.sampled_from([2, 4, 8]))
        queues.append(
            gpu_queue(f"q{q}", deserved, limit_gpus=draw(st.sampled_from([None, None, deserved + 1])))
        )
        used = draw(st.integers(max(0, deserved - 2), deserved))
        if used:
            w = Workload(id=f"r{q}", queue=f"q{q}", tasks=(TaskRequest(GpuRequest.whole(used)),))
            ws.append(running(w, placer, nodes[q].name, 0.0))
        for j in range(draw(st.sampled_from([1, 3, 30, 80]))):
            ws.append(
                Workload(
                    id=f"p{q}-{j}",
                    queue=f"q{q}",
                    tasks=(TaskRequest(GpuRequest.whole(draw(st.sampled_from([1, 2, 4])))),),
                    preemptible=draw(st.integers(0, 9)) > 0,
                    submit_time=float(j),
                )
            )
    return ClusterSnapshot(nodes, QueueTree(queues), tuple(ws), now=10.0)


STATIC = [
    SchedulerConfig(fairness=Fairness.STATIC),
    SchedulerConfig(placement="binpack", fairness=Fairness.STATIC, backfill=False),
]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(static_backlogs(), st.sampled_from(STATIC))
def test_static_refusal_in_one_step_words_the_same_reasons(
    snap: ClusterSnapshot, cfg: SchedulerConfig
) -> None:
    _same_with_and_without(snap, cfg)


def test_static_refusal_in_one_step_is_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    """A project at its quota with three waiting jobs: refused in one step, each with the
    static quota's reason."""
    nodes = (uniform_node("n0", 8),)
    placer = Placer(nodes)
    busy = running(Workload(id="r", queue="a", tasks=(TaskRequest(GpuRequest.whole(4)),)), placer, "n0", 0.0)
    waiting = tuple(
        Workload(id=f"p{j}", queue="a", tasks=(TaskRequest(GpuRequest.whole(1)),), submit_time=float(j))
        for j in range(3)
    )
    snap = ClusterSnapshot(nodes, QueueTree([gpu_queue("a", 4)]), (busy, *waiting), now=10.0)
    taken = []
    real = search.static_refuses_all

    def spy(ctx: Any, lj: Any) -> bool:
        taken.append(real(ctx, lj))
        return taken[-1]

    monkeypatch.setattr(search, "static_refuses_all", spy)
    result = run_cycle(snap, SchedulerConfig(fairness=Fairness.STATIC))
    assert any(taken)
    assert not result.binds
    for j in range(3):
        reason = result.pending[f"p{j}"]
        assert reason.code.value == "over_fair_share", reason
        assert "4" in reason.message


def _gang_behind_lower_priority(full: int, half: int, gang: int) -> ClusterSnapshot:
    """8-GPU nodes: ``full`` of them full of lower-priority preemptible work, ``half`` with 4
    GPUs of it next to 4 GPUs of work it may not evict; a higher-priority gang of ``gang``
    8-GPU tasks."""
    nodes = tuple(uniform_node(f"n{i}", 8) for i in range(full + half))
    placer = Placer(nodes)
    busy = []
    for i, n in enumerate(nodes):
        low = 8 if i < full else 4
        w = Workload(id=f"low{i}", queue="a", tasks=(TaskRequest(GpuRequest.whole(low)),), priority=25)
        busy.append(running(w, placer, n.name, 0.0))
        if i >= full:
            keep = Workload(
                id=f"keep{i}",
                queue="a",
                tasks=(TaskRequest(GpuRequest.whole(4)),),
                priority=100,  # not outranked: the gang's victims are only the low ones
                preemptible=False,
            )
            busy.append(running(keep, placer, n.name, 0.0))
    high = Workload(id="high", queue="a", tasks=(TaskRequest(GpuRequest.whole(8)),) * gang, priority=100)
    return ClusterSnapshot(nodes, QueueTree([gpu_queue("a", 8 * len(nodes))]), (*busy, high), now=10.0)


@pytest.mark.parametrize(
    ("full", "half", "gang", "placed"), [(2, 0, 2, True), (2, 2, 3, False), (3, 2, 3, True)]
)
def test_preempt_counts_the_nodes_a_gang_needs(
    monkeypatch: pytest.MonkeyPatch, full: int, half: int, gang: int, placed: bool
) -> None:
    """The gang starts when just enough lower-priority work can be preempted, and is passed
    over (``_TOO_FEW_NODES``) when there are GPUs enough to preempt but one node too few could
    be freed whole."""
    snap = _gang_behind_lower_priority(full, half, gang)
    cfg = SchedulerConfig(placement="binpack")
    seen: list[int] = []
    monkeypatch.setattr(preempt_module, "_plan_room", lambda *a: seen.append(_plan_room(*a)) or seen[-1])
    result = run_cycle(snap, cfg)
    assert ("high" in result.bound_workloads()) is placed
    assert (preempt_module._TOO_FEW_NODES in seen) is not placed
    monkeypatch.undo()
    _same_with_and_without(snap, cfg)


@pytest.mark.parametrize(
    ("node_gpus", "nodes", "gang", "blocked"),
    [
        (8, 1, 1, 0.0),  # evicting the node's work would make exactly the room: not blocked
        (8, 2, 2, 0.0),  # one 8-GPU task on each node
        (16, 1, 2, 0.0),  # both tasks on the one 16-GPU node
        (8, 1, 2, 1.0),  # one node too few whatever is evicted (_TOO_FEW_NODES)
        (16, 1, 3, 1.0),  # the 16-GPU node holds two of the three
    ],
)
def test_preempt_is_blocked_only_when_no_eviction_could_make_room(
    monkeypatch: pytest.MonkeyPatch, node_gpus: int, nodes: int, gang: int, blocked: float
) -> None:
    """``preempt_blocked`` (the simulator skips cycles on it) says that every attempt would
    have failed even with all its victims evicted. Here every eviction fails, so the flag
    rests on that bound alone: room on a node is what its lower-priority work holds, and a
    gang of 8-GPU tasks needs room for each of them."""
    full = tuple(uniform_node(f"n{i}", node_gpus) for i in range(nodes))
    placer = Placer(full)
    busy = []
    for n in full:
        low = Workload(
            id=f"low-{n.name}", queue="a", tasks=(TaskRequest(GpuRequest.whole(node_gpus)),), priority=25
        )
        busy.append(running(low, placer, n.name, 0.0))
    high = Workload(id="high", queue="a", tasks=(TaskRequest(GpuRequest.whole(8)),) * gang, priority=100)
    snap = ClusterSnapshot(full, QueueTree([gpu_queue("a", node_gpus * nodes)]), (*busy, high), now=10.0)
    monkeypatch.setattr(preempt_module, "evict_and_place", lambda *a, **k: False)
    result = run_cycle(snap, SchedulerConfig(placement="binpack"))
    assert result.stats["preempt_blocked"] == blocked
