"""The first tables: queues, nodes, workloads and their task runs and events, users, memberships,
tokens, the audit log and the server's key/value state.

Written out by hand (not generated) so that it stays what it was when released, whatever the
models become; ``tests/control/test_db.py`` proves it still matches them.

Revision ID: 0001_initial
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001_initial"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    _create_queues()
    _create_nodes()
    _create_workloads()
    _create_task_runs()
    _create_events()
    _create_users()
    _create_memberships()
    _create_tokens()
    _create_audit()
    _create_server_state()


def downgrade() -> None:
    # Children before parents, so that no foreign key is left pointing at a dropped table.
    for table in (
        "server_state",
        "audit",
        "tokens",
        "memberships",
        "users",
        "events",
        "task_runs",
        "workloads",
        "nodes",
        "queues",
    ):
        op.drop_table(table)  # drops the table's indexes with it


def _create_queues() -> None:
    # Quotas in the scheduler's units (milli-GPU, millicores, MiB); a NULL limit is unlimited.
    op.create_table(
        "queues",
        sa.Column("name", sa.String(63), nullable=False),
        sa.Column("parent", sa.String(63), nullable=True),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("gpu_deserved", sa.Integer(), nullable=False),
        sa.Column("gpu_weight", sa.Float(), nullable=False),
        sa.Column("gpu_limit", sa.Integer(), nullable=True),
        sa.Column("cpu_deserved", sa.Integer(), nullable=False),
        sa.Column("cpu_weight", sa.Float(), nullable=False),
        sa.Column("cpu_limit", sa.Integer(), nullable=True),
        sa.Column("memory_deserved", sa.Integer(), nullable=False),
        sa.Column("memory_weight", sa.Float(), nullable=False),
        sa.Column("memory_limit", sa.Integer(), nullable=True),
        sa.Column("node_pool", sa.String(63), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
        sa.ForeignKeyConstraint(["parent"], ["queues.name"]),
    )


def _create_nodes() -> None:
    op.create_table(
        "nodes",
        sa.Column("name", sa.String(253), nullable=False),
        sa.Column("pool", sa.String(63), nullable=False),
        sa.Column("backend", sa.String(32), nullable=False),
        sa.Column("cpu_milli", sa.Integer(), nullable=False),
        sa.Column("memory_mib", sa.Integer(), nullable=False),
        sa.Column("gpus", sa.JSON(), nullable=False),
        sa.Column("labels", sa.JSON(), nullable=False),
        sa.Column("topology", sa.JSON(), nullable=False),
        sa.Column("schedulable", sa.Boolean(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )


def _create_workloads() -> None:
    op.create_table(
        "workloads",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(253), nullable=False),
        sa.Column("project", sa.String(63), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("phase", sa.String(16), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("priority_class", sa.String(32), nullable=False),
        sa.Column("preemptible", sa.Boolean(), nullable=False),
        sa.Column("submit_time", sa.Float(), nullable=False),
        sa.Column("queued_at", sa.Float(), nullable=False),
        sa.Column("start_time", sa.Float(), nullable=True),
        sa.Column("end_time", sa.Float(), nullable=True),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("checkpoint_dir", sa.Text(), nullable=False),
        sa.Column("last_checkpoint_time", sa.Float(), nullable=True),
        sa.Column("lost_gpu_seconds", sa.Float(), nullable=False),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("reason_code", sa.String(32), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("created_by", sa.String(63), nullable=True),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("seq"),
        sa.ForeignKeyConstraint(["project"], ["queues.name"]),
    )
    op.create_index("ix_workloads_project", "workloads", ["project"])
    op.create_index("ix_workloads_phase", "workloads", ["phase"])
    op.create_index("ix_workloads_phase_submit", "workloads", ["phase", "submit_time"])


def _create_task_runs() -> None:
    op.create_table(
        "task_runs",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("workload_id", sa.String(32), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("task_index", sa.Integer(), nullable=False),
        sa.Column("node", sa.String(253), nullable=False),
        sa.Column("devices", sa.JSON(), nullable=False),
        sa.Column("gpu_milli", sa.Integer(), nullable=False),
        sa.Column("gpu_memory_mib", sa.Integer(), nullable=False),
        sa.Column("cpu_milli", sa.Integer(), nullable=False),
        sa.Column("memory_mib", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("handle", sa.JSON(), nullable=False),
        sa.Column("exit_code", sa.Integer(), nullable=True),
        sa.Column("log_path", sa.Text(), nullable=True),
        sa.Column("stop_deadline", sa.Float(), nullable=True),
        sa.Column("started_at", sa.Float(), nullable=True),
        sa.Column("finished_at", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("workload_id", "attempt", "task_index"),
        sa.ForeignKeyConstraint(["workload_id"], ["workloads.id"]),
    )
    op.create_index("ix_task_runs_workload_id", "task_runs", ["workload_id"])
    op.create_index("ix_task_runs_state", "task_runs", ["state"])


def _create_events() -> None:
    op.create_table(
        "events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("workload_id", sa.String(32), nullable=False),
        sa.Column("time", sa.Float(), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.ForeignKeyConstraint(["workload_id"], ["workloads.id"]),
    )
    op.create_index("ix_events_workload_id", "events", ["workload_id"])


def _create_users() -> None:
    op.create_table(
        "users",
        sa.Column("name", sa.String(63), nullable=False),
        sa.Column("admin", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )


def _create_memberships() -> None:
    op.create_table(
        "memberships",
        sa.Column("user", sa.String(63), nullable=False),
        sa.Column("project", sa.String(63), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.PrimaryKeyConstraint("user", "project"),
        sa.ForeignKeyConstraint(["user"], ["users.name"]),
        sa.ForeignKeyConstraint(["project"], ["queues.name"]),
    )


def _create_tokens() -> None:
    op.create_table(
        "tokens",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("user", sa.String(63), nullable=False),
        sa.Column("prefix", sa.String(16), nullable=False),
        sa.Column("secret_hash", sa.String(64), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("revoked", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("secret_hash"),
        sa.ForeignKeyConstraint(["user"], ["users.name"]),
    )
    op.create_index("ix_tokens_user", "tokens", ["user"])


def _create_audit() -> None:
    op.create_table(
        "audit",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("time", sa.Float(), nullable=False),
        sa.Column("actor", sa.String(63), nullable=False),
        sa.Column("action", sa.String(63), nullable=False),
        sa.Column("target", sa.String(253), nullable=False),
        sa.Column("source", sa.String(253), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_audit_time", "audit", ["time"])


def _create_server_state() -> None:
    op.create_table(
        "server_state",
        sa.Column("key", sa.String(63), nullable=False),
        sa.Column("value", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("key"),
    )
