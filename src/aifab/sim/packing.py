"""The FGD paper's packing experiment (Weng et al., ATC'23, Fig. 7 and 11-14).

Protocol, as the artifact (hkust-adsl/kubernetes-scheduler-simulator) runs it:

1. Pods in name order are shuffled with the run's seed (``SortClusterPods``).
2. ``tune`` 1.3 (``TunePodsByNodeTotalResource`` / ``tuneUpPods``): pods drawn uniformly with
   replacement from the original list are appended until the next draw would push the arrived
   GPU demand past 130 % of cluster capacity (the artifact's check adds the draw's per-GPU
   milli, not its total; reproduced).
3. Nodes get a random order from the same seed; it breaks score ties (the artifact prefixes
   node names with ``rand.Perm`` and its scheduler keeps the smallest name among equal scores).
4. Pods are placed one at a time, none leaves. After each pod the allocated share
   (milli-GPU allocated / total) and the arrived demand (milli-GPU of all pods so far, placed or
   not) are recorded.
5. Allocation "at arrived X %" is the mean allocated share over the records whose arrived share
   rounds to X (``merge_alloc_discrete.py``), each record rounded to 2 decimals first.

Placement goes through :mod:`aifab.scheduler.placement` (the same policy objects the scheduler
uses) on one :class:`ClusterView` mutated in place.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from aifab.core.resources import GPU_MILLI
from aifab.scheduler.placement import PlacementContext, TargetWorkload, canonical_name, get_policy
from aifab.scheduler.placement.view import ClusterView, PodShape
from aifab.sim.traces.alibaba import TraceNode, TracePod

THRESHOLDS: tuple[int, ...] = (80, 90, 100, 110, 120, 130)
TUNE_RATIO = 1.3


@dataclass(frozen=True)
class PackingResult:
    trace: str
    policy: str
    seed: int
    alloc_at: dict[int, float]  # arrived % -> allocated % (artifact's discrete sampling)
    pods: int
    failed: int
    failed_gpu_milli: int
    arrived_pct: float
    allocated_pct: float
    seconds: float
    extra: dict[str, float] = field(default_factory=dict)


def inflate(
    pods: Sequence[TracePod], total_gpu_milli: int, seed: int, ratio: float = TUNE_RATIO
) -> list[int]:
    """Indices into ``pods`` in arrival order: shuffled, then tuned up to ``ratio`` x capacity."""
    rng = np.random.Generator(np.random.PCG64(seed))
    order = sorted(range(len(pods)), key=lambda i: pods[i].name)
    by_name = list(order)
    perm = rng.permutation(len(order))
    order = [order[int(i)] for i in perm]
    demand = sum(p.total_gpu_milli for p in pods)
    target = ratio * total_gpu_milli
    if ratio > 0 and demand > target:
        # tuneDownPods: drop random pods until under the target.
        while demand > target and order:
            drop = int(rng.integers(len(order)))
            demand -= pods[order[drop]].total_gpu_milli
            del order[drop]
    elif ratio > 0:
        while True:
            pick = by_name[int(rng.integers(len(by_name)))]
            if demand + pods[pick].gpu_milli > target:
                break
            demand += pods[pick].total_gpu_milli
            order.append(pick)
    return order


def build_view(nodes: Sequence[TraceNode], seed: int) -> ClusterView:
    """All nodes free, tie-break order drawn from the seed (independent of the pod stream)."""
    rng = np.random.Generator(np.random.PCG64([seed, 1]))
    rank = rng.permutation(len(nodes))
    return ClusterView.build(
        [n.name for n in nodes],
        [n.model for n in nodes],
        [n.gpus for n in nodes],
        [n.cpu_milli for n in nodes],
        [n.memory_mib for n in nodes],
        rank=[int(r) for r in rank],
    )


def target_workload(pods: Sequence[TracePod]) -> TargetWorkload:
    """FGD's target: the typical pods of the original (not inflated) trace."""
    return TargetWorkload.from_tasks(p.shape() for p in pods)


def discrete_allocation(
    arrived_pct: Sequence[float], alloc_pct: Sequence[float], thresholds: Sequence[int] = THRESHOLDS
) -> dict[int, float]:
    """The artifact's sampling: mean of round(alloc, 2) over records with round(arrived) == X,
    falling back to records within X +- 1 (``merge_alloc_discrete.py``)."""
    rounded = [round(a, 0) for a in arrived_pct]
    allocs = [round(a, 2) for a in alloc_pct]
    out: dict[int, float] = {}
    for x in thresholds:
        vals = [v for r, v in zip(rounded, allocs, strict=True) if r == x]
        if not vals:
            vals = [v for r, v in zip(rounded, allocs, strict=True) if x - 1 <= r <= x + 1]
        if vals:
            out[x] = round(float(np.mean(vals)), 2)
    return out


def run_packing(
    nodes: Sequence[TraceNode],
    pods: Sequence[TracePod],
    policy: str,
    seed: int,
    *,
    trace: str = "",
    ratio: float = TUNE_RATIO,
    thresholds: Sequence[int] = THRESHOLDS,
) -> PackingResult:
    """One run of the experiment; deterministic given (nodes, pods, policy, seed)."""
    started = time.perf_counter()
    name = canonical_name(policy)
    plugin = get_policy(name)
    view = build_view(nodes, seed)
    total_gpus = int(view.gpu_count.sum())
    total_milli = total_gpus * GPU_MILLI
    order = inflate(pods, total_milli, seed, ratio)
    ctx = PlacementContext(
        seed=seed,
        target=target_workload(pods),
        full_target=TargetWorkload.from_tasks((p.shape() for p in pods), 100),
    )
    shapes: dict[TracePod, PodShape] = {}
    arrived = used = failed = failed_milli = 0
    arrived_pct: list[float] = []
    alloc_pct: list[float] = []
    for tick, i in enumerate(order):
        pod = pods[i]
        shape = shapes.get(pod)
        if shape is None:
            shape = shapes.setdefault(pod, pod.shape())
        arrived += pod.total_gpu_milli
        choice = plugin.place(view, shape, ctx, tick)
        if choice is None:
            failed += 1
            failed_milli += pod.total_gpu_milli
        else:
            view.apply(choice[0], shape, choice[1])
            used += pod.total_gpu_milli
        # Same float expressions as merge_alloc_discrete.py: x / total_gpus / 10.
        arrived_pct.append(arrived / total_gpus / 10)
        alloc_pct.append(used / total_gpus / 10)
    return PackingResult(
        trace=trace,
        policy=name,
        seed=seed,
        alloc_at=discrete_allocation(arrived_pct, alloc_pct, thresholds),
        pods=len(order),
        failed=failed,
        failed_gpu_milli=failed_milli,
        arrived_pct=arrived / total_milli * 100,
        allocated_pct=used / total_milli * 100,
        seconds=time.perf_counter() - started,
    )


def parse_seeds(text: str) -> list[int]:
    """'42-44' -> [42, 43, 44]; '42,45' -> [42, 45]. Raises ValueError naming the bad text."""
    seeds: list[int] = []
    try:
        for part in text.split(","):
            if "-" in part:
                lo, hi = part.split("-", 1)
                seeds.extend(range(int(lo), int(hi) + 1))
            elif part.strip():
                seeds.append(int(part))
    except ValueError:
        raise ValueError(f"expected seeds like 42-44 or 42,45; got {text!r}") from None
    if not seeds:
        raise ValueError("no seeds given")
    return seeds


def load_published(path: Path) -> dict[tuple[str, str], dict[int, float]]:
    """The paper's published means, ``(trace, policy) -> {arrived %: allocated %}``; empty if absent."""
    out: dict[tuple[str, str], dict[int, float]] = {}
    if not path.exists():
        return out
    with path.open(newline="") as fh:
        for row in csv.DictReader(fh):
            out[(row["trace"], canonical_name(row["policy"]))] = {
                x: float(row[f"alloc_pct_at_arrived_{x}"]) for x in THRESHOLDS
            }
    return out
