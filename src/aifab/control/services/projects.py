"""Departments and projects (the queue tree) and what each project uses and is owed."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from aifab.control.db.models import ACTIVE_RUN_STATES, QueueRow, StateRow, TaskRunRow, WorkloadRow
from aifab.control.services.auth import Principal, require_admin
from aifab.core.errors import ConflictError, NotFoundError, ValidationError
from aifab.core.queues import Queue, QueueTree, ResourceQuota
from aifab.core.resources import GPU_MILLI, ResourceKind

NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


@dataclass(frozen=True)
class QueueSpec:
    name: str
    parent: str | None = None
    deserved_gpus: float = 0.0
    over_quota_weight: float = 1.0
    limit_gpus: float | None = None
    priority: int = 0
    node_pool: str | None = None  # its workloads run in this pool unless their spec names one
    max_runtime: float | None = None  # seconds; caps every workload's runtime
    min_runtime: float | None = None  # seconds of guaranteed runtime before preemption
    retries: int | None = None  # retries after a failure, when the spec asks for fewer


def create_queue(s: Session, p: Principal, spec: QueueSpec) -> QueueRow:
    require_admin(p)
    if not NAME.match(spec.name) or len(spec.name) > 63:
        raise ValidationError(
            f"{spec.name!r} is not a valid name (lowercase letters, digits and '-')", field="name"
        )
    if s.get(QueueRow, spec.name) is not None:
        raise ConflictError(f"{spec.name} already exists", field="name")
    if spec.deserved_gpus < 0:
        raise ValidationError(f"must be >= 0, got {spec.deserved_gpus}", field="deserved_gpus")
    if spec.limit_gpus is not None and spec.limit_gpus < spec.deserved_gpus:
        raise ValidationError(
            f"limit {spec.limit_gpus} is below deserved {spec.deserved_gpus}", field="limit_gpus"
        )
    _check_policies(spec)
    if spec.parent is not None and s.get(QueueRow, spec.parent) is None:
        raise NotFoundError(f"no department {spec.parent}", field="parent")
    row = QueueRow(
        name=spec.name,
        parent=spec.parent,
        priority=spec.priority,
        gpu_deserved=round(spec.deserved_gpus * GPU_MILLI),
        gpu_weight=spec.over_quota_weight,
        gpu_limit=None if spec.limit_gpus is None else round(spec.limit_gpus * GPU_MILLI),
        node_pool=spec.node_pool,
        max_runtime=spec.max_runtime,
        min_runtime=spec.min_runtime,
        retries=spec.retries,
        created_at=time.time(),
    )
    s.add(row)
    s.flush()
    queue_tree(s)  # validates the whole tree (children's deserved within the parent's)
    return row


def _check_policies(spec: QueueSpec) -> None:
    if spec.node_pool is not None and not NAME.match(spec.node_pool):
        raise ValidationError(f"{spec.node_pool!r} is not a pool name", field="node_pool")
    if spec.max_runtime is not None and spec.max_runtime <= 0:
        raise ValidationError(f"must be > 0 seconds, got {spec.max_runtime}", field="max_runtime")
    if spec.min_runtime is not None and spec.min_runtime < 0:
        raise ValidationError(f"must be >= 0 seconds, got {spec.min_runtime}", field="min_runtime")
    if spec.max_runtime is not None and (spec.min_runtime or 0) > spec.max_runtime:
        raise ValidationError(
            f"the guaranteed runtime {spec.min_runtime} s exceeds max_runtime {spec.max_runtime} s",
            field="min_runtime",
        )
    if spec.retries is not None and spec.retries < 0:
        raise ValidationError(f"must be >= 0, got {spec.retries}", field="retries")


@dataclass(frozen=True)
class Policies:
    """A project's run policies as the control loops apply them."""

    node_pool: str | None = None
    max_runtime: float | None = None
    min_runtime: float = 0.0
    retries: int = 0

    def runtime_cap(self, spec_max: float | None) -> float | None:
        caps = [c for c in (spec_max, self.max_runtime) if c]
        return min(caps) if caps else None


def policies(s: Session) -> dict[str, Policies]:
    rows = s.execute(
        select(
            QueueRow.name, QueueRow.node_pool, QueueRow.max_runtime, QueueRow.min_runtime, QueueRow.retries
        )
    )
    return {
        name: Policies(pool, max_rt, min_rt or 0.0, retries or 0)
        for name, pool, max_rt, min_rt, retries in rows
    }


def queue_tree(s: Session) -> QueueTree:
    rows = s.scalars(select(QueueRow).order_by(QueueRow.name)).all()
    return QueueTree(_queue(r) for r in rows)


def _queue(r: QueueRow) -> Queue:
    quotas = {
        ResourceKind.GPU: ResourceQuota(r.gpu_deserved, r.gpu_weight, r.gpu_limit),
        ResourceKind.CPU: ResourceQuota(r.cpu_deserved, r.cpu_weight, r.cpu_limit),
        ResourceKind.MEMORY: ResourceQuota(r.memory_deserved, r.memory_weight, r.memory_limit),
    }
    return Queue(name=r.name, parent=r.parent, quotas=quotas, priority=r.priority)


def is_project(s: Session, name: str) -> bool:
    """A leaf queue (only projects hold workloads)."""
    if s.get(QueueRow, name) is None:
        return False
    return s.scalars(select(QueueRow.name).where(QueueRow.parent == name).limit(1)).first() is None


def overview(s: Session, p: Principal) -> list[dict[str, Any]]:
    """Per visible queue: deserved, fair share (from the last cycle), GPUs in use, pending count."""
    fair = _state(s, "fair_shares")
    in_use = _in_use_portable(s)
    pending = dict(
        s.execute(
            select(WorkloadRow.project, func.count())
            .where(WorkloadRow.phase == "pending")
            .group_by(WorkloadRow.project)
        ).all()
    )
    out = []
    for r in s.scalars(select(QueueRow).order_by(QueueRow.name)):
        if not p.visible(r.name) and not p.admin:
            continue
        out.append(
            {
                "name": r.name,
                "parent": r.parent,
                "deserved_gpus": r.gpu_deserved / GPU_MILLI,
                "limit_gpus": None if r.gpu_limit is None else r.gpu_limit / GPU_MILLI,
                "over_quota_weight": r.gpu_weight,
                "fair_share_gpus": fair.get(r.name, 0) / GPU_MILLI,
                "in_use_gpus": (in_use.get(r.name) or 0) / GPU_MILLI,
                "pending": int(pending.get(r.name, 0)),
                "node_pool": r.node_pool,
                "max_runtime": r.max_runtime,
                "min_runtime": r.min_runtime,
                "retries": r.retries,
            }
        )
    return out


def _in_use_portable(s: Session) -> dict[str, int]:
    out: dict[str, int] = {}
    rows = s.execute(
        select(WorkloadRow.project, TaskRunRow.gpu_milli, TaskRunRow.devices)
        .join(TaskRunRow, TaskRunRow.workload_id == WorkloadRow.id)
        .where(TaskRunRow.state.in_(ACTIVE_RUN_STATES))
    ).all()
    for project, milli, devices in rows:
        out[project] = out.get(project, 0) + milli * len(devices or [])
    return out


def _state(s: Session, key: str) -> dict[str, Any]:
    row = s.get(StateRow, key)
    return dict(row.value) if row is not None else {}


def put_state(s: Session, key: str, value: dict[str, Any]) -> None:
    row = s.get(StateRow, key)
    if row is None:
        s.add(StateRow(key=key, value=value))
    else:
        row.value = value
