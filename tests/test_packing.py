"""The packing experiment engine on a small slice of the openb trace."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import pytest

from aifab.scheduler.placement import POLICY_NAMES
from aifab.sim.packing import discrete_allocation, inflate, run_packing
from aifab.sim.traces.alibaba import TraceNode, TracePod, load_nodes, load_pods

DATA = Path(__file__).resolve().parents[1] / "data" / "alibaba-gpu-v2023"


@lru_cache(maxsize=1)
def _slice() -> tuple[list[TraceNode], list[TracePod]]:
    nodes = load_nodes(DATA / "openb_node_list_gpu_node.csv")
    pods = load_pods(DATA / "openb_pod_list_gpuspec10.csv")
    # Every 12th node keeps the model mix; 500 pods oversubscribe it well past 130 %.
    return nodes[::12], pods[:500]


def test_inflation_reaches_but_does_not_pass_130_percent() -> None:
    nodes, pods = _slice()
    total = sum(n.gpus for n in nodes) * 1000
    order = inflate(pods, total, seed=42)
    demand = sum(pods[i].total_gpu_milli for i in order)
    assert 1.0 * total < demand <= 1.3 * total or len(order) < len(pods)
    assert order == inflate(pods, total, seed=42)
    assert order != inflate(pods, total, seed=43)


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_small_run_is_deterministic_and_sane(policy: str) -> None:
    nodes, pods = _slice()
    a = run_packing(nodes, pods, policy, seed=42, trace="slice")
    b = run_packing(nodes, pods, policy, seed=42, trace="slice")
    assert a.alloc_at == b.alloc_at and a.failed == b.failed
    assert 0 < a.allocated_pct <= 100.0
    assert a.arrived_pct <= 130.0 + 1e-9
    assert a.failed > 0  # oversubscribed on purpose
    assert all(0 <= v <= 100 for v in a.alloc_at.values())


def test_discrete_allocation_uses_rounded_arrival_and_fallback() -> None:
    arrived = [79.4, 79.6, 80.4, 80.6, 95.0]
    alloc = [70.0, 71.0, 72.001, 73.0, 90.0]
    out = discrete_allocation(arrived, alloc, thresholds=(80, 81, 94, 100))
    assert out[80] == round((71.0 + 72.0) / 2, 2)  # 79.6 and 80.4 round to 80
    assert out[81] == 73.0  # 80.6 rounds to 81
    assert out[94] == 90.0  # nothing at 94: falls back to 93..95
    assert 100 not in out
