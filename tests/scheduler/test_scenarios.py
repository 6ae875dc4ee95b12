"""Scenario tables (scenarios/*.yaml): nodes, queues, workloads, expected decisions.

Each scenario runs ``cycles`` cycles (default 3), applying the decisions between them: the
expectations are checked on the first cycle and, unless ``stable: false``, the later cycles
must decide nothing new (the schedule is a fixed point).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from aifab.core import ClusterSnapshot, CycleResult, gpu_queue, uniform_node
from aifab.core.nodes import Node
from aifab.core.workloads import Workload
from aifab.scheduler import SchedulerConfig, run_cycle
from aifab.scheduler.config import Fairness

from .helpers import Placer, apply, running, tree, workload

HERE = Path(__file__).parent / "scenarios"
FILES = sorted(HERE.glob("*.yaml"))
WORKLOAD_KEYS = {
    "gpus",
    "tasks",
    "gpu_memory",
    "cpu",
    "memory",
    "topology",
    "models",
    "priority",
    "preemptible",
    "min_available",
    "node_pool",
    "node_selector",
    "submit_time",
    "start_time",
    "last_checkpoint_time",
    "checkpoint_interval",
    "attained_gpu_seconds",
    "expected_duration",
    "min_runtime",
}


def _scenarios() -> list[Any]:
    out = []
    for f in FILES:
        for doc in yaml.safe_load_all(f.read_text()):
            out.append(pytest.param(doc, id=f"{f.stem}:{doc['name']}"))
    return out


def _nodes(spec: list[dict[str, Any]]) -> tuple[Node, ...]:
    out = []
    for n in spec:
        names = (
            [n["name"]]
            if n.get("count", 1) == 1 and "count" not in n
            else [f"{n['name']}{i}" for i in range(n["count"])]
        )
        for name in names:
            topo = {k: n[k] for k in ("zone", "rack") if k in n}
            node = uniform_node(
                name,
                n.get("gpus", 8),
                gpu_model=n.get("model", "A100-80GB"),
                pool=n.get("pool", "default"),
                topology=topo,
                labels=n.get("labels", {}),
                gpu_memory_mib=n.get("gpu_memory", 81920),
                cpu_milli=n.get("cpu", 64000),
                memory_mib=n.get("memory_mib", 512 * 1024),
            )
            if n.get("schedulable") is False:
                node = Node(
                    **{**{f: getattr(node, f) for f in node.__dataclass_fields__}, "schedulable": False}
                )
            out.append(node)
    return tuple(out)


def _workload(spec: dict[str, Any]) -> Workload:
    kw = {k: v for k, v in spec.items() if k in WORKLOAD_KEYS}
    return workload(spec["id"], spec["queue"], **kw)


def build(doc: dict[str, Any]) -> tuple[ClusterSnapshot, SchedulerConfig]:
    nodes = _nodes(doc["nodes"])
    queues = tree(
        *(
            gpu_queue(
                q["name"],
                q.get("deserved", 0),
                parent=q.get("parent"),
                weight=q.get("weight", 1.0),
                limit_gpus=q.get("limit"),
                priority=q.get("priority", 0),
            )
            for q in doc["queues"]
        )
    )
    placer = Placer(nodes)
    ws = [running(_workload(r), placer, r["node"], r.get("start_time", 0.0)) for r in doc.get("running", [])]
    ws += [_workload(p) for p in doc.get("pending", [])]
    cfg = dict(doc.get("config", {}))
    if "fairness" in cfg:
        cfg["fairness"] = Fairness(cfg["fairness"])
    if "actions" in cfg:
        cfg["actions"] = tuple(cfg["actions"])
    cfg.setdefault("placement", "binpack")
    return ClusterSnapshot(nodes, queues, tuple(ws), now=doc.get("now", 1000.0)), SchedulerConfig(**cfg)


def check_first(doc: dict[str, Any], r: CycleResult) -> None:
    exp = doc.get("expect", {})
    bound = r.bound_workloads()
    evicted = {e.workload_id: e for e in r.evictions}
    name = doc["name"]
    if "bound" in exp:
        assert bound == set(exp["bound"]), f"{name}: bound {sorted(bound)}"
    for w in exp.get("bound_include", []):
        assert w in bound, f"{name}: {w} not bound; pending={r.pending.get(w)}"
    if "evicted" in exp:
        assert set(evicted) == set(exp["evicted"]), f"{name}: evicted {sorted(evicted)}"
    for w, cause in exp.get("eviction_cause", {}).items():
        assert evicted[w].cause.value == cause
    for w, n in exp.get("tasks_bound", {}).items():
        got = sum(1 for b in r.binds if b.workload_id == w)
        assert got == n, f"{name}: {got} tasks of {w} bound, expected {n}"
    for w, node in exp.get("nodes", {}).items():
        got = {b.node for b in r.binds if b.workload_id == w}
        want = set(node) if isinstance(node, list) else {node}
        assert got <= want if exp.get("nodes_subset") else got == want, f"{name}: {w} on {got}"
    for w, spec in exp.get("same_domain", {}).items():
        nodes = {b.node for b in r.binds if b.workload_id == w}
        assert len({n.rstrip("0123456789") for n in nodes}) == 1 or len(nodes) <= spec, (
            f"{name}: {w} on {nodes}"
        )
    for w, want in exp.get("pending", {}).items():
        assert w in r.pending, f"{name}: {w} not pending"
        got = r.pending[w]
        assert got.code.value == want["code"], f"{name}: {w}: {got.code} {got.message}"
        for part in [want["message"]] if isinstance(want.get("message"), str) else want.get("message", []):
            assert part in got.message, f"{name}: {w}: {got.message!r} lacks {part!r}"
    for q, gpus in exp.get("fair_share", {}).items():
        assert r.fair_shares[q].gpu == round(gpus * 1000), f"{name}: fair share of {q} is {r.fair_shares[q]}"
    for w, lost in exp.get("lost_gpu_seconds", {}).items():
        assert evicted[w].lost_gpu_seconds == pytest.approx(lost)


@pytest.mark.parametrize("doc", _scenarios())
def test_scenario(doc: dict[str, Any]) -> None:
    snap, cfg = build(doc)
    r = run_cycle(snap, cfg)
    check_first(doc, r)
    assert run_cycle(snap, cfg) == r, "same input must give the same output"
    snap = apply(snap, r, now=snap.now + 1)
    for _ in range(doc.get("cycles", 3) - 1):
        r = run_cycle(snap, cfg)
        if doc.get("stable", True):
            assert not r.binds and not r.evictions, f"{doc['name']}: not stable: {r.binds} {r.evictions}"
        snap = apply(snap, r, now=snap.now + 1)


def test_there_are_scenarios_for_every_semantic() -> None:
    names = " ".join(p.id for p in _scenarios())
    for word in [
        "fair",
        "borrow",
        "limit",
        "reclaim",
        "preempt",
        "non-preemptible",
        "gang",
        "topology",
        "fraction",
        "model",
        "pool",
        "consolidat",
        "cost",
        "fifo",
        "static",
        "explain",
    ]:
        assert word in names, word
