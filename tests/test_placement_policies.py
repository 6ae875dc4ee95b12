"""Placement policies: registry, constraints never violated, FGD's measure by hand."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aifab.core.nodes import NodeState, uniform_node
from aifab.core.resources import GPU_MILLI
from aifab.core.workloads import GpuRequest, TaskRequest
from aifab.scheduler.placement import (
    POLICY_NAMES,
    ClusterView,
    FgdPolicy,
    PlacementContext,
    PlacementPolicy,
    PodShape,
    TargetWorkload,
    device_memory_groups,
    fragmentation,
    get_policy,
)
from aifab.scheduler.placement.aifab import AifabPolicy
from aifab.scheduler.placement.api import task_shape
from aifab.scheduler.placement.fragmentation import gap_waste_table

MODELS = ("T4", "G2", "P100")


def test_registry_accepts_paper_spellings() -> None:
    assert POLICY_NAMES == ("random", "dotprod", "gpuclustering", "gpupacking", "bestfit", "fgd", "aifab")
    for paper in ("Random", "DotProd", "GpuClustering", "GpuPacking", "BestFit", "FGD", "AIFAB"):
        policy = get_policy(paper)
        assert policy.name == paper.lower()
        assert isinstance(policy, PlacementPolicy)
    with pytest.raises(KeyError, match="unknown placement policy"):
        get_policy("tetris")


def test_fgd_fragmentation_by_hand() -> None:
    # Node: 2 GPUs with [1000, 300] milli free, 8 cores free. Target workload:
    #   A = 0.5 GPU + 4 cores, p=0.50: fits (device 0), only device 1 (300 < 500) strands -> 0.5*300 = 150
    #   B = 1 GPU + 16 cores,  p=0.25: GPU fits but CPU lacks -> all 1300 idle   -> 0.25*1300 = 325
    #   C = CPU-only 1 core,   p=0.25: the artifact counts all idle GPU           -> 0.25*1300 = 325
    # fragmentation = 800.
    a = PodShape(4000, 0, 1, 500)
    b = PodShape(16000, 0, 1, 1000)
    c = PodShape(1000, 0, 0, 0)
    target = TargetWorkload.of([(a, 2), (b, 1), (c, 1)])
    access = target.access(("T4",))[[0]]
    frag = fragmentation(np.array([8000]), np.array([[1000, 300]]), access, target)
    assert frag[0] == pytest.approx(800.0)
    # Placing 0.2 GPU + 1 core: on device 0 -> [800, 300]: A 150, B 0.25*1100, C 0.25*1100 = 700,
    # delta 100, int(sigmoid(0.1)*100) = 52; on device 1 -> [1000, 100]: A 0.5*100, B 275, C 275
    # = 600, delta 200, int(sigmoid(0.2)*100) = 54. FGD takes device 1 with score 54.
    view = ClusterView.build(["n"], ["T4"], [2], [9000], [1 << 20])
    view.cpu_left[0] = 8000
    view.gpu_left[0] = [1000, 300]
    pod = PodShape(1000, 0, 1, 200)
    ctx = PlacementContext(target=target)
    fgd = FgdPolicy()
    assert fgd.scores(view, pod, np.array([0]), ctx)[0] == 54
    assert fgd.place(view, pod, ctx, 0) == (0, (1,))


def _states(draw: st.DrawFn) -> list[NodeState]:
    out = []
    for i in range(draw(st.integers(1, 6))):
        gpus = draw(st.sampled_from([0, 1, 2, 4, 8]))
        node = uniform_node(
            f"n{i}",
            gpus,
            gpu_model=draw(st.sampled_from(MODELS)),
            cpu_milli=draw(st.integers(1000, 64000)),
            memory_mib=draw(st.integers(1024, 65536)),
        )
        s = NodeState(node, i)
        s.free_cpu = draw(st.integers(0, node.cpu_milli))
        s.free_memory = draw(st.integers(0, node.memory_mib))
        s.gpu_free_milli = [draw(st.sampled_from([0, 50, 190, 300, 500, 810, 1000])) for _ in range(gpus)]
        s.gpu_free_memory = [
            g.memory_mib * m // GPU_MILLI for g, m in zip(node.gpus, s.gpu_free_milli, strict=True)
        ]
        out.append(s)
    return out


@st.composite
def _case(draw: st.DrawFn) -> tuple[list[NodeState], TaskRequest, frozenset[str]]:
    states = _states(draw)
    kind = draw(st.sampled_from(["none", "frac", "whole"]))
    if kind == "none":
        gpu = GpuRequest.none()
    elif kind == "frac":
        gpu = GpuRequest.fraction(draw(st.sampled_from([0.05, 0.16, 0.47, 0.81])))
    else:
        gpu = GpuRequest.whole(draw(st.sampled_from([1, 2, 4, 8])))
    task = TaskRequest(gpu=gpu, cpu_milli=draw(st.integers(0, 32000)), memory_mib=draw(st.integers(0, 32768)))
    models = frozenset(draw(st.lists(st.sampled_from(MODELS), max_size=2)))
    return states, task, models


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=_case(), policy=st.sampled_from(POLICY_NAMES), seed=st.integers(0, 1000))
def test_choice_never_violates_constraints(
    case: tuple[list[NodeState], TaskRequest, frozenset[str]], policy: str, seed: int
) -> None:
    states, task, models = case
    shape_target = TargetWorkload.of([(PodShape(4000, 0, 1, 500), 1), (PodShape(8000, 0, 2, 1000), 1)])
    ctx = PlacementContext(seed=seed, sequence=seed, target=shape_target, gpu_models=models)
    choice = get_policy(policy).choose(task, states, ctx)
    fits_somewhere = any(_fits(s, task, models) for s in states)
    if choice is None:
        assert not fits_somewhere or task.gpu.is_shared  # shared: device memory may veto
        return
    s = states[choice.candidate]
    assert s.node.name == choice.node
    assert task.cpu_milli <= s.free_cpu and task.memory_mib <= s.free_memory
    assert len(choice.devices) == task.gpu.devices == len(set(choice.devices))
    for d in choice.devices:
        assert s.gpu_free_milli[d] >= choice.gpu_milli
        assert s.gpu_free_milli[d] - choice.gpu_milli >= 0
        assert choice.gpu_milli <= GPU_MILLI
    if choice.devices and models:
        assert s.node.gpu_model in models
    s.allocate(choice.devices, choice.gpu_milli, choice.gpu_memory_mib, task.cpu_milli, task.memory_mib)


def _fits(s: NodeState, task: TaskRequest, models: frozenset[str]) -> bool:
    if task.cpu_milli > s.free_cpu or task.memory_mib > s.free_memory:
        return False
    if task.gpu.devices == 0:
        return True
    if models and s.node.gpu_model not in models:
        return False
    if task.gpu.is_shared:
        return any(m >= task.gpu.milli for m in s.gpu_free_milli)
    return sum(m == GPU_MILLI for m in s.gpu_free_milli) >= task.gpu.count


def test_random_policy_is_deterministic_per_seed() -> None:
    states = [NodeState(uniform_node(f"n{i}", 2), i) for i in range(20)]
    task = TaskRequest(gpu=GpuRequest.fraction(0.5), cpu_milli=1000)
    pick = [
        get_policy("random").choose(task, states, PlacementContext(seed=7, sequence=k)) for k in range(10)
    ]
    again = [
        get_policy("random").choose(task, states, PlacementContext(seed=7, sequence=k)) for k in range(10)
    ]
    assert pick == again
    assert len({c.node for c in pick if c}) > 1


def test_whole_gpus_take_lowest_free_devices_and_view_guards() -> None:
    view = ClusterView.build(["a", "b"], ["T4", "T4"], [4, 4], [64000, 64000], [1 << 16, 1 << 16])
    view.gpu_left[0] = [1000, 300, 1000, 1000]
    view.gpu_left[1] = [0, 0, 0, 0]
    pod = PodShape(1000, 0, 2, 1000)
    for name in POLICY_NAMES:
        assert get_policy(name).place(view, pod, PlacementContext(), 0) == (0, (0, 2))
    with pytest.raises(ValueError, match="does not fit"):
        view.apply(1, pod, (0, 1))


def test_aifab_keeps_the_only_node_that_fits_a_big_shape() -> None:
    # Only node 0 can host the rare 8-GPU, 120-core, 600 GiB shape (node 1 lacks memory).
    # Best fit (and FGD, whose 95 % target omits the rare shape) put a small task on node 0,
    # which leaves it 119 cores: the big shape could never run. aifab sends it to node 1.
    view = ClusterView.build(["big", "other"], ["G3", "G3"], [8, 8], [123000, 128000], [786432, 393216])
    small = PodShape(4000, 8192, 1, 1000)
    big = PodShape(120000, 600000, 8, 1000)
    full = TargetWorkload.of([(small, 99), (big, 1)])
    ctx = PlacementContext(target=TargetWorkload.of([(small, 1)]), full_target=full)
    assert get_policy("bestfit").place(view, small, ctx, 0) == (0, (0,))
    assert get_policy("fgd").place(view, small, ctx, 0) == (0, (0,))
    assert get_policy("aifab").place(view, small, ctx, 0) == (1, (0,))


def _gap_target() -> TargetWorkload:
    # 470, 320 and 650 milli are common; 160 milli is rare (0.37 % of tasks); whole GPUs are 30 %.
    shares = {470: 50, 320: 30, 650: 15, 160: 0.5, 1000: 40}
    return TargetWorkload.of([(PodShape(4000, 0, 1, m), w) for m, w in shares.items()])


def test_gap_waste_table_by_hand() -> None:
    table = gap_waste_table(_gap_target())
    # Nothing common fits 210 or 190 (160 is rare): kept whole.
    assert table[210] == 210 and table[190] == 190
    # 360: a 320 leaves 40. 530: a 470 leaves 60 (a 320 would leave 210).
    assert table[360] == 40 and table[530] == 60
    # 680: a 650 leaves 30 (a 470 would leave 210, a 320 then 360 -> 40).
    assert table[680] == 30
    # A free device takes a whole GPU; a full one keeps nothing.
    assert table[1000] == 0 and table[0] == 0
    # Own-shape target (a task scored without a trace): only exact multiples fill.
    own = gap_waste_table(TargetWorkload.of([(PodShape(1000, 0, 1, 300), 1)]))
    assert own[900] == 0 and own[950] == 50 and own[250] == 250


class _NoGap(AifabPolicy):
    name = "aifab_no_gap"  # its own name: per-view caches are keyed by policy name
    gap_weight = 0.0


def test_aifab_keeps_a_gap_for_the_task_that_fills_it() -> None:
    # Node 0's device has 680 free (a 320 on it); nodes 1-3 are free. A 470 on node 0 leaves
    # 210, which no common task fits; a later 650 would fill node 0 to 970. FGD's measure sees
    # node 0 as fragmented already (no whole GPU fits it) and fills it; the gap term does not.
    target = _gap_target()
    ctx = PlacementContext(target=target, full_target=target)
    task = PodShape(4000, 0, 1, 470)
    picks = {}
    for policy in (get_policy("fgd"), _NoGap(), get_policy("aifab")):
        view = ClusterView.build([f"n{i}" for i in range(4)], ["T4"] * 4, [1] * 4, [64000] * 4, [1 << 16] * 4)
        view.gpu_left[0] = [680]
        picks[policy.name] = policy.place(view, task, ctx, 0)
    assert picks == {"fgd": (0, (0,)), "aifab_no_gap": (0, (0,)), "aifab": (1, (0,))}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    case=_case(),
    policy=st.sampled_from(POLICY_NAMES),
    mask_bits=st.lists(st.booleans(), min_size=6, max_size=6).filter(any),
    steps=st.integers(1, 8),
)
def test_kept_view_chooses_like_a_fresh_candidate_list(
    case: tuple[list[NodeState], TaskRequest, frozenset[str]], policy: str, mask_bits: list[bool], steps: int
) -> None:
    """The scheduler keeps one view per cycle and syncs the rows it changed; every choice made
    that way must equal the choice over a candidate list built afresh from the same states."""
    states, task, models = case
    allowed = np.asarray(mask_bits[: len(states)], dtype=np.bool_)
    kept_policy, fresh_policy = get_policy(policy), get_policy(policy)
    view = ClusterView.from_states(states)
    groups = device_memory_groups(states)
    for step in range(steps):
        ctx = PlacementContext(seed=3, sequence=step, gpu_models=models)
        kept = kept_policy.choose_in_view(task, view, allowed, groups, ctx)
        candidates = [s for s in states if allowed[s.index]]
        fresh = fresh_policy.choose(task, candidates, ctx) if candidates else None
        if kept is None:
            assert fresh is None
            return
        n, devices, milli, mem = kept
        if fresh is None:  # only the candidate path checks per-device GPU memory
            assert any(states[n].gpu_free_memory[d] < mem for d in devices)
            return
        assert (states[n].node.name, devices, milli) == (fresh.node, fresh.devices, fresh.gpu_milli)
        if any(states[n].gpu_free_memory[d] < mem for d in devices):
            return
        states[n].allocate(devices, milli, mem, task.cpu_milli, task.memory_mib)
        view.sync(states, [n])


class _ScoringEveryNode(AifabPolicy):
    boards = False


_BOARD_TASKS = [
    TaskRequest(GpuRequest.fraction(f), cpu_milli=c, memory_mib=1024)
    for f in (0.25, 0.5)
    for c in (2000, 8000)
] + [
    *(TaskRequest(GpuRequest.whole(k), cpu_milli=4000 * k, memory_mib=4096) for k in (1, 2, 4, 8)),
    TaskRequest(GpuRequest.none(), cpu_milli=16000, memory_mib=1024),
]
# GPU models a task may ask for: a task for GPUs scored against its own shape can host where it
# is feasible; a CPU-only task that names models cannot (the host table sees the models).
_BOARD_MODELS = [frozenset(), frozenset({"A100"}), frozenset({"T4", "V100"})]


@st.composite
def _board_nodes(draw: st.DrawFn) -> list[NodeState]:
    """Up to 14 nodes of 4 or 8 GPUs, many alike (so that scores tie), partly used."""
    patterns = [[1000] * 8, [0] * 4 + [1000] * 4, [500, 250] + [1000] * 6, [750] * 8, [0] * 7 + [500]]
    out = []
    for i in range(draw(st.integers(1, 14))):
        free = list(draw(st.sampled_from(patterns)))
        gpus = draw(st.sampled_from([8, 8, 4]))
        model = draw(st.sampled_from(["A100", "A100", "T4"]))
        node = uniform_node(f"n{i}", gpus, gpu_model=model, cpu_milli=64000, memory_mib=1 << 18)
        s = NodeState(node, i)
        s.gpu_free_milli = free[:gpus]
        s.gpu_free_memory = [
            g.memory_mib * m // GPU_MILLI for g, m in zip(node.gpus, s.gpu_free_milli, strict=True)
        ]
        s.free_cpu = draw(st.sampled_from([64000, 32000, 8000]))
        out.append(s)
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(states=_board_nodes(), data=st.data())
def test_aifab_board_chooses_exactly_as_scoring_every_node(
    states: list[NodeState], data: st.DataObject
) -> None:
    """aifab's boards (placement.board) must give the very node and score that scoring every
    feasible node gives, step after step while nodes fill up and empty again, with ties, lost
    shapes and masks that leave nodes out (the board then hands over to scoring)."""
    boards, every = AifabPolicy(), _ScoringEveryNode()
    views = {id(p): ClusterView.from_states(states) for p in (boards, every)}
    groups = device_memory_groups(states)
    placed: list[tuple[int, tuple[int, ...], int, int, TaskRequest]] = []
    ctx = PlacementContext()
    for _ in range(data.draw(st.integers(1, 30))):
        if placed and data.draw(st.integers(0, 3)) == 0:  # a task ends: its node goes back a state
            n, devices, milli, mem, task = placed.pop(data.draw(st.integers(0, len(placed) - 1)))
            states[n].release(devices, milli, mem, task.cpu_milli, task.memory_mib)
            for view in views.values():
                view.sync(states, [n])
            continue
        task = data.draw(st.sampled_from(_BOARD_TASKS))
        allowed = np.ones(len(states), dtype=np.bool_)
        if data.draw(st.integers(0, 4)) == 0:
            allowed[data.draw(st.integers(0, len(states) - 1))] = False
        models = data.draw(st.sampled_from(_BOARD_MODELS))
        pod = task_shape(task, groups[0][0], models)
        ctx = PlacementContext(gpu_models=models)
        got = []
        for policy in (boards, every):
            view = views[id(policy)]
            got.append(policy.best_in_mask(view, pod, view.feasible(pod), allowed, ctx))
        assert got[0] == got[1]
        chosen = [p.choose_in_view(task, views[id(p)], allowed, groups, ctx) for p in (boards, every)]
        assert chosen[0] == chosen[1]
        if chosen[0] is None:
            continue
        n, devices, milli, mem = chosen[0]
        states[n].allocate(devices, milli, mem, task.cpu_milli, task.memory_mib)
        placed.append((n, devices, milli, mem, task))
        for view in views.values():
            view.sync(states, [n])


def test_an_unusable_board_hands_over_to_scoring_every_node(monkeypatch: pytest.MonkeyPatch) -> None:
    """A value the board's order cannot take (NaN, a positive tie-break key) makes it step
    aside for good on that view: the choice is then scoring every node's."""
    from aifab.scheduler.placement import board as board_module

    def unusable(self: board_module.Board, row: int, delta: float, extra: float, lost: bool) -> None:
        self.usable = False

    monkeypatch.setattr(board_module.Board, "set_row", unusable)
    states = [NodeState(uniform_node(f"n{i}", 8, gpu_model="A100"), i) for i in range(3)]
    states[1].allocate((0, 1), 1000, 0, 0, 0)
    task = TaskRequest(GpuRequest.fraction(0.5), cpu_milli=1000, memory_mib=1024)
    ctx = PlacementContext()
    for policy in (AifabPolicy(), _ScoringEveryNode()):
        view = ClusterView.from_states(states)
        pod = task_shape(task, device_memory_groups(states)[0][0], frozenset())
        allowed = np.ones(3, dtype=np.bool_)
        first = policy.best_in_mask(view, pod, view.feasible(pod), allowed, ctx)
        again = policy.best_in_mask(view, pod, view.feasible(pod), allowed, ctx)
        assert (
            first
            == again
            == _ScoringEveryNode().best_in_mask(
                ClusterView.from_states(states), pod, view.feasible(pod), allowed, ctx
            )
        )
