"""The append-only audit log: who changed what, when, from where (admins read it)."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import Connection, insert, select
from sqlalchemy.orm import Session

from aifab.control.db.models import AuditRow
from aifab.control.services.auth import Principal, require_admin


def record(
    s: Session, actor: Principal | str, action: str, target: str = "", source: str = "", **detail: Any
) -> None:
    s.add(AuditRow(**entry(actor, action, target, source, **detail)))


_INSERT = insert(AuditRow.__table__)  # type: ignore[arg-type]  # a Table: a Core INSERT, no unit of work


def entry(
    actor: Principal | str, action: str, target: str = "", source: str = "", **detail: Any
) -> dict[str, Any]:
    """The columns of one audit record, stamped now (see :func:`append`)."""
    name = actor if isinstance(actor, str) else actor.name
    return {
        "time": time.time(),
        "actor": name,
        "action": action,
        "target": target,
        "source": source,
        "detail": detail,
    }


def append(conn: Connection, entries: list[dict[str, Any]]) -> None:
    """Write :func:`entry` records with one INSERT on ``conn``, at once (the submission path)."""
    if entries:
        conn.execute(_INSERT, entries)


def read(s: Session, p: Principal, limit: int = 200) -> list[AuditRow]:
    require_admin(p)
    return list(s.scalars(select(AuditRow).order_by(AuditRow.id.desc()).limit(limit)))
