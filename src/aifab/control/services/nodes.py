"""Nodes as the backends report them, and their conversion to the scheduler's core nodes."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from aifab.backends.base import NodeInfo
from aifab.control.db.models import ACTIVE_RUN_STATES, NodeRow, TaskRunRow
from aifab.core.nodes import GpuDevice, Node


def sync_inventory(s: Session, backend: str, nodes: list[NodeInfo]) -> None:
    """Upsert what ``backend`` reports; its nodes it no longer reports become unschedulable."""
    seen = set()
    now = time.time()
    for info in nodes:
        seen.add(info.name)
        row = s.get(NodeRow, info.name)
        gpus = [{"index": g.index, "model": g.model, "memory_mib": g.memory_mib} for g in info.gpus]
        if row is None:
            row = NodeRow(
                name=info.name, cpu_milli=info.cpu_milli, memory_mib=info.memory_mib, updated_at=now
            )
            s.add(row)
        row.pool, row.backend = info.pool, backend
        row.cpu_milli, row.memory_mib, row.gpus = info.cpu_milli, info.memory_mib, gpus
        row.labels = {**info.labels, **({"aifab.io/virtual-gpus": "true"} if info.virtual_gpus else {})}
        row.topology, row.schedulable, row.updated_at = dict(info.topology), True, now
    for row in s.scalars(select(NodeRow).where(NodeRow.backend == backend)):
        if row.name not in seen:
            row.schedulable = False


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
    out = []
    for r in s.scalars(select(NodeRow).order_by(NodeRow.name)):
        u = used.get(r.name, [0.0, 0.0, 0.0])
        out.append(
            {
                "name": r.name,
                "pool": r.pool,
                "backend": r.backend,
                "schedulable": r.schedulable,
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
