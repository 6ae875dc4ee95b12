"""Actions run in the order ``SchedulerConfig.actions`` names them, looked up here."""

from __future__ import annotations

from collections.abc import Callable

from aifab.core.errors import ValidationError
from aifab.scheduler.actions.allocate import allocate
from aifab.scheduler.actions.consolidate import consolidate
from aifab.scheduler.actions.evict import reclaim
from aifab.scheduler.actions.preempt import preempt
from aifab.scheduler.context import Context

Action = Callable[[Context], None]

ACTIONS: dict[str, Action] = {
    "allocate": allocate,
    "consolidate": consolidate,
    "reclaim": reclaim,
    "preempt": preempt,
}


def get_action(name: str) -> Action:
    try:
        return ACTIONS[name]
    except KeyError:
        raise ValidationError(
            f"unknown action {name!r}; known: {', '.join(sorted(ACTIONS))}", field="actions"
        ) from None


__all__ = ["ACTIONS", "Action", "get_action"]
