"""A seeded generator of small clusters and job streams, for tests and speed benchmarks.

Same arguments and seed -> identical scenario. Arrivals are Poisson, durations log-normal,
GPU counts drawn from a Philly-like mix (mostly 1 GPU, a few gangs across nodes).
"""

from __future__ import annotations

import numpy as np

from aifab.core.nodes import uniform_node
from aifab.core.queues import QueueTree, gpu_queue
from aifab.core.workloads import GpuRequest, TaskRequest, Workload
from aifab.sim.model import Scenario, SimConfig, SimJob
from aifab.sim.traces.philly import gang_sizes

GPU_MIX: tuple[tuple[int, float], ...] = ((1, 0.70), (2, 0.10), (4, 0.10), (8, 0.07), (16, 0.03))


def synthetic_scenario(
    *,
    seed: int = 0,
    jobs: int = 100,
    nodes: int = 4,
    gpus_per_node: int = 8,
    projects: int = 3,
    load: float = 1.0,
    mean_duration: float = 3600.0,
    checkpoint_interval: float | None = 1800.0,
    sim: SimConfig | None = None,
) -> Scenario:
    """``load`` is offered GPU demand over capacity (1.0 keeps the cluster just busy)."""
    rng = np.random.default_rng(seed)
    capacity = nodes * gpus_per_node
    sizes = [g for g, _ in GPU_MIX if g <= capacity]
    weights = np.array([w for g, w in GPU_MIX if g <= capacity])
    weights = weights / weights.sum()
    mean_gpus = float(np.dot(sizes, weights))
    # Mean inter-arrival so that arrival rate x mean GPU-seconds = load x capacity.
    gap = mean_gpus * mean_duration / (load * capacity)
    sigma = 1.0
    mu = np.log(mean_duration) - sigma**2 / 2
    names = [f"p{i}" for i in range(projects)]
    base, extra = divmod(capacity, projects)
    deserved = [base + (1 if i < extra else 0) for i in range(projects)]
    queues = QueueTree(gpu_queue(n, d) for n, d in zip(names, deserved, strict=True))
    t = 0.0
    out: list[SimJob] = []
    for i in range(jobs):
        t += float(rng.exponential(gap))
        g = int(rng.choice(sizes, p=weights))
        dur = max(1.0, round(float(rng.lognormal(mu, sigma))))
        proj = names[int(rng.integers(projects))]
        tasks = tuple(TaskRequest(gpu=GpuRequest.whole(n)) for n in gang_sizes(g, gpus_per_node))
        wl = Workload(
            id=f"s{i:05d}",
            queue=proj,
            tasks=tasks,
            submit_time=round(t, 3),
            checkpoint_interval=checkpoint_interval,
            expected_duration=dur,
        )
        out.append(SimJob(wl, dur))
    cluster = tuple(uniform_node(f"n{i:03d}", gpus_per_node) for i in range(nodes))
    return Scenario(
        name=f"synthetic-{seed}", nodes=cluster, queues=queues, jobs=tuple(out), sim=sim or SimConfig()
    )
