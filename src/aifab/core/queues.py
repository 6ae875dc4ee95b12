"""The queue tree: departments contain projects; only leaf queues hold workloads.

Each queue has, per resource, a ``deserved`` quota (guaranteed), an ``over_quota_weight`` (its
share of idle capacity beyond deserved) and a ``limit`` (never exceeded), plus a ``priority``
that orders queues when idle capacity is split.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from aifab.core.errors import QuotaConfigError, ValidationError
from aifab.core.resources import RESOURCE_KINDS, ResourceKind, Resources, format_gpus

UNLIMITED: int | None = None


@dataclass(frozen=True, slots=True)
class ResourceQuota:
    """Quota of one resource in its base unit (milli-GPU, millicores, MiB)."""

    deserved: int = 0
    over_quota_weight: float = 1.0
    limit: int | None = None

    def validate(self, where: str) -> None:
        if self.deserved < 0:
            raise ValidationError(f"must be >= 0, got {self.deserved}", field=f"{where}.deserved")
        if self.over_quota_weight < 0:
            raise ValidationError(
                f"must be >= 0, got {self.over_quota_weight}", field=f"{where}.over_quota_weight"
            )
        if self.limit is not None and self.limit < self.deserved:
            raise ValidationError(
                f"limit {self.limit} is below deserved {self.deserved}", field=f"{where}.limit"
            )


def _default_quotas() -> dict[ResourceKind, ResourceQuota]:
    return {kind: ResourceQuota() for kind in RESOURCE_KINDS}


@dataclass(frozen=True, slots=True)
class Queue:
    """A department (inner node) or a project (leaf) in the queue tree."""

    name: str
    parent: str | None = None
    quotas: Mapping[ResourceKind, ResourceQuota] = field(default_factory=_default_quotas)
    priority: int = 0

    def quota(self, kind: ResourceKind) -> ResourceQuota:
        return self.quotas.get(kind, ResourceQuota())

    @property
    def deserved(self) -> Resources:
        return Resources(
            gpu=self.quota(ResourceKind.GPU).deserved,
            cpu=self.quota(ResourceKind.CPU).deserved,
            memory=self.quota(ResourceKind.MEMORY).deserved,
        )

    def limit(self, kind: ResourceKind) -> int | None:
        return self.quota(kind).limit


def gpu_queue(
    name: str,
    deserved_gpus: float = 0.0,
    *,
    parent: str | None = None,
    weight: float = 1.0,
    limit_gpus: float | None = None,
    priority: int = 0,
) -> Queue:
    """A queue with a GPU quota only (CPU and memory unconstrained): the common case."""
    quotas = _default_quotas()
    quotas[ResourceKind.GPU] = ResourceQuota(
        deserved=round(deserved_gpus * 1000),
        over_quota_weight=weight,
        limit=None if limit_gpus is None else round(limit_gpus * 1000),
    )
    return Queue(name=name, parent=parent, quotas=quotas, priority=priority)


class QueueTree:
    """Validated, immutable tree of queues with fast parent/children lookups."""

    def __init__(self, queues: Iterable[Queue]) -> None:
        self._queues: dict[str, Queue] = {}
        for q in queues:
            if not q.name:
                raise ValidationError("must not be empty", field="queue.name")
            if q.name in self._queues:
                raise ValidationError(f"duplicate queue {q.name!r}", field="queue.name")
            self._queues[q.name] = q
        self._children: dict[str | None, list[str]] = {}
        for q in self._queues.values():
            if q.parent is not None and q.parent not in self._queues:
                raise ValidationError(
                    f"queue {q.name!r} names unknown parent {q.parent!r}", field=f"queue {q.name}: parent"
                )
            self._children.setdefault(q.parent, []).append(q.name)
        for names in self._children.values():
            names.sort()
        self._check_acyclic()
        self._validate_quotas()

    def _check_acyclic(self) -> None:
        for name in self._queues:
            seen: set[str] = set()
            cur: str | None = name
            while cur is not None:
                if cur in seen:
                    raise ValidationError(f"queue {name!r} is part of a cycle", field=f"queue {name}: parent")
                seen.add(cur)
                cur = self._queues[cur].parent

    def _validate_quotas(self) -> None:
        for q in self._queues.values():
            for kind in RESOURCE_KINDS:
                q.quota(kind).validate(f"queue {q.name}: {kind.value}")
        for parent, kids in self._children.items():
            if parent is None:
                continue
            pq = self._queues[parent]
            for kind in RESOURCE_KINDS:
                total = sum(self._queues[k].quota(kind).deserved for k in kids)
                own = pq.quota(kind).deserved
                if total > own:
                    shown = format_gpus(total) if kind is ResourceKind.GPU else str(total)
                    raise QuotaConfigError(
                        f"children of {parent!r} deserve {shown} {kind.value} in total, "
                        f"more than the parent's {format_gpus(own) if kind is ResourceKind.GPU else own}",
                        field=f"queue {parent}: {kind.value}.deserved",
                    )

    def __contains__(self, name: object) -> bool:
        return name in self._queues

    def __iter__(self) -> Iterator[Queue]:
        return iter(self._queues.values())

    def __len__(self) -> int:
        return len(self._queues)

    def get(self, name: str) -> Queue:
        return self._queues[name]

    def children(self, name: str | None) -> list[str]:
        """Children of ``name``; ``None`` gives the roots."""
        return self._children.get(name, [])

    def roots(self) -> list[str]:
        return self.children(None)

    def is_leaf(self, name: str) -> bool:
        return not self._children.get(name)

    def leaves(self) -> list[str]:
        return sorted(n for n in self._queues if self.is_leaf(n))

    def ancestors(self, name: str) -> list[str]:
        """From the queue's parent up to its root."""
        out: list[str] = []
        cur = self._queues[name].parent
        while cur is not None:
            out.append(cur)
            cur = self._queues[cur].parent
        return out
