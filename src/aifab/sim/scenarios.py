"""Experiment set-ups: the Philly replay and named synthetic ones, resolved by name or path.

Philly: 56 nodes x 8 GPUs (448). Every virtual cluster is a project whose deserved GPUs are
proportional to its mean demand over the trace period, sum(num_gpus x duration) / period
(period = last submit - first submit), rounded by largest remainder so they sum to exactly
the cluster's GPUs; all over-quota weights are equal. Every job is a preemptible ``train``
workload that checkpoints every 30 minutes of progress; a restart costs 60 s.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from aifab.core.errors import AifabError, TraceError
from aifab.core.nodes import uniform_node
from aifab.core.queues import QueueTree, gpu_queue
from aifab.sim.model import FailureModel, Scenario, SimConfig, SimJob
from aifab.sim.traces import philly
from aifab.sim.traces.synthetic import synthetic_scenario

PHILLY_CHECKPOINT = 1800.0
PHILLY_RESTART = 60.0
DATA_DIRS = (Path("data"), Path(__file__).resolve().parents[3] / "data")
NAMED = {"philly": "philly/philly_2017_sep_oct.csv"}


def largest_remainder(weights: dict[str, float], total: int) -> dict[str, int]:
    """Integers proportional to ``weights`` that sum to exactly ``total`` (Hamilton's method).

    Ties in the remainders go to the larger weight, then the name, so the result is stable.
    """
    s = sum(weights.values())
    if s <= 0:
        names = sorted(weights)
        base, extra = divmod(total, len(names))
        return {n: base + (1 if i < extra else 0) for i, n in enumerate(names)}
    exact = {n: w * total / s for n, w in weights.items()}
    out = {n: math.floor(v) for n, v in exact.items()}
    left = total - sum(out.values())
    order = sorted(weights, key=lambda n: (-(exact[n] - out[n]), -weights[n], n))
    for n in order[:left]:
        out[n] += 1
    return out


def philly_scenario(
    path: str | Path,
    *,
    nodes: int = 56,
    gpus_per_node: int = 8,
    limit_jobs: int | None = None,
    sim: SimConfig | None = None,
) -> Scenario:
    jobs = philly.read_philly(path, limit=limit_jobs)
    capacity = nodes * gpus_per_node
    for j in jobs:
        if j.num_gpus > capacity:
            raise TraceError(
                Path(path).name, j.line, "num_gpus", f"{j.num_gpus} GPUs exceed the cluster's {capacity}"
            )
        if j.num_gpus > gpus_per_node and math.ceil(j.num_gpus / gpus_per_node) > nodes:
            raise TraceError(
                Path(path).name, j.line, "num_gpus", "the gang needs more nodes than the cluster has"
            )
    period = max(1.0, jobs[-1].submit - jobs[0].submit)
    demand: dict[str, float] = defaultdict(float)
    for j in jobs:
        demand[j.cluster] += j.num_gpus * j.duration / period
    deserved = largest_remainder(dict(demand), capacity)
    queues = QueueTree(gpu_queue(vc, deserved[vc], weight=1.0) for vc in sorted(deserved))
    sim_jobs = tuple(
        SimJob(
            philly.to_workload(j, index=i, checkpoint_interval=PHILLY_CHECKPOINT, per_node=gpus_per_node),
            j.duration,
        )
        for i, j in enumerate(jobs)
    )
    cluster = tuple(uniform_node(f"node{i:03d}", gpus_per_node) for i in range(nodes))
    name = "philly" if limit_jobs is None else f"philly-{limit_jobs}"
    return Scenario(name, cluster, queues, sim_jobs, sim or SimConfig(restart_overhead=PHILLY_RESTART))


def resolve_trace(name: str) -> Path:
    """A named trace (``philly``) under ``data/``, or a path to a trace file."""
    if name in NAMED:
        for d in DATA_DIRS:
            p = d / NAMED[name]
            if p.is_file():
                return p
        raise AifabError(
            f"trace {name!r}: {NAMED[name]} not found under data/ (run from the repository root)"
        )
    p = Path(name)
    if p.is_file():
        return p
    known = ", ".join(["philly", "synthetic[:SEED]"])
    raise AifabError(f"unknown trace {name!r}: not a named trace ({known}) nor a readable file")


def load_scenario(
    trace: str,
    *,
    nodes: int = 56,
    gpus_per_node: int = 8,
    limit_jobs: int | None = None,
    seed: int = 0,
    failures_mtbf: float | None = None,
    failures_repair: float = 3600.0,
    min_cycle_interval: float = 0.0,
    cycle_period: float = 60.0,
) -> Scenario:
    """Build the scenario for a trace name or path (``synthetic`` or ``synthetic:SEED`` too)."""
    failures = FailureModel(failures_mtbf, failures_repair, seed) if failures_mtbf is not None else None
    sim = SimConfig(
        restart_overhead=PHILLY_RESTART,
        min_cycle_interval=min_cycle_interval,
        cycle_period=cycle_period,
        failures=failures,
    )
    if trace == "synthetic" or trace.startswith("synthetic:"):
        try:
            s = int(trace.split(":", 1)[1]) if ":" in trace else seed
        except ValueError:
            raise AifabError(f"trace {trace!r}: expected synthetic:SEED with an integer seed") from None
        return synthetic_scenario(
            seed=s, jobs=limit_jobs or 500, nodes=nodes, gpus_per_node=gpus_per_node, projects=4, sim=sim
        )
    return philly_scenario(
        resolve_trace(trace), nodes=nodes, gpus_per_node=gpus_per_node, limit_jobs=limit_jobs, sim=sim
    )
