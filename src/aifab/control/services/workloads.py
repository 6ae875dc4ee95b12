"""Workloads: submit, list, describe, cancel. The loops move them through their phases.

Phases: pending -> scheduled (placed, launching) -> running -> succeeded | failed | cancelled;
an evicted one goes preempted -> pending again (same checkpoint directory, next attempt).
Every transition is an event with a reason.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic_core import to_json
from sqlalchemy import Connection, Select, bindparam, case, func, insert, literal, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased

from aifab.control import spec as specs
from aifab.control.db.models import EventRow, QueueRow, TaskRunRow, WorkloadRow
from aifab.control.services import audit
from aifab.control.services.auth import Action, Principal, require
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
) -> dict[str, Any]:
    """Validate and store a workload spec (a dict as parsed from YAML/JSON), with its ``pending``
    event and its audit record, in the caller's transaction; return its :func:`summary`."""
    return store(s, [prepare(s, p, data, source)], checkpoints_root)[0]


@dataclass(frozen=True)
class NewWorkload:
    """A validated submission, ready to store: its columns (but its id and sequence number), and
    who submitted it from where (for its event and audit record)."""

    values: dict[str, Any]
    principal: Principal
    source: str


def prepare(
    s: Session,
    p: Principal,
    data: dict[str, Any],
    source: str = "",
    queues: dict[str, list[Any]] | None = None,
) -> NewWorkload:
    """Everything :func:`submit` checks, in its order (spec, role, project, limits), writing
    nothing. ``queues`` caches project lookups across the submissions of one transaction."""
    spec = specs.spec_from_dict(data, source="spec")
    require(p, Action.SUBMIT, spec.project)
    path = queues.get(spec.project) if queues is not None else None
    if path is None:
        path = _queue_path(s, spec.project)
        if queues is not None:
            queues[spec.project] = path
    now = time.time()
    probe = spec.to_workload("probe", now)
    _within_limits(path, spec.project, sum(t.nominal().gpu for t in probe.tasks[: probe.gang_size]))
    values: dict[str, Any] = {
        "name": spec.name,
        "project": spec.project,
        "kind": "job",
        "spec": spec.to_dict(),
        "phase": "pending",
        "priority": probe.priority,
        "priority_class": probe.priority_class,
        "preemptible": probe.preemptible,
        "submit_time": now,
        "queued_at": now,
        "start_time": None,
        "end_time": None,
        "attempt": 0,
        "failures": 0,
        "last_checkpoint_time": None,
        "lost_gpu_seconds": 0.0,
        "cancel_requested": False,
        "reason_code": None,
        "reason": None,
        "created_by": p.name,
        "updated_at": now,
    }
    return NewWorkload(values, p, source)


def store(s: Session, new: list[NewWorkload], checkpoints_root: Path) -> list[dict[str, Any]]:
    """Store prepared submissions in order, each with its ``pending`` event and audit record, in
    the caller's transaction; return their summaries. Three multi-row INSERTs whatever their
    number: the API stores the submissions that arrive together in one transaction.

    Sequence numbers: on SQLite the transaction holds the only write lock from its BEGIN, so
    nobody can take the next ones meanwhile. On PostgreSQL a concurrent transaction can; the
    INSERT then fails on the unique index and is tried again inside a savepoint."""
    if not new:
        return []
    conn = s.connection()
    if conn.dialect.name == "sqlite":
        return _store(conn, new, checkpoints_root)
    for _ in range(5):
        try:
            with conn.begin_nested():
                return _store(conn, new, checkpoints_root)
        except IntegrityError:
            continue
    raise ConflictError("could not allocate a workload id; try again")


def _store(conn: Connection, new: list[NewWorkload], checkpoints_root: Path) -> list[dict[str, Any]]:
    seq = conn.execute(_MAX_SEQ).scalar() or 0
    rows, events, records = [], [], []
    for n in new:
        seq += 1
        wid = f"w{seq}"
        v = {**n.values, "id": wid, "seq": seq, "checkpoint_dir": str(checkpoints_root / wid)}
        rows.append(v)
        events.append(
            {
                "workload_id": wid,
                "time": v["submit_time"],
                "kind": "pending",
                "message": f"submitted by {n.principal.name}",
            }
        )
        records.append(
            audit.entry(n.principal, "workload.submit", wid, n.source, project=v["project"], name=v["name"])
        )
    conn.execute(_INSERT_WORKLOAD, rows)
    conn.execute(_INSERT_EVENT, events)
    audit.append(conn, records)
    return [_summary(v) for v in rows]


_MAX_SEQ = select(func.max(WorkloadRow.seq))
_INSERT_WORKLOAD = insert(WorkloadRow.__table__)  # type: ignore[arg-type]
_INSERT_EVENT = insert(EventRow.__table__)  # type: ignore[arg-type]
# A project's row, whether any queue has it as parent, and its parent: one statement.
_CHILD = aliased(QueueRow)
_QUEUE = select(
    QueueRow.name,
    QueueRow.parent,
    QueueRow.gpu_limit,
    select(_CHILD.name).where(_CHILD.parent == QueueRow.name).limit(1).exists().label("has_children"),
).where(QueueRow.name == bindparam("name"))


def _queue_path(s: Session, project: str) -> list[Any]:
    """The project's queue and its departments up to the root (name, parent, gpu_limit), after
    checking that it exists and is a project (a leaf)."""
    conn = s.connection()
    first = conn.execute(_QUEUE, {"name": project}).first()
    if first is None:
        raise NotFoundError(f"no project {project}", field="project")
    if first.has_children:
        raise ValidationError(f"{project} is a department; only projects hold workloads", field="project")
    path = [first]
    seen = {project}
    while path[-1].parent is not None and path[-1].parent not in seen:
        up = conn.execute(_QUEUE, {"name": path[-1].parent}).first()
        if up is None:
            break
        seen.add(up.name)
        path.append(up)
    return path


def _within_limits(path: list[Any], project: str, gpu_milli: int) -> None:
    """A workload bigger than a GPU limit on its project's path could never start: refuse it."""
    for q in path:
        if q.gpu_limit is not None and gpu_milli > q.gpu_limit:
            kind = "project" if q.name == project else "department"
            raise ValidationError(
                f"needs {gpu_milli / 1000:g} GPUs but {kind} {q.name} is limited to {q.gpu_limit / 1000:g}",
                field="resources.gpus",
            )


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


SUMMARY_KEYS = (
    "id",
    "name",
    "project",
    "phase",
    "gpus",
    "replicas",
    "priority",
    "attempt",
    "submit_time",
    "start_time",
    "end_time",
    "reason",
    "reason_code",
)


def _summary_columns(dialect: str) -> tuple[Any, ...]:
    if dialect == "sqlite":
        # json_extract hands back the scalar as SQLite holds it (number or text): no JSON text
        # to decode per row, as the portable JSON path below would need.
        gpus: Any = func.json_extract(WorkloadRow.spec, "$.resources.gpus")
        replicas: Any = func.json_extract(WorkloadRow.spec, "$.replicas")
    else:  # PostgreSQL's driver decodes JSON values itself
        gpus, replicas = WorkloadRow.spec["resources"]["gpus"], WorkloadRow.spec["replicas"]
    return (
        WorkloadRow.id,
        WorkloadRow.name,
        WorkloadRow.project,
        WorkloadRow.phase,
        gpus,
        replicas,
        WorkloadRow.priority_class,
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
    fields of the spec it shows, as plain rows: a listing of 10,000 queued workloads is what
    `aifab ps` asks for."""
    conn = s.connection()
    q = _listing_query(p, select(*_summary_columns(conn.dialect.name)), project, phases, limit)
    out = [dict(zip(SUMMARY_KEYS, row, strict=False)) for row in conn.execute(q).all()]
    for d in out:
        if d["gpus"] is None:
            d["gpus"] = 0
        if d["replicas"] is None:
            d["replicas"] = 1
    return out


def listing_json(
    s: Session, p: Principal, project: str | None = None, phases: list[str] | None = None, limit: int = 1000
) -> bytes:
    """:func:`listing` as the JSON the API answers with.

    On SQLite the database writes that JSON itself, in one statement that returns one value. The
    point is the GIL: fetching 10,000 rows into Python takes and drops the interpreter lock once
    per row (the driver lets go of it around each step), and while the schedule loop's pass
    holds it (CPU-bound, up to a second with 10,000 queued), every one of those hand-overs waits
    for the loop's next switch: a listing that takes 80 ms alone took as long as the pass. One
    step needs the lock twice. Numbers are exact: a REAL is written as SQLite's ``quote()`` writes
    it, which reads back to the same double."""
    conn = s.connection()
    if conn.dialect.name != "sqlite" or not _exact_reals(conn):
        return to_json(listing(s, p, project, phases, limit))
    w = WorkloadRow
    shown = select(w.id, w.name, w.project, w.phase, w.spec, w.priority_class, w.attempt)
    shown = shown.add_columns(w.submit_time, w.start_time, w.end_time, w.reason, w.reason_code)
    rows = _listing_query(p, shown, project, phases, limit).subquery()
    pairs: list[Any] = []
    for key, value in (
        ("id", rows.c.id),
        ("name", rows.c.name),
        ("project", rows.c.project),
        ("phase", rows.c.phase),
        ("gpus", _number(func.coalesce(func.json_extract(rows.c.spec, "$.resources.gpus"), 0))),
        ("replicas", _number(func.coalesce(func.json_extract(rows.c.spec, "$.replicas"), 1))),
        ("priority", rows.c.priority_class),
        ("attempt", rows.c.attempt),
        ("submit_time", _number(rows.c.submit_time)),
        ("start_time", _number(rows.c.start_time)),
        ("end_time", _number(rows.c.end_time)),
        ("reason", rows.c.reason),
        ("reason_code", rows.c.reason_code),
    ):
        pairs += [literal(key), value]
    # SQLite aggregates a subquery that has a LIMIT in the subquery's order (it cannot flatten it).
    text = conn.execute(select(func.json_group_array(func.json_object(*pairs)))).scalar()
    return str(text or "[]").encode()


_REALS_CHECKED: dict[str, bool] = {}


def _exact_reals(conn: Connection) -> bool:
    """Whether this SQLite's ``quote()`` writes doubles that read back exactly (it is built for
    that, but its digits come from SQLite's own conversion); checked once per SQLite version on
    awkward values. Where not, the listing is built in Python."""
    version = str(conn.dialect.server_version_info)
    if version not in _REALS_CHECKED:
        samples = [1795904232.8532548, 0.1, 1 / 3, 2.0**-1074, 1.7976931348623157e308, 123456789.12345679]
        samples += [1.7e9 + i * 0.0123456789 for i in range(50)] + [i / 7 for i in range(1, 50)]
        texts = conn.execute(select(*(func.json(func.quote(literal(x))) for x in samples))).one()
        _REALS_CHECKED[version] = all(float(t) == x for t, x in zip(texts, samples, strict=True))
    return _REALS_CHECKED[version]


def _number(value: Any) -> Any:
    """A SQLite value for json_object: a REAL exactly (json_object itself writes 15 digits)."""
    return case((func.typeof(value) == "real", func.json(func.quote(value))), else_=value)


def _listing_query(
    p: Principal, q: Select[Any], project: str | None, phases: list[str] | None, limit: int
) -> Select[Any]:
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
    return q.order_by(WorkloadRow.seq).limit(limit)


def summary(row: WorkloadRow) -> dict[str, Any]:
    return _summary(
        {
            "id": row.id,
            "name": row.name,
            "project": row.project,
            "phase": row.phase,
            "spec": row.spec,
            "priority_class": row.priority_class,
            "attempt": row.attempt,
            "submit_time": row.submit_time,
            "start_time": row.start_time,
            "end_time": row.end_time,
            "reason": row.reason,
            "reason_code": row.reason_code,
        }
    )


def _summary(v: dict[str, Any]) -> dict[str, Any]:
    res = v["spec"].get("resources", {})
    return {
        "id": v["id"],
        "name": v["name"],
        "project": v["project"],
        "phase": v["phase"],
        "gpus": res.get("gpus", 0),
        "replicas": v["spec"].get("replicas", 1),
        "priority": v["priority_class"],
        "attempt": v["attempt"],
        "submit_time": v["submit_time"],
        "start_time": v["start_time"],
        "end_time": v["end_time"],
        "reason": v["reason"],
        "reason_code": v["reason_code"],
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
