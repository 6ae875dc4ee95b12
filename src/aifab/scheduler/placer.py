"""Placing a whole gang: node filters, topology domains, all-or-nothing, and why it failed."""

from __future__ import annotations

from collections.abc import Callable

from aifab.core.decisions import ReasonCode
from aifab.core.workloads import TopologyMode, Workload
from aifab.scheduler.checks import gpus
from aifab.scheduler.fit import FRACTION, MEMORY, WHOLE, capacity_in_tasks, fits
from aifab.scheduler.plugins.nodescore import NodeScorer
from aifab.scheduler.session import QueueState, Session, Statement, TaskSpec

MAX_DOMAINS = 16  # topology domains tried per gang: bounds the work for a gang that cannot fit


_NO_FILTER: tuple[object, ...] = (None, (), ())


def filter_key(w: Workload) -> tuple[object, ...]:
    if w.node_pool is None and not w.node_selector and not w.gpu_models:
        return _NO_FILTER  # most workloads: without sorting anything
    return (w.node_pool, tuple(sorted(w.node_selector.items())), tuple(sorted(w.gpu_models)))


def eligible(sess: Session, w: Workload) -> tuple[bytearray, list[int]]:
    """Nodes the workload may use at all (pool, labels, GPU model, schedulable); cached for as
    long as the node tuple lasts (see NodeFacts.filters). Read only."""
    key = filter_key(w)
    got = sess.filters.get(key)
    if got is not None:
        return got
    if len(sess.filters) >= 4096:  # filters are few; bound it anyway
        sess.filters.clear()
    allowed = bytearray(len(sess.nodes))
    lst: list[int] = []
    selector = sorted(w.node_selector.items())
    for ns in sess.nodes:
        n = ns.node
        if not n.schedulable or (w.node_pool is not None and n.pool != w.node_pool):
            continue
        if any(n.labels.get(k) != v for k, v in selector):
            continue
        if w.gpu_models and n.gpu_model not in w.gpu_models:
            continue
        allowed[ns.index] = 1
        lst.append(ns.index)
    sess.filters[key] = (allowed, lst)
    return allowed, lst


def task_order(specs: list[TaskSpec]) -> list[int]:
    """Biggest tasks first (they are hardest to fit); identical tasks stay adjacent."""
    return sorted(range(len(specs)), key=lambda i: (-specs[i].gpu_need, specs[i].key, i))


def no_extras(_: TaskSpec) -> bool:
    """``extra_ok`` of the actions that evict or move to make room (reclaim, the guarantee,
    preempt, consolidation): they make room for a gang's minimum and check their quotas for it
    alone, so they bind no elastic task beyond it (allocate may, within quotas)."""
    return False


def place_workload(
    sess: Session,
    stmt: Statement,
    w: Workload,
    specs: list[TaskSpec],
    leaf: QueueState | None,
    scorer: NodeScorer,
    extra_ok: Callable[[TaskSpec], bool] | None = None,
) -> bool:
    """Bind at least ``gang_size`` tasks of ``w`` inside ``stmt``, or change nothing."""
    allowed, nodes = eligible(sess, w)
    if not nodes:
        return False
    sess.gpu_models_hint = w.gpu_models
    order = task_order(specs)
    if not room_for_whole_gpus(sess, specs, order[: w.gang_size]):
        return False
    topo = w.topology
    if topo is not None and len(specs) > 1 and topo.level != "":
        for dom_nodes in _domains_best_first(sess, topo.level, nodes, specs[order[0]], w.gang_size):
            mask = bytearray(len(sess.nodes))
            for ni in dom_nodes:
                mask[ni] = 1
            cp = stmt.checkpoint()
            if _place_tasks(sess, stmt, w, specs, order, leaf, scorer, mask, extra_ok):
                return True
            stmt.rollback(cp)
        if topo.mode is TopologyMode.REQUIRED:
            return False
    return _place_tasks(sess, stmt, w, specs, order, leaf, scorer, allowed, extra_ok)


def room_for_whole_gpus(sess: Session, specs: list[TaskSpec], required: list[int]) -> bool:
    """Whether the schedulable nodes' fully free GPUs could hold the ``required`` tasks'
    whole-GPU requests: necessary for the gang to fit, so a failing check spares a placement
    attempt bound to fail. Counts come from the session's histogram of free whole GPUs per node,
    so this costs O(GPUs per node) whatever the cluster size; other kinds of tasks pass."""
    need: dict[int, int] = {}
    for ti in required:
        s = specs[ti]
        if s.kind is WHOLE and s.count > 0:
            need[s.count] = need.get(s.count, 0) + 1
    if not need:
        return True
    hist = sess.whole_hist
    if sum(c * k for c, k in need.items()) > sum(f * hist[f] for f in range(1, len(hist))):
        return False
    # Per task size: the nodes could hold at most sum(free // size) such tasks.
    return all(sum((f // c) * hist[f] for f in range(c, len(hist))) >= k for c, k in need.items())


def _domains_best_first(
    sess: Session, level: str, nodes: list[int], s: TaskSpec, gang: int
) -> list[list[int]]:
    """Domains that could hold the gang, tightest fit first (keeps big domains free)."""
    by_domain: dict[str, list[int]] = {}
    for ni in nodes:
        d = sess.nodes[ni].node.domain(level)
        if d:
            by_domain.setdefault(d, []).append(ni)
    ranked = []
    for d, members in by_domain.items():
        cap = sum(capacity_in_tasks(sess.nodes[ni], sess.free_whole[ni], s) for ni in members)
        if cap >= gang:
            ranked.append((cap, d, members))
    ranked.sort(key=lambda t: (t[0], t[1]))
    return [m for _, _, m in ranked[:MAX_DOMAINS]]


def _place_tasks(
    sess: Session,
    stmt: Statement,
    w: Workload,
    specs: list[TaskSpec],
    order: list[int],
    leaf: QueueState | None,
    scorer: NodeScorer,
    allowed: bytearray,
    extra_ok: Callable[[TaskSpec], bool] | None,
) -> bool:
    cp = stmt.checkpoint()
    gang_nodes: list[int] = []
    gang_size = w.gang_size
    for placed, ti in enumerate(order):
        s = specs[ti]
        extra = placed >= gang_size
        if extra and extra_ok is not None and not extra_ok(s):
            return True
        ni = scorer.pick(sess, s, allowed, gang_nodes)
        p = None if ni is None else scorer.choose_place(sess.nodes[ni], s)
        if p is None:
            if extra:
                return True  # the gang is complete; elastic extras are best effort
            stmt.rollback(cp)
            return False
        stmt.bind(w, ti, p, leaf)
        gang_nodes.append(p[0])
    return True


def diagnose(sess: Session, w: Workload, specs: list[TaskSpec], gang_gpu: int) -> tuple[ReasonCode, str]:
    """Why the gang did not fit, in words a user can act on."""
    _, nodes = eligible(sess, w)
    if not nodes:
        return ReasonCode.NO_MATCHING_NODE, _no_node_message(w)
    per_node = sess.free_milli()
    free = sum(per_node[ni] for ni in nodes)
    if gang_gpu > free:
        if free <= 0:
            return ReasonCode.INSUFFICIENT_CAPACITY, (
                f"needs {gpus(gang_gpu)}; no GPU is free on the {len(nodes)} nodes it may use"
            )
        return ReasonCode.INSUFFICIENT_CAPACITY, (
            f"needs {gpus(gang_gpu)}; only {gpus(free)} free on the nodes it may use"
        )
    order = task_order(specs)
    s = specs[order[0]]
    if not any(fits(sess.nodes[ni], sess.free_whole[ni], s) for ni in nodes):
        return _single_task_message(sess, nodes, s)
    cap = sum(capacity_in_tasks(sess.nodes[ni], sess.free_whole[ni], s) for ni in nodes)
    topo = w.topology
    if topo is not None and topo.mode is TopologyMode.REQUIRED and len(specs) > 1:
        return ReasonCode.TOPOLOGY, (
            f"needs all {w.gang_size} tasks within one {topo.level}; no {topo.level} has room for them"
        )
    return ReasonCode.GANG, (
        f"the gang needs {w.gang_size} tasks placed together; the free capacity fits only {min(cap, w.gang_size - 1)}"
    )


def _single_task_message(sess: Session, nodes: list[int], s: TaskSpec) -> tuple[ReasonCode, str]:
    if s.kind is WHOLE:
        largest = max(sess.free_whole[ni] for ni in nodes)
        if largest < s.count:
            return ReasonCode.FRAGMENTED, (
                f"needs {gpus(s.count * 1000)} on one node; the largest free block is {largest}"
            )
    elif s.kind is FRACTION or s.kind is MEMORY:
        most = max(max(sess.nodes[ni].gpu_free_milli, default=0) for ni in nodes)
        want = gpus(s.milli) if s.kind is FRACTION else f"{s.gmem} MiB of GPU memory"
        if most < (s.milli if s.kind is FRACTION else 1):
            return ReasonCode.FRAGMENTED, (
                f"needs {want} on one device; the most free on any device is {gpus(max(most, 0))}"
            )
        return ReasonCode.FRAGMENTED, f"needs {want} on one device; no device has that much free"
    return ReasonCode.INSUFFICIENT_CAPACITY, (
        f"needs {s.cpu / 1000:g} CPUs and {s.memory} MiB memory next to its GPUs; no node has that free"
    )


def _no_node_message(w: Workload) -> str:
    """E.g. 'no schedulable node in pool infer has GPU model A100'."""
    subject = "no schedulable node" + (f" in pool {w.node_pool}" if w.node_pool is not None else "")
    needs = []
    if w.gpu_models:
        needs.append(f"GPU model {' or '.join(sorted(w.gpu_models))}")
    if w.node_selector:
        needs.append("labels " + ", ".join(f"{k}={v}" for k, v in sorted(w.node_selector.items())))
    if not needs:
        return subject + (" exists" if w.node_pool is not None else " in the cluster")
    return f"{subject} has {' and '.join(needs)}"
