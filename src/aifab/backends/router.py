"""Several node pools, each executed by its own backend, behind the one Backend interface.

The control plane talks to a :class:`PoolRouter` only. The router sends a launch to the backend
of the pool that owns the chosen node, and every later call about that task (status, stop, logs)
to the backend named in the task's handle, so routing survives a control-plane restart: a
handle is stored with the pool it belongs to.

An engine that cannot be reached does not take the others down: its inventory call fails alone
(its nodes stop being schedulable until it answers again) and calls about its tasks raise
:class:`EngineUnavailable`, which the control plane treats as "ask again later".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from aifab.backends.base import (
    Backend,
    BackendError,
    Capabilities,
    EngineUnavailable,
    Handle,
    LaunchRequest,
    NodeInfo,
    TaskStatus,
)

POOL_KEY = "aifab_pool"  # the handle field naming the pool; inner handles never use it


@dataclass(frozen=True, slots=True)
class PoolInventory:
    """One pool's answer to an inventory call: its nodes, or why it could not say."""

    pool: str
    kind: str  # the backend's kind: local, ray, slurm
    capabilities: Capabilities
    nodes: tuple[NodeInfo, ...] = ()
    error: str | None = None  # set when the engine could not be asked


class PoolRouter:
    name = "router"

    def __init__(
        self,
        pools: Mapping[str, Backend],
        kinds: Mapping[str, str] | None = None,
        default_pool: str | None = None,
    ) -> None:
        if not pools:
            raise BackendError("at least one node pool is needed")
        self.pools = dict(pools)
        self.kinds = {p: (kinds or {}).get(p, b.name) for p, b in self.pools.items()}
        # Handles written before pools existed carry no pool: they belong to the first pool.
        self.default_pool = default_pool or next(iter(self.pools))
        self._node_pool: dict[str, str] = {}

    @property
    def capabilities(self) -> Capabilities:
        caps = [b.capabilities for b in self.pools.values()]
        return Capabilities(
            gangs_across_nodes=any(c.gangs_across_nodes for c in caps),
            fractional_gpus=any(c.fractional_gpus for c in caps),
            preemption=all(c.preemption for c in caps),
            log_streaming=all(c.log_streaming for c in caps),
            engine_assigns_devices=any(c.engine_assigns_devices for c in caps),
        )

    def kind(self, pool: str) -> str:
        return self.kinds[pool]

    # ----- inventory -----------------------------------------------------------------------
    def inventories(self) -> list[PoolInventory]:
        """Every pool's nodes, each stamped with its pool; a failing engine fails alone."""
        out = []
        claimed: dict[str, str] = {}
        for pool, backend in self.pools.items():
            try:
                nodes = backend.inventory()
            except BackendError as exc:
                out.append(PoolInventory(pool, self.kind(pool), backend.capabilities, error=str(exc)))
                # Its tasks still run there: keep routing to its nodes while it is away.
                for node, owner in self._node_pool.items():
                    if owner == pool:
                        claimed.setdefault(node, pool)
                continue
            mine, clashes = [], []
            for n in nodes:
                owner = claimed.setdefault(n.name, pool)
                if owner == pool:
                    mine.append(replace(n, pool=pool))
                else:
                    # Node names are aifab's keys: a second pool reporting one is a configuration
                    # error that must not silently merge two machines.
                    clashes.append(f"node {n.name!r} is already reported by pool {owner!r}")
            error = "; ".join(clashes) + "; rename one" if clashes else None
            out.append(PoolInventory(pool, self.kind(pool), backend.capabilities, tuple(mine), error))
        self._node_pool = claimed
        return out

    def inventory(self) -> list[NodeInfo]:
        return [n for inv in self.inventories() for n in inv.nodes]

    def pool_of_node(self, node: str) -> str | None:
        return self._node_pool.get(node)

    def remember_node(self, node: str, pool: str) -> None:
        """What the store says (a restarted control plane knows its nodes before inventory)."""
        if pool in self.pools:
            self._node_pool.setdefault(node, pool)

    # ----- tasks ---------------------------------------------------------------------------
    def launch(self, req: LaunchRequest) -> Handle:
        pool = self._node_pool.get(req.node)
        if pool is None:
            raise EngineUnavailable(f"node {req.node!r} is in no pool that answers right now")
        handle = self.pools[pool].launch(req)
        return {**handle, POOL_KEY: pool}

    def backend_for(self, handle: Handle) -> Backend:
        pool = handle.get(POOL_KEY, self.default_pool)
        backend = self.pools.get(pool)
        if backend is None:
            raise BackendError(f"the task belongs to pool {pool!r}, which is no longer configured")
        return backend

    def status(self, handle: Handle) -> TaskStatus:
        return self.backend_for(handle).status(_inner(handle))

    def stop(self, handle: Handle, grace_seconds: float) -> None:
        self.backend_for(handle).stop(_inner(handle), grace_seconds)

    def kill_overdue(self) -> None:
        for backend in self.pools.values():
            try:
                backend.kill_overdue()
            except BackendError:
                continue  # an unreachable engine is retried on the next pass

    def read_log(self, handle: Handle, offset: int = 0, limit: int = 1 << 20) -> tuple[bytes, int]:
        return self.backend_for(handle).read_log(_inner(handle), offset, limit)

    def exit_marks(self) -> tuple[object, ...]:
        """One mark per pool that keeps an ends journal (see :mod:`aifab.backends.ends`): the
        tuple changes when a task of any pool ends. A pool that cannot say gives None."""
        marks: list[object] = []
        for backend in self.pools.values():
            mark = getattr(backend, "exit_mark", None)
            try:
                marks.append(mark() if mark is not None else None)
            except BackendError:
                marks.append(None)
        return tuple(marks)

    def release(self, handle: Handle) -> None:
        """Let the engine forget a finished task (engines that keep per-task state)."""
        backend = self.backend_for(handle)
        release = getattr(backend, "release", None)
        if release is not None:
            release(_inner(handle))

    def acknowledge_ends(self, handles: list[Handle]) -> None:
        """Tell each engine that keeps a finished task's room until the control plane has
        acted on its end (Slurm's ``end_hold_s``) that it may let go now."""
        by_pool: dict[str, list[Handle]] = {}
        for handle in handles:
            by_pool.setdefault(handle.get(POOL_KEY, self.default_pool), []).append(_inner(handle))
        for pool, inner in by_pool.items():
            acknowledge = getattr(self.pools.get(pool), "acknowledge_ends", None)
            if acknowledge is not None:
                acknowledge(inner)


def _inner(handle: Handle) -> Handle:
    return {k: v for k, v in handle.items() if k != POOL_KEY}
