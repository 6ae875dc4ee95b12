"""Workloads: submit, list, describe, cancel. The loops move them through their phases.

Phases: pending -> scheduled (placed, launching) -> running -> succeeded | failed | cancelled;
an evicted one goes preempted -> pending again (same checkpoint directory, next attempt).
Every transition is an event with a reason.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from aifab.control import spec as specs
from aifab.control.db.models import EventRow, QueueRow, TaskRunRow, WorkloadRow
from aifab.control.services import audit
from aifab.control.services.auth import Action, Principal, require
from aifab.control.services.projects import is_project
from aifab.core.errors import ConflictError, NotFoundError, ValidationError
from aifab.core.queues import QueueTree

PHASES = ("pending", "scheduled", "running", "succeeded", "failed", "cancelled", "preempted")
ACTIVE_PHASES = ("pending", "scheduled", "running")
FINAL_PHASES = ("succeeded", "failed", "cancelled")


def event(s: Session, wid: str, kind: str, message: str = "", at: float | None = None) -> None:
    s.add(EventRow(workload_id=wid, time=time.time() if at is None else at, kind=kind, message=message))


def transition(s: Session, row: WorkloadRow, phase: str, message: str, at: float | None = None) -> None:
    now = time.time() if at is None else at
    row.phase = phase
    row.updated_at = now
    event(s, row.id, phase, message, now)


def submit(
    s: Session,
    p: Principal,
    data: dict[str, Any],
    checkpoints_root: Path,
    tree: QueueTree | None = None,
    source: str = "",
) -> WorkloadRow:
    """Validate and store a workload spec (a dict as parsed from YAML/JSON)."""
    spec = specs.spec_from_dict(data, source="spec")
    require(p, Action.SUBMIT, spec.project)
    if s.get(QueueRow, spec.project) is None:
        raise NotFoundError(f"no project {spec.project}", field="project")
    if not is_project(s, spec.project):
        raise ValidationError(
            f"{spec.project} is a department; only projects hold workloads", field="project"
        )
    now = time.time()
    probe = spec.to_workload("probe", now)
    _within_limits(s, spec.project, sum(t.nominal().gpu for t in probe.tasks[: probe.gang_size]))
    for _ in range(5):  # two submissions may race for the same sequence number on PostgreSQL
        seq = (s.scalar(select(func.max(WorkloadRow.seq))) or 0) + 1
        wid = f"w{seq}"
        row = WorkloadRow(
            id=wid,
            seq=seq,
            name=spec.name,
            project=spec.project,
            kind="job",
            spec=spec.to_dict(),
            phase="pending",
            priority=probe.priority,
            priority_class=probe.priority_class,
            preemptible=probe.preemptible,
            submit_time=now,
            queued_at=now,
            checkpoint_dir=str(checkpoints_root / wid),
            created_by=p.name,
            updated_at=now,
        )
        try:
            with s.begin_nested():
                s.add(row)
                s.flush()
        except IntegrityError:
            continue
        event(s, wid, "pending", f"submitted by {p.name}", now)
        audit.record(s, p, "workload.submit", wid, source, project=spec.project, name=spec.name)
        return row
    raise ConflictError("could not allocate a workload id; try again")


def _within_limits(s: Session, project: str, gpu_milli: int) -> None:
    """A workload bigger than a GPU limit on its project's path could never start: refuse it."""
    name: str | None = project
    while name is not None:
        q = s.get(QueueRow, name)
        if q is None:
            return
        if q.gpu_limit is not None and gpu_milli > q.gpu_limit:
            kind = "project" if name == project else "department"
            raise ValidationError(
                f"needs {gpu_milli / 1000:g} GPUs but {kind} {name} is limited to {q.gpu_limit / 1000:g}",
                field="resources.gpus",
            )
        name = q.parent


def get(s: Session, p: Principal, ref: str) -> WorkloadRow:
    """A workload by id, or by name when exactly one visible workload has it (latest first)."""
    row = s.get(WorkloadRow, ref)
    if row is None:
        rows = [
            r
            for r in s.scalars(
                select(WorkloadRow).where(WorkloadRow.name == ref).order_by(WorkloadRow.seq.desc())
            )
            if p.visible(r.project)
        ]
        row = rows[0] if rows else None
    if row is None or not p.visible(row.project):
        raise NotFoundError(f"no workload {ref}", field="workload")
    return row


SUMMARY_COLUMNS = (
    WorkloadRow.id,
    WorkloadRow.name,
    WorkloadRow.project,
    WorkloadRow.phase,
    WorkloadRow.spec["resources"]["gpus"].label("gpus"),
    WorkloadRow.spec["replicas"].label("replicas"),
    WorkloadRow.priority_class.label("priority"),
    WorkloadRow.attempt,
    WorkloadRow.submit_time,
    WorkloadRow.start_time,
    WorkloadRow.end_time,
    WorkloadRow.reason,
    WorkloadRow.reason_code,
)


def listing(
    s: Session, p: Principal, project: str | None = None, phases: list[str] | None = None, limit: int = 1000
) -> list[dict[str, Any]]:
    """Summaries (as :func:`summary` gives) in submission order. Selects the columns, and the two
    fields of the spec it shows, without building ORM objects: a listing of 10,000 queued
    workloads is what `aifab ps` asks for."""
    q = select(*SUMMARY_COLUMNS).order_by(WorkloadRow.seq)
    if project is not None:
        require(p, Action.READ, project)
        q = q.where(WorkloadRow.project == project)
    elif not p.admin:
        q = q.where(WorkloadRow.project.in_([k for k in p.roles]))
    if phases:
        bad = [x for x in phases if x not in PHASES]
        if bad:
            raise ValidationError(f"unknown phase {bad[0]!r}; known: {', '.join(PHASES)}", field="phase")
        q = q.where(WorkloadRow.phase.in_(phases))
    out = []
    for row in s.execute(q.limit(limit)).mappings():
        d = dict(row)
        d["gpus"] = 0 if d["gpus"] is None else d["gpus"]
        d["replicas"] = 1 if d["replicas"] is None else d["replicas"]
        out.append(d)
    return out


def summary(row: WorkloadRow) -> dict[str, Any]:
    res = row.spec.get("resources", {})
    return {
        "id": row.id,
        "name": row.name,
        "project": row.project,
        "phase": row.phase,
        "gpus": res.get("gpus", 0),
        "replicas": row.spec.get("replicas", 1),
        "priority": row.priority_class,
        "attempt": row.attempt,
        "submit_time": row.submit_time,
        "start_time": row.start_time,
        "end_time": row.end_time,
        "reason": row.reason,
        "reason_code": row.reason_code,
    }


def describe(s: Session, p: Principal, ref: str) -> dict[str, Any]:
    row = get(s, p, ref)
    events = s.scalars(select(EventRow).where(EventRow.workload_id == row.id).order_by(EventRow.id)).all()
    runs = s.scalars(
        select(TaskRunRow)
        .where(TaskRunRow.workload_id == row.id)
        .order_by(TaskRunRow.attempt, TaskRunRow.task_index)
    ).all()
    return {
        **summary(row),
        "spec": row.spec,
        "checkpoint_dir": row.checkpoint_dir,
        "last_checkpoint_time": row.last_checkpoint_time,
        "lost_gpu_seconds": row.lost_gpu_seconds,
        "failures": row.failures,
        "created_by": row.created_by,
        "events": [{"time": e.time, "kind": e.kind, "message": e.message} for e in events],
        "tasks": [
            {
                "attempt": r.attempt,
                "task": r.task_index,
                "node": r.node,
                "devices": list(r.devices),
                "gpu_milli": r.gpu_milli,
                "state": r.state,
                "exit_code": r.exit_code,
                "started_at": r.started_at,
                "finished_at": r.finished_at,
            }
            for r in runs
        ],
    }


def cancel(s: Session, p: Principal, ref: str, source: str = "") -> WorkloadRow:
    row = get(s, p, ref)
    require(p, Action.MANAGE, row.project)
    if row.phase in FINAL_PHASES:
        raise ConflictError(f"workload {row.id} already {row.phase}")
    audit.record(s, p, "workload.cancel", row.id, source)
    if row.phase in ("pending", "preempted"):
        row.end_time = time.time()
        transition(s, row, "cancelled", f"cancelled by {p.name} while waiting")
        return row
    row.cancel_requested = True  # the dispatcher stops its tasks with the grace period
    row.updated_at = time.time()
    event(s, row.id, "cancel", f"cancel requested by {p.name}")
    return row


def task_run(s: Session, p: Principal, ref: str, task: int = 0, attempt: int | None = None) -> TaskRunRow:
    row = get(s, p, ref)
    q = select(TaskRunRow).where(TaskRunRow.workload_id == row.id, TaskRunRow.task_index == task)
    if attempt is not None:
        q = q.where(TaskRunRow.attempt == attempt)
    run = s.scalars(q.order_by(TaskRunRow.attempt.desc())).first()
    if run is None:
        raise NotFoundError(f"workload {row.id} has no task {task} that ran yet", field="task")
    return run
