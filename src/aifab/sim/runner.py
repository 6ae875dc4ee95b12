"""Run several policies over one scenario, sequentially or in worker processes."""

from __future__ import annotations

import queue as queue_mod
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Any

from aifab.sim.engine import simulate
from aifab.sim.metrics import RunMetrics, compute_metrics
from aifab.sim.policies import get_policy
from aifab.sim.scenarios import load_scenario

# progress(policy, simulated seconds, done)
ProgressCallback = Callable[[str, float, bool], None]


@dataclass(frozen=True)
class RunSpec:
    """What a worker needs to rebuild the scenario itself (cheaper than pickling 50k jobs)."""

    trace: str
    nodes: int = 56
    gpus_per_node: int = 8
    limit_jobs: int | None = None
    seed: int = 0
    failures_mtbf: float | None = None
    min_cycle_interval: float = 0.0
    cycle_period: float = 60.0

    def scenario_kwargs(self) -> dict[str, Any]:
        return {
            "nodes": self.nodes,
            "gpus_per_node": self.gpus_per_node,
            "limit_jobs": self.limit_jobs,
            "seed": self.seed,
            "failures_mtbf": self.failures_mtbf,
            "min_cycle_interval": self.min_cycle_interval,
            "cycle_period": self.cycle_period,
        }


def horizon(spec: RunSpec) -> float:
    """The last submit time: a progress bar's length (the replay runs somewhat past it)."""
    sc = load_scenario(spec.trace, **spec.scenario_kwargs())
    return max((j.submit_time for j in sc.jobs), default=0.0) or 1.0


def _run_one(spec: RunSpec, policy: str, progress_queue: Any = None) -> RunMetrics:
    scenario = load_scenario(spec.trace, **spec.scenario_kwargs())
    config = get_policy(policy)

    def tick(t: float) -> None:
        if progress_queue is not None:
            progress_queue.put((policy, t, False))

    outcome = simulate(scenario, config, policy=policy, progress=tick)
    return compute_metrics(outcome)


def run_policies(
    spec: RunSpec, policies: Sequence[str], *, jobs: int = 1, progress: ProgressCallback | None = None
) -> list[RunMetrics]:
    for p in policies:
        get_policy(p)  # fail fast on a bad name, before any work
    if jobs <= 1 or len(policies) <= 1:
        results = []
        for p in policies:
            scenario = load_scenario(spec.trace, **spec.scenario_kwargs())

            def tick(t: float, p: str = p) -> None:
                if progress is not None:
                    progress(p, t, False)

            out = simulate(scenario, get_policy(p), policy=p, progress=tick)
            results.append(compute_metrics(out))
            if progress is not None:
                progress(p, out.counters["sim_seconds"], True)
        return results
    ctx = get_context("spawn")
    with ctx.Manager() as manager, ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        q = manager.Queue()
        futures: dict[str, Future[RunMetrics]] = {p: pool.submit(_run_one, spec, p, q) for p in policies}
        reported: set[str] = set()
        while len(reported) < len(futures):
            try:
                p, t, _ = q.get(timeout=0.2)
                if progress is not None:
                    progress(p, t, False)
            except queue_mod.Empty:
                pass
            for p, f in futures.items():
                if p not in reported and f.done():
                    reported.add(p)
                    if progress is not None and f.exception() is None:
                        progress(p, 0.0, True)
        return [futures[p].result() for p in policies]
