"""Placement policies: scheduler plugins that pick a node and GPU devices for one task.

``get_policy(name)`` returns one of ``random, dotprod, gpuclustering, gpupacking, bestfit, fgd,
aifab`` (the FGD paper's spellings are accepted, case-insensitively).
"""

from __future__ import annotations

from aifab.scheduler.placement.aifab import AifabPolicy, FillFgdPolicy
from aifab.scheduler.placement.api import PlacementChoice, PlacementContext, PlacementPolicy, task_shape
from aifab.scheduler.placement.base import ScoringPolicy, device_memory_groups, mix64
from aifab.scheduler.placement.baselines import (
    BestFitPolicy,
    DotProductPolicy,
    GpuClusteringPolicy,
    GpuPackingPolicy,
    RandomPolicy,
)
from aifab.scheduler.placement.fgd import FgdPolicy
from aifab.scheduler.placement.fragmentation import TargetWorkload, fragmentation
from aifab.scheduler.placement.view import ClusterView, PodShape

_POLICIES: dict[str, type[ScoringPolicy]] = {
    "random": RandomPolicy,
    "dotprod": DotProductPolicy,
    "gpuclustering": GpuClusteringPolicy,
    "gpupacking": GpuPackingPolicy,
    "bestfit": BestFitPolicy,
    "fgd": FgdPolicy,
    "aifab": AifabPolicy,
}
_ALIASES = {"dotproduct": "dotprod", "dot_product": "dotprod", "best_fit": "bestfit"}

POLICY_NAMES: tuple[str, ...] = tuple(_POLICIES)
BASELINE_NAMES: tuple[str, ...] = ("random", "dotprod", "gpuclustering", "gpupacking", "bestfit", "fgd")
PAPER_NAMES: dict[str, str] = {
    "random": "Random",
    "dotprod": "DotProd",
    "gpuclustering": "GpuClustering",
    "gpupacking": "GpuPacking",
    "bestfit": "BestFit",
    "fgd": "FGD",
    "aifab": "aifab",
}


def canonical_name(name: str) -> str:
    """'GpuPacking' -> 'gpupacking'; raises KeyError naming the known policies."""
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in _POLICIES:
        raise KeyError(f"unknown placement policy {name!r}; known: {', '.join(_POLICIES)}")
    return key


def get_policy(name: str) -> ScoringPolicy:
    """A fresh policy instance by name (policies are stateless; caches live in the view)."""
    return _POLICIES[canonical_name(name)]()


__all__ = [
    "BASELINE_NAMES",
    "PAPER_NAMES",
    "POLICY_NAMES",
    "AifabPolicy",
    "BestFitPolicy",
    "ClusterView",
    "DotProductPolicy",
    "FgdPolicy",
    "FillFgdPolicy",
    "GpuClusteringPolicy",
    "GpuPackingPolicy",
    "PlacementChoice",
    "PlacementContext",
    "PlacementPolicy",
    "PodShape",
    "RandomPolicy",
    "ScoringPolicy",
    "TargetWorkload",
    "canonical_name",
    "device_memory_groups",
    "fragmentation",
    "get_policy",
    "mix64",
    "task_shape",
]
