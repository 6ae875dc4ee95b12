"""Nodes as the backends report them, and their conversion to the scheduler's core nodes."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from aifab.backends.base import NodeInfo
from aifab.backends.router import PoolInventory
from aifab.control.db.models import ACTIVE_RUN_STATES, NodeRow, StateRow, TaskRunRow
from aifab.core.nodes import GpuDevice, Node

ADDRESS_LABEL = "aifab.io/address"  # where a gang's torch.distributed master is reached
SHARING_LABEL = "aifab.io/gpu-sharing"  # "true": the pool's engine can share one GPU between tasks


def sync_inventory(s: Session, inv: PoolInventory, now: float | None = None) -> bool:
    """Upsert what one pool reports. Nodes it no longer reports, and every node of a pool whose
    engine cannot be reached, become unschedulable (their rows stay: their tasks may still run).
    Rows are touched only when something changed, so an idle cluster's fingerprint is stable.
    Returns whether anything changed."""
    now = time.time() if now is None else now
    seen = set()
    changed = False
    for info in inv.nodes:
        seen.add(info.name)
        want = _row_values(inv, info)
        row = s.get(NodeRow, info.name)
        if row is None:
            row = NodeRow(name=info.name, updated_at=now, **want)
            s.add(row)
            changed = True
        elif any(getattr(row, k) != v for k, v in want.items()):
            for k, v in want.items():
                setattr(row, k, v)
            row.updated_at, changed = now, True
    for row in s.scalars(select(NodeRow).where(NodeRow.pool == inv.pool)):
        if row.name not in seen and row.schedulable:
            row.schedulable, row.updated_at, changed = False, now, True
    return changed


def _row_values(inv: PoolInventory, info: NodeInfo) -> dict[str, Any]:
    labels = {**info.labels, ADDRESS_LABEL: info.address}
    if info.virtual_gpus:
        labels["aifab.io/virtual-gpus"] = "true"
    if inv.capabilities.fractional_gpus:
        labels[SHARING_LABEL] = "true"
    return {
        "pool": inv.pool,
        "backend": inv.kind,
        "cpu_milli": info.cpu_milli,
        "memory_mib": info.memory_mib,
        "gpus": [{"index": g.index, "model": g.model, "memory_mib": g.memory_mib} for g in info.gpus],
        "labels": labels,
        "topology": {**info.topology, "pool": inv.pool},
        "schedulable": True,
    }


def core_nodes(s: Session) -> tuple[Node, ...]:
    return tuple(_node(r) for r in s.scalars(select(NodeRow).order_by(NodeRow.name)))


def _node(r: NodeRow) -> Node:
    return Node(
        name=r.name,
        cpu_milli=r.cpu_milli,
        memory_mib=r.memory_mib,
        gpus=tuple(GpuDevice(int(g["index"]), str(g["model"]), int(g["memory_mib"])) for g in r.gpus),
        pool=r.pool,
        labels=dict(r.labels),
        topology=dict(r.topology),
        schedulable=r.schedulable,
    )


def listing(s: Session) -> list[dict[str, Any]]:
    used: dict[str, list[float]] = {}
    for node, devices, milli, cpu, mem in s.execute(
        select(
            TaskRunRow.node,
            TaskRunRow.devices,
            TaskRunRow.gpu_milli,
            TaskRunRow.cpu_milli,
            TaskRunRow.memory_mib,
        ).where(TaskRunRow.state.in_(ACTIVE_RUN_STATES))
    ):
        u = used.setdefault(node, [0.0, 0.0, 0.0])
        u[0] += milli * len(devices or []) / 1000
        u[1] += cpu / 1000
        u[2] += mem
    unreachable = pool_errors(s)
    out = []
    rows = list(s.scalars(select(NodeRow).order_by(NodeRow.name)))
    for pool in sorted(set(unreachable) - {r.pool for r in rows}):
        out.append(_unknown_pool(pool, unreachable[pool]))
    for r in rows:
        u = used.get(r.name, [0.0, 0.0, 0.0])
        out.append(
            {
                "name": r.name,
                "pool": r.pool,
                "backend": r.backend,
                "schedulable": r.schedulable,
                "state": _state(r, unreachable),
                "gpus": len(r.gpus),
                "gpu_model": r.gpus[0]["model"] if r.gpus else None,
                "gpus_in_use": round(u[0], 3),
                "cpu": r.cpu_milli / 1000,
                "cpu_in_use": u[1],
                "memory_mib": r.memory_mib,
                "virtual_gpus": r.labels.get("aifab.io/virtual-gpus") == "true",
            }
        )
    return out


def _unknown_pool(pool: str, why: str) -> dict[str, Any]:
    """A pool whose engine has never answered has no nodes to show; ``aifab nodes`` still says
    that the pool exists and why it has none (one row named after the pool)."""
    return {
        "name": f"({pool})",
        "pool": pool,
        "backend": "?",
        "schedulable": False,
        "state": f"unreachable: {why}",
        "gpus": 0,
        "gpu_model": None,
        "gpus_in_use": 0.0,
        "cpu": 0.0,
        "cpu_in_use": 0.0,
        "memory_mib": 0,
        "virtual_gpus": False,
    }


def pool_errors(s: Session) -> dict[str, str]:
    row = s.get(StateRow, "pool_errors")
    return dict(row.value) if row is not None else {}


def _state(r: NodeRow, unreachable: dict[str, str]) -> str:
    if r.pool in unreachable:
        return f"unreachable: {unreachable[r.pool]}"
    return "ready" if r.schedulable else "gone (no longer reported by its engine)"
