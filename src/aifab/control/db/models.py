"""The control plane's tables (SQLAlchemy 2, typed). Alembic migrations own the schema.

Intent before action: a placement is written (``task_runs`` row in state ``bound``) before the
dispatcher launches it, and every phase change of a workload is an ``events`` row with a reason.
Times are UNIX seconds (floats): the scheduler core works in seconds and so do the loops.
"""

from __future__ import annotations

from typing import Any, ClassVar

from sqlalchemy import JSON, Boolean, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON, list[Any]: JSON}


class QueueRow(Base):
    """A department (parent None or a department) or a project (a leaf that holds workloads).

    Quotas per resource in the scheduler's units: milli-GPU, millicores, MiB. ``None`` limit =
    unlimited."""

    __tablename__ = "queues"

    name: Mapped[str] = mapped_column(String(63), primary_key=True)
    parent: Mapped[str | None] = mapped_column(ForeignKey("queues.name"), nullable=True)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    gpu_deserved: Mapped[int] = mapped_column(Integer, default=0)
    gpu_weight: Mapped[float] = mapped_column(Float, default=1.0)
    gpu_limit: Mapped[int | None] = mapped_column(Integer, nullable=True)
    cpu_deserved: Mapped[int] = mapped_column(Integer, default=0)
    cpu_weight: Mapped[float] = mapped_column(Float, default=1.0)
    cpu_limit: Mapped[int | None] = mapped_column(Integer, nullable=True)
    memory_deserved: Mapped[int] = mapped_column(Integer, default=0)
    memory_weight: Mapped[float] = mapped_column(Float, default=1.0)
    memory_limit: Mapped[int | None] = mapped_column(Integer, nullable=True)
    node_pool: Mapped[str | None] = mapped_column(String(63), nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    # Run policies for the project's workloads (None: none): runtime cap (s), guaranteed runtime
    # before preemption (s), retries after a failure.
    max_runtime: Mapped[float | None] = mapped_column(Float, nullable=True)
    min_runtime: Mapped[float | None] = mapped_column(Float, nullable=True)
    retries: Mapped[int | None] = mapped_column(Integer, nullable=True)


class NodeRow(Base):
    """A node as its backend last reported it. ``gpus`` = [{"index", "model", "memory_mib"}]."""

    __tablename__ = "nodes"

    name: Mapped[str] = mapped_column(String(253), primary_key=True)
    pool: Mapped[str] = mapped_column(String(63), default="default")
    backend: Mapped[str] = mapped_column(String(32), default="local")
    cpu_milli: Mapped[int] = mapped_column(Integer)
    memory_mib: Mapped[int] = mapped_column(Integer)
    gpus: Mapped[list[Any]] = mapped_column(JSON, default=list)
    labels: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    topology: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    schedulable: Mapped[bool] = mapped_column(Boolean, default=True)
    updated_at: Mapped[float] = mapped_column(Float)


class WorkloadRow(Base):
    """One submitted workload. ``spec`` is the validated spec as submitted (JSON);
    ``phase`` one of pending, scheduled, running, succeeded, failed, cancelled, preempted."""

    __tablename__ = "workloads"
    __table_args__ = (Index("ix_workloads_phase_submit", "phase", "submit_time"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, unique=True)  # submission order, for stable listings
    name: Mapped[str] = mapped_column(String(253))
    project: Mapped[str] = mapped_column(ForeignKey("queues.name"), index=True)
    kind: Mapped[str] = mapped_column(String(32), default="job")
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    phase: Mapped[str] = mapped_column(String(16), index=True)
    priority: Mapped[int] = mapped_column(Integer)
    priority_class: Mapped[str] = mapped_column(String(32))
    preemptible: Mapped[bool] = mapped_column(Boolean)
    submit_time: Mapped[float] = mapped_column(Float)
    queued_at: Mapped[float] = mapped_column(Float)  # since when it waits (submit or requeue)
    start_time: Mapped[float | None] = mapped_column(Float, nullable=True)
    end_time: Mapped[float | None] = mapped_column(Float, nullable=True)
    attempt: Mapped[int] = mapped_column(Integer, default=0)  # runs started so far
    failures: Mapped[int] = mapped_column(Integer, default=0)
    checkpoint_dir: Mapped[str] = mapped_column(Text)
    last_checkpoint_time: Mapped[float | None] = mapped_column(Float, nullable=True)
    lost_gpu_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    reason_code: Mapped[str | None] = mapped_column(String(32), nullable=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_by: Mapped[str | None] = mapped_column(String(63), nullable=True)
    updated_at: Mapped[float] = mapped_column(Float)


# Task-run states in which the run holds (or is about to hold) its node's resources.
ACTIVE_RUN_STATES = ("bound", "launching", "running", "evicting", "stopping")


class TaskRunRow(Base):
    """One task of one attempt: the placement the scheduler decided, then what really ran.

    ``state``: bound (decided, not yet launched), launching, running, exited, stopping (grace
    period after SIGTERM), lost (the backend no longer knows it)."""

    __tablename__ = "task_runs"
    __table_args__ = (UniqueConstraint("workload_id", "attempt", "task_index"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    workload_id: Mapped[str] = mapped_column(ForeignKey("workloads.id"), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    task_index: Mapped[int] = mapped_column(Integer)
    node: Mapped[str] = mapped_column(String(253))
    devices: Mapped[list[Any]] = mapped_column(JSON, default=list)
    gpu_milli: Mapped[int] = mapped_column(Integer, default=0)
    gpu_memory_mib: Mapped[int] = mapped_column(Integer, default=0)
    cpu_milli: Mapped[int] = mapped_column(Integer, default=0)
    memory_mib: Mapped[int] = mapped_column(Integer, default=0)
    state: Mapped[str] = mapped_column(String(16), index=True)
    handle: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # backend's own (pid, ...)
    exit_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    log_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    stop_deadline: Mapped[float | None] = mapped_column(Float, nullable=True)
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class EventRow(Base):
    """A workload's history: every phase change and decision, with its reason."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    workload_id: Mapped[str] = mapped_column(ForeignKey("workloads.id"), index=True)
    time: Mapped[float] = mapped_column(Float)
    kind: Mapped[str] = mapped_column(String(32))  # the new phase, or bind/evict/exit/...
    message: Mapped[str] = mapped_column(Text, default="")


class UserRow(Base):
    __tablename__ = "users"

    name: Mapped[str] = mapped_column(String(63), primary_key=True)
    admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[float] = mapped_column(Float)


class MembershipRow(Base):
    """A user's role in one project: member (submit and manage) or viewer (read only)."""

    __tablename__ = "memberships"

    user: Mapped[str] = mapped_column(ForeignKey("users.name"), primary_key=True)
    project: Mapped[str] = mapped_column(ForeignKey("queues.name"), primary_key=True)
    role: Mapped[str] = mapped_column(String(16))


class TokenRow(Base):
    """An API token, stored as a SHA-256 hash of the secret; ``prefix`` identifies it in lists."""

    __tablename__ = "tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user: Mapped[str] = mapped_column(ForeignKey("users.name"), index=True)
    prefix: Mapped[str] = mapped_column(String(16))
    secret_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[float] = mapped_column(Float)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)


class AuditRow(Base):
    """Append-only: who did what, when, from where."""

    __tablename__ = "audit"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    time: Mapped[float] = mapped_column(Float, index=True)
    actor: Mapped[str] = mapped_column(String(63))
    action: Mapped[str] = mapped_column(String(63))
    target: Mapped[str] = mapped_column(String(253), default="")
    source: Mapped[str] = mapped_column(String(253), default="")
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class StateRow(Base):
    """Small key/value facts the server keeps (e.g. the next workload sequence number)."""

    __tablename__ = "server_state"

    key: Mapped[str] = mapped_column(String(63), primary_key=True)
    value: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
