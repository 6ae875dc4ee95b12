"""The append-only audit log: who changed what, when, from where (admins read it)."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from aifab.control.db.models import AuditRow
from aifab.control.services.auth import Principal, require_admin


def record(
    s: Session, actor: Principal | str, action: str, target: str = "", source: str = "", **detail: Any
) -> None:
    name = actor if isinstance(actor, str) else actor.name
    s.add(AuditRow(time=time.time(), actor=name, action=action, target=target, source=source, detail=detail))


def read(s: Session, p: Principal, limit: int = 200) -> list[AuditRow]:
    require_admin(p)
    return list(s.scalars(select(AuditRow).order_by(AuditRow.id.desc()).limit(limit)))
