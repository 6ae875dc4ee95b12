"""Facts about the queue tree and the node set that do not change between cycles.

A simulator or control plane passes the same (immutable) ``QueueTree`` and, between node
changes, the same tuple of nodes to every cycle. Reading quotas through ``Queue.quota`` builds
objects on every call and cost more than the fair-share arithmetic itself, so the flattened
facts are computed once per tree / node tuple and kept for the next cycle: one entry each,
keyed by identity (both are immutable), so the result never depends on the cache.
"""

from __future__ import annotations

from aifab.core.nodes import Node
from aifab.core.queues import QueueTree
from aifab.core.resources import RESOURCE_KINDS

Vec = tuple[int, int, int]


class QueueInfo:
    """One queue's quotas flattened to tuples indexed like ``RESOURCE_KINDS``."""

    __slots__ = ("ancestors", "children", "deserved", "is_leaf", "limit", "name", "priority", "weight")

    def __init__(self, tree: QueueTree, name: str) -> None:
        q = tree.get(name)
        quotas = [q.quota(kind) for kind in RESOURCE_KINDS]
        self.name = name
        self.priority = q.priority
        self.is_leaf = tree.is_leaf(name)
        self.children: list[str] = list(tree.children(name))
        self.ancestors: list[str] = tree.ancestors(name)
        self.deserved: Vec = (quotas[0].deserved, quotas[1].deserved, quotas[2].deserved)
        self.limit: tuple[int | None, int | None, int | None] = (
            quotas[0].limit,
            quotas[1].limit,
            quotas[2].limit,
        )
        self.weight: tuple[float, float, float] = (
            quotas[0].over_quota_weight,
            quotas[1].over_quota_weight,
            quotas[2].over_quota_weight,
        )


class TreeInfo:
    __slots__ = ("by_name", "roots", "tree")

    def __init__(self, tree: QueueTree) -> None:
        self.tree = tree
        self.by_name: dict[str, QueueInfo] = {q.name: QueueInfo(tree, q.name) for q in tree}
        self.roots: list[str] = list(tree.roots())


class NodeFacts:
    __slots__ = ("capacity", "filters", "index", "max_device_memory", "max_gpus", "nodes")

    def __init__(self, nodes: tuple[Node, ...]) -> None:
        self.nodes = nodes
        # Per node filter (pool, labels, GPU models): the nodes it lets in, as a mask and a
        # list (see placer.eligible). Nodes are immutable, so one answer serves every cycle
        # with this node tuple; readers never change it.
        self.filters: dict[object, tuple[bytearray, list[int]]] = {}
        self.index = {n.name: i for i, n in enumerate(nodes)}
        self.max_gpus = max((len(n.gpus) for n in nodes), default=0)
        self.max_device_memory = max((g.memory_mib for n in nodes for g in n.gpus[:1]), default=0)
        g = c = m = 0
        for n in nodes:
            if n.schedulable:
                cap = n.capacity
                g, c, m = g + cap.gpu, c + cap.cpu, m + cap.memory
        self.capacity: Vec = (g, c, m)


_TREES: list[TreeInfo] = []
_NODES: list[NodeFacts] = []


def tree_info(tree: QueueTree) -> TreeInfo:
    """Flattened facts of ``tree`` (the last tree's are kept for the next cycle)."""
    if _TREES and _TREES[0].tree is tree:
        return _TREES[0]
    info = TreeInfo(tree)
    _TREES[:] = [info]
    return info


def node_facts(nodes: tuple[Node, ...]) -> NodeFacts:
    """Capacity, name index and sizes of a node tuple (the last tuple's are kept)."""
    if _NODES and _NODES[0].nodes is nodes:
        return _NODES[0]
    facts = NodeFacts(nodes)
    if isinstance(nodes, tuple):  # only an immutable sequence may be remembered
        _NODES[:] = [facts]
    return facts
