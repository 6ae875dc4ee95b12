"""The control plane's database: tables, engines, sessions and migrations."""

from aifab.control.db.engine import (
    Database,
    current_revision,
    downgrade,
    head_revision,
    make_engine,
    migrate,
    normalise_url,
    session_factory,
    sqlite_url,
)
from aifab.control.db.models import (
    AuditRow,
    Base,
    EventRow,
    MembershipRow,
    NodeRow,
    QueueRow,
    StateRow,
    TaskRunRow,
    TokenRow,
    UserRow,
    WorkloadRow,
)

__all__ = [
    "AuditRow",
    "Base",
    "Database",
    "EventRow",
    "MembershipRow",
    "NodeRow",
    "QueueRow",
    "StateRow",
    "TaskRunRow",
    "TokenRow",
    "UserRow",
    "WorkloadRow",
    "current_revision",
    "downgrade",
    "head_revision",
    "make_engine",
    "migrate",
    "normalise_url",
    "session_factory",
    "sqlite_url",
]
