"""Property tests: whatever the snapshot, a cycle's decisions keep the cluster's invariants."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aifab.core import (
    ClusterSnapshot,
    CycleResult,
    EvictionCause,
    GpuRequest,
    NodeState,
    QueueTree,
    ResourceKind,
    TaskRequest,
    TopologyConstraint,
    TopologyMode,
    Workload,
    gpu_queue,
    uniform_node,
)
from aifab.core.workloads import WorkloadPhase
from aifab.scheduler import Fairness, SchedulerConfig, run_cycle

from .helpers import Placer, apply, running


@st.composite
def snapshots(draw: Any) -> ClusterSnapshot:
    n_nodes = draw(st.integers(1, 5))
    nodes = tuple(
        uniform_node(
            f"n{i}",
            draw(st.sampled_from([0, 1, 2, 4, 8])),
            gpu_model=draw(st.sampled_from(["A", "B"])),
            pool=draw(st.sampled_from(["p0", "p1"])),
            topology={"rack": f"r{i % 2}"},
            cpu_milli=draw(st.sampled_from([8000, 64000])),
            memory_mib=draw(st.sampled_from([16384, 524288])),
        )
        for i in range(n_nodes)
    )
    total = sum(n.gpu_count for n in nodes)
    n_leaves = draw(st.integers(1, 4))
    hierarchical = draw(st.booleans())
    queues = []
    budget = total
    if hierarchical:
        budget = total // 2
        queues.append(gpu_queue("d", budget, limit_gpus=draw(st.sampled_from([None, budget, budget + 1]))))
    for i in range(n_leaves):
        deserved = draw(st.integers(0, max(0, budget)))
        budget -= deserved
        limit = draw(st.sampled_from([None, deserved, deserved + 2]))
        queues.append(
            gpu_queue(
                f"q{i}",
                deserved,
                parent="d" if hierarchical else None,
                weight=draw(st.sampled_from([0, 1, 2])),
                limit_gpus=limit,
                priority=draw(st.sampled_from([0, 0, 1])),
            )
        )
    leaves = [q.name for q in queues if q.name != "d"]
    placer = Placer(nodes)
    workloads: list[Workload] = []
    for i in range(draw(st.integers(0, 16))):
        w = _workload(draw, f"w{i}", leaves)
        on = draw(st.sampled_from([n.name for n in nodes]))
        if draw(st.integers(0, 2)) > 0 and _fits(placer, w, on):
            start = float(draw(st.integers(0, 90)))
            w = running(w, placer, on, start)
        workloads.append(w)
    return ClusterSnapshot(nodes, QueueTree(queues), tuple(workloads), now=100.0)


def _workload(draw: Any, wid: str, leaves: list[str]) -> Workload:
    kind = draw(st.sampled_from(["whole", "whole", "fraction", "memory", "cpu"]))
    if kind == "whole":
        gpu = GpuRequest.whole(draw(st.sampled_from([1, 1, 2, 4, 8])))
    elif kind == "fraction":
        gpu = GpuRequest.fraction(draw(st.sampled_from([0.25, 0.5, 0.75])))
    elif kind == "memory":
        gpu = GpuRequest.memory(draw(st.sampled_from([10240, 40960])))
    else:
        gpu = GpuRequest.none()
    task = TaskRequest(
        gpu, cpu_milli=draw(st.sampled_from([0, 1000, 6000])), memory_mib=draw(st.sampled_from([0, 8192]))
    )
    n_tasks = draw(st.integers(1, 3))
    topo = draw(
        st.sampled_from(
            [
                None,
                None,
                TopologyConstraint("rack", TopologyMode.REQUIRED),
                TopologyConstraint("node", TopologyMode.PREFERRED),
            ]
        )
    )
    return Workload(
        id=wid,
        queue=draw(st.sampled_from(leaves)),
        tasks=(task,) * n_tasks,
        min_available=draw(st.integers(0, n_tasks)),
        priority=draw(st.sampled_from([25, 50, 100])),
        preemptible=draw(st.booleans()),
        gpu_models=frozenset(draw(st.sampled_from([(), (), ("A",), ("B",)]))),
        node_pool=draw(st.sampled_from([None, None, "p0"])),
        topology=topo,
        submit_time=float(draw(st.integers(0, 50))),
        checkpoint_interval=draw(st.sampled_from([None, 30.0])),
        min_runtime=draw(st.sampled_from([0.0, 0.0, 50.0])),
        attained_gpu_seconds=float(draw(st.integers(0, 1000))),
    )


def _fits(placer: Placer, w: Workload, on: str) -> bool:
    """Running workloads are laid out on one node; only if it really fits there."""
    node = placer.nodes[on]
    free = list(placer.free[on])
    cpu = sum(t.cpu_milli for t in w.tasks)
    mem = sum(t.memory_mib for t in w.tasks)
    used_cpu = getattr(placer, "cpu", {}).get(on, 0)
    used_mem = getattr(placer, "mem", {}).get(on, 0)
    if used_cpu + cpu > node.cpu_milli or used_mem + mem > node.memory_mib:
        return False
    for t in w.tasks:
        if t.gpu.count:
            idx = [d for d, m in enumerate(free) if m == 1000][: t.gpu.count]
            if len(idx) < t.gpu.count:
                return False
            for d in idx:
                free[d] = 0
        elif t.gpu.is_shared:
            dev_mem = node.gpus[0].memory_mib if node.gpus else 0
            milli = t.gpu.milli or -(-t.gpu.memory_mib * 1000 // max(dev_mem, 1))
            d = next((d for d, m in enumerate(free) if m >= milli), None)
            if d is None or milli > 1000:
                return False
            free[d] -= milli
    placer.__dict__.setdefault("cpu", {})[on] = used_cpu + cpu
    placer.__dict__.setdefault("mem", {})[on] = used_mem + mem
    return True


def _usage(snap: ClusterSnapshot) -> tuple[dict[str, int], dict[str, int]]:
    """GPU milli per queue (subtree) and non-preemptible GPU milli per leaf."""
    total: dict[str, int] = {q.name: 0 for q in snap.queues}
    nonp: dict[str, int] = {q.name: 0 for q in snap.queues}
    for w in snap.workloads:
        if not w.is_running:
            continue
        g = w.allocated.gpu
        for q in [w.queue, *snap.queues.ancestors(w.queue)]:
            total[q] += g
        if not w.preemptible:
            nonp[w.queue] += g
    return total, nonp


def check_invariants(before: ClusterSnapshot, r: CycleResult, quotas: bool = True) -> None:
    after = apply(before, r)
    # No node or device oversubscribed: replaying every placement through NodeState raises if so.
    states = {n.name: NodeState(n) for n in after.nodes}
    for w in after.workloads:
        for p in w.placements:
            t = w.tasks[p.task_index]
            states[p.node].allocate(p.devices, p.gpu_milli, p.gpu_memory_mib, t.cpu_milli, t.memory_mib)
    # Gangs: all-or-nothing, every task at most once.
    by_workload: dict[str, list[int]] = {}
    for b in r.binds:
        by_workload.setdefault(b.workload_id, []).append(b.task_index)
    ws = {w.id: w for w in before.workloads}
    for wid, idx in by_workload.items():
        w = ws[wid]
        assert len(set(idx)) == len(idx)
        assert w.gang_size <= len(idx) <= len(w.tasks), (wid, idx)
    # Limits and non-preemptible quota: the cycle never pushes usage above them.
    used_before, np_before = _usage(before)
    used_after, np_after = _usage(after)
    for q in before.queues if quotas else ():
        lim = q.limit(ResourceKind.GPU)
        if lim is not None:
            assert used_after[q.name] <= max(lim, used_before[q.name]), (q.name, used_after[q.name], lim)
        if before.queues.is_leaf(q.name):
            assert np_after[q.name] <= max(q.deserved.gpu, np_before[q.name]), q.name
    # Reclaim never takes a victim queue below its fair share. The guarantee (reclaim for a job
    # inside its project's unused deserved quota) takes only from a queue above its deserved
    # quota at each eviction: at the last one, the queue held at most what it had, plus what
    # this cycle bound to it, less the guarantee's earlier victims, so that must exceed it.
    preempted = {ws[e.workload_id].queue for e in r.evictions if e.cause is EvictionCause.PREEMPT}
    by_guarantee: dict[str, int] = {}  # taken by the guarantee, which may go below fair shares
    for e in r.evictions:
        if e.cause is EvictionCause.GUARANTEE:
            w = ws[e.workload_id]
            by_guarantee[w.queue] = by_guarantee.get(w.queue, 0) + w.allocated.gpu
    for e in r.evictions:
        q = ws[e.workload_id].queue
        if e.cause is EvictionCause.RECLAIM and q not in preempted:
            kept = used_after[q] + by_guarantee.get(q, 0)
            assert kept >= r.fair_shares[q].gpu, (q, used_after[q], r.fair_shares[q])
    bound_to: dict[str, int] = {}
    for b in r.binds:
        for q in [ws[b.workload_id].queue, *before.queues.ancestors(ws[b.workload_id].queue)]:
            bound_to[q] = bound_to.get(q, 0) + max(b.gpu_milli, 1000) * max(1, len(b.devices))
    taken: dict[str, list[int]] = {}
    for e in r.evictions:
        if e.cause is EvictionCause.GUARANTEE:
            w = ws[e.workload_id]
            mine = ws[e.for_workload].queue  # the reclaimer's: queues it shares are not checked
            shared = {mine, *before.queues.ancestors(mine)}
            for q in [w.queue, *before.queues.ancestors(w.queue)]:
                if q not in shared:
                    taken.setdefault(q, []).append(w.allocated.gpu)
    for q, sizes in taken.items():
        deserved = before.queues.get(q).deserved.gpu
        most = used_before[q] + bound_to.get(q, 0) - sum(sizes) + max(sizes)
        assert most > deserved, (q, sizes, used_before[q], deserved)
    # Every pending workload that did not start has a reason.
    for w in before.workloads:
        if w.phase is WorkloadPhase.PENDING and w.id not in by_workload:
            assert w.id in r.pending and r.pending[w.id].message


CONFIGS = [
    SchedulerConfig(placement="binpack"),
    SchedulerConfig(placement="topology", backfill=False),
    SchedulerConfig(placement="spread", fairness=Fairness.STATIC),
    SchedulerConfig(placement="binpack", fairness=Fairness.NONE, job_order="las"),
    SchedulerConfig(placement="binpack", fairness=Fairness.NONE, job_order="srtf", preempt_by_job_order=True),
]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(snapshots(), st.sampled_from(CONFIGS))
def test_cycle_keeps_invariants_and_is_deterministic(snap: ClusterSnapshot, cfg: SchedulerConfig) -> None:
    r = run_cycle(snap, cfg)
    quotas = cfg.fairness is not Fairness.NONE  # no fairness: one pool, quotas ignored
    check_invariants(snap, r, quotas)
    assert run_cycle(snap, cfg) == r
    # A second cycle on the result keeps them too.
    snap2 = apply(snap, r, now=snap.now + 10)
    check_invariants(snap2, run_cycle(snap2, cfg), quotas)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(snapshots())
def test_default_placement_policy_keeps_invariants(snap: ClusterSnapshot) -> None:
    r = run_cycle(snap, SchedulerConfig())
    check_invariants(snap, r)


@st.composite
def contended(draw: Any) -> ClusterSnapshot:
    """A full cluster lent to one queue while others wait: exercises reclaim/preempt/consolidate."""
    n_nodes = draw(st.integers(2, 4))
    per = draw(st.sampled_from([4, 8]))
    nodes = tuple(uniform_node(f"n{i}", per, topology={"rack": f"r{i % 2}"}) for i in range(n_nodes))
    total = n_nodes * per
    share = draw(st.integers(0, total // 2))
    queues = [
        gpu_queue("a", share, weight=draw(st.sampled_from([0, 1]))),
        gpu_queue("b", total // 4),
        gpu_queue("c", total - share - total // 4),
    ]
    placer = Placer(nodes)
    ws: list[Workload] = []
    i = 0
    for n in nodes:
        free = per
        while free > 0:
            g = min(free, draw(st.sampled_from([1, 1, 2, 4])))
            w = Workload(
                id=f"r{i}",
                queue=draw(st.sampled_from(["b", "b", "c"])),
                tasks=(TaskRequest(GpuRequest.whole(g)),),
                priority=draw(st.sampled_from([25, 50])),
                preemptible=draw(st.integers(0, 5)) > 0,
                checkpoint_interval=draw(st.sampled_from([None, 20.0])),
                min_runtime=draw(st.sampled_from([0.0, 0.0, 95.0])),
            )
            ws.append(running(w, placer, n.name, float(draw(st.integers(0, 99)))))
            free -= g
            i += 1
    for j in range(draw(st.integers(1, 6))):
        tasks = draw(st.integers(1, 3))
        ws.append(
            Workload(
                id=f"p{j}",
                queue=draw(st.sampled_from(["a", "a", "b", "c"])),
                tasks=(TaskRequest(GpuRequest.whole(draw(st.sampled_from([1, 2, per])))),) * tasks,
                priority=draw(st.sampled_from([25, 50, 100])),
                preemptible=draw(st.booleans()),
                submit_time=float(j),
            )
        )
    return ClusterSnapshot(nodes, QueueTree(queues), tuple(ws), now=100.0)


@st.composite
def contended_departments(draw: Any) -> ClusterSnapshot:
    """A full cluster shared by projects in two or three departments while others wait: a
    project's reclaim may find a lender whose own share allows an eviction but whose
    department's does not (or the other way round), and CPU-only workloads may be victims."""
    n_nodes = draw(st.integers(2, 4))
    per = draw(st.sampled_from([4, 8]))
    nodes = tuple(uniform_node(f"n{i}", per, cpu_milli=32000) for i in range(n_nodes))
    budget = n_nodes * per
    queues, leaves = [], []
    for d in range(draw(st.integers(2, 3))):
        dept = draw(st.integers(0, budget))
        budget -= dept
        queues.append(gpu_queue(f"d{d}", dept, weight=draw(st.sampled_from([0, 1, 2]))))
        for p in range(2):
            share = draw(st.integers(0, dept))
            dept -= share
            queues.append(gpu_queue(f"d{d}p{p}", share, parent=f"d{d}", weight=draw(st.sampled_from([0, 1]))))
            leaves.append(f"d{d}p{p}")
    placer = Placer(nodes)
    ws: list[Workload] = []
    for n in nodes:
        sizes = [0] * draw(st.integers(0, 2))  # CPU-only workloads
        free = per
        while free > 0:
            sizes.append(min(free, draw(st.sampled_from([1, 1, 2, 4]))))
            free -= sizes[-1]
        for i, g in enumerate(sizes):
            w = Workload(
                id=f"r{n.name}-{i}",
                queue=draw(st.sampled_from(leaves)),
                tasks=(TaskRequest(GpuRequest.whole(g) if g else GpuRequest.none(), cpu_milli=1000),),
                priority=draw(st.sampled_from([25, 50])),
                preemptible=draw(st.integers(0, 5)) > 0,
                checkpoint_interval=draw(st.sampled_from([None, 20.0])),
            )
            ws.append(running(w, placer, n.name, float(draw(st.integers(0, 99)))))
    for j in range(draw(st.integers(1, 6))):
        ws.append(
            Workload(
                id=f"p{j}",
                queue=draw(st.sampled_from(leaves)),
                tasks=(TaskRequest(GpuRequest.whole(draw(st.sampled_from([1, 2, per]))), cpu_milli=1000),),
                priority=draw(st.sampled_from([25, 50, 100])),
                preemptible=draw(st.booleans()),
                submit_time=float(j),
            )
        )
    return ClusterSnapshot(nodes, QueueTree(queues), tuple(ws), now=100.0)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(contended(), st.sampled_from([*CONFIGS[:2], CONFIGS[-1]]))
def test_contended_cluster_keeps_invariants(snap: ClusterSnapshot, cfg: SchedulerConfig) -> None:
    r = run_cycle(snap, cfg)
    quotas = cfg.fairness is not Fairness.NONE
    check_invariants(snap, r, quotas)
    assert run_cycle(snap, cfg) == r
    snap2 = apply(snap, r, now=snap.now + 10)
    check_invariants(snap2, run_cycle(snap2, cfg), quotas)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(contended_departments(), st.sampled_from(CONFIGS[:3]))
def test_departments_keep_invariants(snap: ClusterSnapshot, cfg: SchedulerConfig) -> None:
    r = run_cycle(snap, cfg)
    check_invariants(snap, r, True)
    assert run_cycle(snap, cfg) == r
