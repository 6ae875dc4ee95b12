"""One error hierarchy for aifab, each error with a stable machine-readable code.

Layers above (API, CLI) turn these into HTTP responses or messages in one place; the
scheduler itself never raises for a workload that cannot fit (that is data, a
:class:`~aifab.core.decisions.PendingReason`).
"""

from __future__ import annotations


class AifabError(Exception):
    """Base of every error aifab raises on purpose."""

    code: str = "aifab_error"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def __str__(self) -> str:
        if self.field:
            return f"{self.field}: {self.message}"
        return self.message


class ValidationError(AifabError):
    """Input that is well-formed but not acceptable (negative GPUs, unknown queue, ...)."""

    code = "validation_error"


class QuotaConfigError(ValidationError):
    """A queue tree whose quotas contradict each other."""

    code = "quota_config_error"


class TraceError(AifabError):
    """A bad row in a trace file; the message names the file, the line and the column."""

    code = "trace_error"

    def __init__(self, path: str, line: int, column: str | None, message: str) -> None:
        where = f"{path}:{line}"
        if column:
            where += f": column {column}"
        super().__init__(f"{where}: {message}")
        self.path = path
        self.line = line
        self.column = column


class NotFoundError(AifabError):
    code = "not_found"


class ConflictError(AifabError):
    code = "conflict"


class AuthenticationError(AifabError):
    """No token, or a token that is unknown or revoked."""

    code = "unauthenticated"


class PermissionDeniedError(AifabError):
    """A known user asking for something their role does not allow."""

    code = "forbidden"
