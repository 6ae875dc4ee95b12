"""Per-project run policies: a cap on runtime, a guaranteed runtime before preemption, and the
retries a failed workload gets (each applies on top of what a workload's own spec says).

Revision ID: 0002_project_policies
Revises: 0001_initial
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_project_policies"
down_revision: str | Sequence[str] | None = "0001_initial"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("queues") as batch:
        batch.add_column(sa.Column("max_runtime", sa.Float(), nullable=True))
        batch.add_column(sa.Column("min_runtime", sa.Float(), nullable=True))
        batch.add_column(sa.Column("retries", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("queues") as batch:
        batch.drop_column("retries")
        batch.drop_column("min_runtime")
        batch.drop_column("max_runtime")
