"""What the backend knows of the cluster, read in bulk and kept for a moment.

The control plane asks ``status`` of every live task several times a second, one task at a
time. Rather than a GCS round trip per call, the first call of a burst reads the ``start`` and
``exit`` records of every task asked about recently in one multi-get; the rest of the burst is
answered from it (``RECORDS_TTL_S``). Alive nodes and each node's agent are looked up at most
once a second; a node missing from the cached list is looked up again before anything is
concluded from its absence.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import ray

from aifab.backends.ray import cluster
from aifab.backends.ray.agent import AGENT_NAMESPACE, agent_name
from aifab.backends.ray.records import Records, task_record

RECORDS_TTL_S = 0.15  # below the control plane's 0.2 s between passes
WATCH_S = 5.0  # a task not asked about for this long leaves the bulk reads
NODES_TTL_S = 1.0
NODES_RETRY_S = 0.2  # the least time between two look-ups for a node missing from the list
AGENTS_TTL_S = 1.0

TaskRecords = tuple[dict[str, Any] | None, dict[str, Any] | None]  # (start, exit)


class ClusterView:
    def __init__(self, records: Records, timeout: float) -> None:
        self._records = records
        self._timeout = timeout
        self._lock = threading.Lock()
        self._asked: dict[str, float] = {}  # task key → when last asked (monotonic)
        self._known: dict[str, TaskRecords] = {}
        self._fetched_at = -1e9
        self._nodes: dict[str, cluster.RayNode] = {}
        self._nodes_at = -1e9
        self._agents: dict[str, tuple[float, str | None]] = {}  # node id → (when, agent actor id)

    # -- task records -------------------------------------------------------------------------

    def task(self, key: str, *, fresh: bool = False) -> TaskRecords:
        """(start, exit) of the task; raises EngineUnavailable when it must ask and cannot."""
        now = time.monotonic()
        with self._lock:
            self._asked[key] = now
            recent = now - self._fetched_at < RECORDS_TTL_S
            if not fresh and recent and key in self._known:
                return self._known[key]
            for k in [k for k, t in self._asked.items() if now - t > WATCH_S]:
                del self._asked[k]
            # An end, once read, stays (until released). A task new to this burst is read
            # alone; otherwise every watched task that has not ended is read again.
            ended = {k: v for k, v in self._known.items() if v[1] is not None and k in self._asked}
            keys = [key] if recent else [k for k in self._asked if k not in ended or (k == key and fresh)]
        known = {**ended, **self._read(keys)} if keys else ended
        with self._lock:
            if recent:
                self._known.update(known)
            else:
                self._known, self._fetched_at = known, now
        return known[key]

    def _read(self, keys: list[str]) -> dict[str, TaskRecords]:
        found = self._records.get_many([task_record(k, kind) for k in keys for kind in ("start", "exit")])
        return {k: (found.get(task_record(k, "start")), found.get(task_record(k, "exit"))) for k in keys}

    def refresh(self) -> None:
        """A task ended: the next ``status`` reads the records again, whatever their age."""
        with self._lock:
            self._fetched_at = -1e9

    def watch(self, key: str) -> None:
        """A task just launched: read with the next burst, not on its own."""
        with self._lock:
            self._asked[key] = time.monotonic()

    def note_end(self, key: str, end: dict[str, Any]) -> None:
        """An end this process just recorded (or read) is known from now on."""
        with self._lock:
            start = self._known.get(key, (None, None))[0]
            self._known[key] = (start, end)

    def forget(self, key: str) -> None:
        with self._lock:
            self._asked.pop(key, None)
            self._known.pop(key, None)

    # -- nodes and agents ---------------------------------------------------------------------

    def nodes(self, *, fresh: bool = False) -> dict[str, cluster.RayNode]:
        """Alive nodes by aifab name (cached for a second unless ``fresh``)."""
        now = time.monotonic()
        with self._lock:
            if not fresh and now - self._nodes_at < NODES_TTL_S:
                return self._nodes
        nodes = cluster.alive_nodes(self._timeout)
        with self._lock:
            self._nodes, self._nodes_at = nodes, now
        return nodes

    def nodes_with(self, names: tuple[str, ...]) -> dict[str, cluster.RayNode]:
        """Alive nodes, looked up again if one of ``names`` is not among them."""
        nodes = self.nodes()
        if any(n not in nodes for n in names):
            nodes = self.nodes(fresh=time.monotonic() - self._nodes_at >= NODES_RETRY_S)
        return nodes

    def node_alive(self, node_id: str) -> bool:
        def alive(nodes: dict[str, cluster.RayNode]) -> bool:
            return any(n.node_id == node_id for n in nodes.values())

        if alive(self.nodes()):
            return True
        return alive(self.nodes(fresh=time.monotonic() - self._nodes_at >= NODES_RETRY_S))

    def agent_id(self, node_id: str) -> str | None:
        """The actor id of the node's agent now; None if it has none. Call after a GCS call
        that has a timeout (``ray.get_actor`` has none)."""
        now = time.monotonic()
        with self._lock:
            cached = self._agents.get(node_id)
            if cached is not None and now - cached[0] < AGENTS_TTL_S:
                return cached[1]
        try:
            agent = ray.get_actor(agent_name(node_id), namespace=AGENT_NAMESPACE)
            found: str | None = agent._actor_id.hex()
        except ValueError:
            found = None
        with self._lock:
            self._agents[node_id] = (now, found)
        return found
