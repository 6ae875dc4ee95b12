"""Users, API tokens and role-based access.

Roles: an *admin* may do everything; per project a user is a *member* (submit and manage the
project's workloads, read the project) or a *viewer* (read only). Someone without a role in a
project sees nothing of it: its workloads answer "not found" rather than "forbidden", so their
existence does not leak. Tokens are random secrets shown once; only their SHA-256 is stored.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass, field
from enum import StrEnum

from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from aifab.control.db.models import MembershipRow, TokenRow, UserRow
from aifab.core.errors import (
    AuthenticationError,
    ConflictError,
    NotFoundError,
    PermissionDeniedError,
    ValidationError,
)

TOKEN_PREFIX = "afb_"


class Role(StrEnum):
    MEMBER = "member"
    VIEWER = "viewer"


class Action(StrEnum):
    READ = "read"
    SUBMIT = "submit"
    MANAGE = "manage"  # cancel / change a project's workloads


ALLOWED: dict[Role, frozenset[Action]] = {
    Role.MEMBER: frozenset({Action.READ, Action.SUBMIT, Action.MANAGE}),
    Role.VIEWER: frozenset({Action.READ}),
}


@dataclass(frozen=True)
class Principal:
    name: str
    admin: bool = False
    roles: dict[str, Role] = field(default_factory=dict)

    def can(self, action: Action, project: str) -> bool:
        if self.admin:
            return True
        role = self.roles.get(project)
        return role is not None and action in ALLOWED[role]

    def visible(self, project: str) -> bool:
        return self.can(Action.READ, project)


SYSTEM = Principal("system", admin=True)


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_user(s: Session, name: str, admin: bool = False) -> UserRow:
    if not name or len(name) > 63:
        raise ValidationError("a user name needs 1 to 63 characters", field="name")
    if s.get(UserRow, name) is not None:
        raise ConflictError(f"user {name} already exists", field="name")
    row = UserRow(name=name, admin=admin, created_at=time.time())
    s.add(row)
    s.flush()
    return row


def issue_token(s: Session, user: str) -> str:
    """A new token for ``user``; the secret is returned once and never stored."""
    if s.get(UserRow, user) is None:
        raise NotFoundError(f"no user {user}", field="user")
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    s.add(TokenRow(user=user, prefix=secret[:12], secret_hash=_hash(secret), created_at=time.time()))
    s.flush()
    return secret


def revoke_tokens(s: Session, user: str) -> int:
    rows = s.scalars(select(TokenRow).where(TokenRow.user == user, TokenRow.revoked.is_(False))).all()
    for r in rows:
        r.revoked = True
    return len(rows)


def set_role(s: Session, user: str, project: str, role: Role | None) -> None:
    if s.get(UserRow, user) is None:
        raise NotFoundError(f"no user {user}", field="user")
    row = s.get(MembershipRow, (user, project))
    if role is None:
        if row is not None:
            s.delete(row)
        return
    if row is None:
        s.add(MembershipRow(user=user, project=project, role=role.value))
    else:
        row.role = role.value


def principal_for(s: Session, user: str) -> Principal:
    row = s.get(UserRow, user)
    if row is None:
        raise AuthenticationError("unknown user")
    roles = {
        m.project: Role(m.role) for m in s.scalars(select(MembershipRow).where(MembershipRow.user == user))
    }
    return Principal(row.name, row.admin, roles)


# Every API request authenticates: one statement (token, its user and the user's roles), built
# once, and plain rows rather than ORM objects.
_BY_TOKEN = (
    select(
        TokenRow.revoked,
        TokenRow.user,
        UserRow.name,
        UserRow.admin,
        MembershipRow.project,
        MembershipRow.role,
    )
    .select_from(TokenRow)
    .outerjoin(UserRow, UserRow.name == TokenRow.user)
    .outerjoin(MembershipRow, MembershipRow.user == TokenRow.user)
    .where(TokenRow.secret_hash == bindparam("secret_hash"))
)


def authenticate(s: Session, token: str | None) -> Principal:
    """The principal a token stands for, read afresh on every call: a revoked token or a changed
    role takes effect on the next request."""
    if not token:
        raise AuthenticationError("no API token: run `aifab login` or pass Authorization: Bearer <token>")
    rows = s.connection().execute(_BY_TOKEN, {"secret_hash": _hash(token)}).all()
    if not rows or rows[0].revoked:
        raise AuthenticationError("the API token is unknown or revoked")
    first = rows[0]
    if first.name is None:
        raise AuthenticationError("unknown user")
    roles = {r.project: Role(r.role) for r in rows if r.project is not None}
    return Principal(first.name, bool(first.admin), roles)


def require(p: Principal, action: Action, project: str) -> None:
    """Raise unless ``p`` may do ``action`` in ``project`` (not found when it cannot even read)."""
    if p.can(action, project):
        return
    if not p.visible(project):
        raise NotFoundError(f"no project {project}", field="project")
    raise PermissionDeniedError(f"{p.name} may not {action.value} in project {project} (role: viewer)")


def require_admin(p: Principal) -> None:
    if not p.admin:
        raise PermissionDeniedError(f"{p.name} is not an admin")


def bootstrap_admin(s: Session) -> str | None:
    """On first start: create user ``admin`` and return its token (None if users exist)."""
    if s.scalars(select(UserRow).limit(1)).first() is not None:
        return None
    create_user(s, "admin", admin=True)
    return issue_token(s, "admin")
