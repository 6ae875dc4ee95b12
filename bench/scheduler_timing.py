"""Quick timing of run_cycle on random snapshots, for development (bench/cycle_speed.py is the benchmark).

Run: .venv/bin/python bench/scheduler_timing.py [small|mid|big|reclaim|all] [placement]
Reports the best CPU time (time.process_time) of a few runs: the machine is shared.
"""

import random
import sys
import time

from aifab.core import (
    ClusterSnapshot,
    GpuRequest,
    QueueTree,
    TaskRequest,
    Workload,
    gpu_queue,
    uniform_node,
)
from aifab.core.workloads import TaskPlacement, WorkloadPhase
from aifab.scheduler import SchedulerConfig, run_cycle


def build(n_nodes, n_running, n_pending, n_queues=20, seed=1, frac_share=0.3, full=False):
    rng = random.Random(seed)
    nodes = tuple(
        uniform_node(f"n{i:05d}", 8, topology={"zone": f"z{i // 256}", "rack": f"r{i // 16}"})
        for i in range(n_nodes)
    )
    depts = [gpu_queue(f"d{d}", n_nodes * 8 / 4 / 2, limit_gpus=None) for d in range(4)]
    leaves = [
        gpu_queue(f"q{i}", n_nodes * 8 / 4 / 2 / (n_queues // 4), parent=f"d{i % 4}", weight=1 + i % 3)
        for i in range(n_queues)
    ]
    tree = QueueTree(depts + leaves)
    ws = []
    # running: fill nodes in order
    free = [[1000] * 8 for _ in range(n_nodes)]
    ni = 0
    d = 0
    for j in range(n_running):
        q = leaves[j % n_queues].name
        frac = rng.random() < frac_share and not full
        milli = 500 if frac else 1000
        while ni < n_nodes and free[ni][d] < milli:
            d += 1
            if d == 8:
                d = 0
                ni += 1
        if ni >= n_nodes:
            break
        free[ni][d] -= milli
        req = GpuRequest.fraction(0.5) if frac else GpuRequest.whole(1)
        pl = TaskPlacement(0, nodes[ni].name, (d,), milli, 40960 if frac else 81920)
        ws.append(
            Workload(
                id=f"r{j}",
                queue=q,
                tasks=(TaskRequest(req, 1000, 1024),),
                phase=WorkloadPhase.RUNNING,
                placements=(pl,),
                start_time=float(rng.randint(0, 1000)),
                checkpoint_interval=600.0,
                submit_time=0.0,
                preemptible=rng.random() < 0.9,
            )
        )
    for j in range(n_pending):
        q = leaves[rng.randrange(n_queues)].name
        kind = rng.random()
        if kind < 0.2:
            tasks = (TaskRequest(GpuRequest.fraction(0.25), 500, 512),)
        elif kind < 0.6:
            tasks = (TaskRequest(GpuRequest.whole(1), 1000, 1024),)
        elif kind < 0.8:
            tasks = (TaskRequest(GpuRequest.whole(rng.choice([2, 4])), 1000, 1024),)
        else:
            tasks = tuple(TaskRequest(GpuRequest.whole(8), 1000, 1024) for _ in range(rng.choice([1, 2, 4])))
        ws.append(
            Workload(
                id=f"p{j}",
                queue=q,
                tasks=tasks,
                submit_time=float(j),
                priority=rng.choice([25, 50, 50, 100]),
                preemptible=rng.random() < 0.85,
            )
        )
    return ClusterSnapshot(nodes, tree, tuple(ws), now=2000.0)


def timeit(label, snap, cfg, reps=3):
    best = 1e9
    for _ in range(reps):
        t = time.process_time()
        r = run_cycle(snap, cfg)
        best = min(best, time.process_time() - t)
    print(
        f"{label}: best of {reps} (CPU time) = {best * 1000:.1f} ms; binds={len(r.binds)} evictions={len(r.evictions)} pending={len(r.pending)}",
        flush=True,
    )
    return r


if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else "all"
    placement = sys.argv[2] if len(sys.argv) > 2 else "binpack"
    cfg = SchedulerConfig(placement=placement)
    if which in ("small", "all"):
        s = build(100, 500, 800, n_queues=8)
        timeit("100 nodes, 500 running, 800 pending", s, cfg, reps=5)
        s = build(100, 300, 50, n_queues=8)
        timeit("100 nodes, 300 running, 50 pending", s, cfg, reps=5)
    if which in ("mid", "all"):
        s = build(1000, 8000, 10000)
        timeit("1000x8, 8000 running (30% half-GPU), 10000 pending", s, cfg)
        s = build(1000, 8000, 10000, full=True)
        timeit("1000x8, 8000 running (full), 10000 pending", s, cfg)
    if which in ("big", "all"):
        s = build(4000, 32000, 108000, n_queues=40)
        timeit("4000x8, 32000 running, 108000 pending", s, cfg, reps=1)


def build_reclaim(n_nodes=1000):
    nodes = tuple(uniform_node(f"n{i:05d}", 8, topology={"rack": f"r{i // 16}"}) for i in range(n_nodes))
    half = n_nodes * 8 // 2
    tree = QueueTree([gpu_queue("a", half), gpu_queue("b", half)])
    ws = []
    k = 0
    for _i, n in enumerate(nodes):
        for d in range(8):
            ws.append(
                Workload(
                    id=f"b{k}",
                    queue="b",
                    tasks=(TaskRequest(GpuRequest.whole(1)),),
                    phase=WorkloadPhase.RUNNING,
                    placements=(TaskPlacement(0, n.name, (d,), 1000, 81920),),
                    start_time=float((k * 7919) % 1000),
                )
            )
            k += 1
    gang = Workload(
        id="gang", queue="a", tasks=tuple(TaskRequest(GpuRequest.whole(8)) for _ in range(n_nodes // 2))
    )
    ws.append(gang)
    return ClusterSnapshot(nodes, tree, tuple(ws), now=2000.0)


if __name__ == "__main__" and which in ("reclaim", "all"):
    s = build_reclaim()
    r = timeit("reclaim 500x8-GPU gang on 1000 full nodes (8000 x 1-GPU victims)", s, cfg)
    print("gang bound:", "gang" in r.bound_workloads(), r.pending.get("gang"))
