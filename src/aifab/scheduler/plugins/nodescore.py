"""Node-score plugins: which node a task goes to among those it fits on.

Ours work on the session's node index (nodes bucketed by free whole GPUs, nodes with a partly
used device) so a choice is O(1) in the usual case instead of a scan of every node:

- ``binpack``: the node with the fewest free whole GPUs that still fit (fractions first onto
  partly used devices) — keeps big blocks free for big gangs.
- ``spread``: the node with the most free GPUs.
- ``topology``: bin-packing that keeps a multi-task gang together: first the nodes the gang
  already uses, then nodes in the same innermost topology domain (e.g. rack), then anywhere.

The placement policies of ``aifab.scheduler.placement`` (fgd, bestfit, ...) plug in through
:func:`resolve_scorer`, the single integration seam.
"""

from __future__ import annotations

import importlib
import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol

import numpy as np

from aifab.core.nodes import NodeState
from aifab.scheduler.fit import FRACTION, MEMORY, WHOLE, choose_place, fits
from aifab.scheduler.session import Place, Session, TaskSpec


class NodeScorer(Protocol):
    name: str
    pack: bool  # device choice on a node: best fit (True) or most free (False)

    def pick(self, sess: Session, s: TaskSpec, allowed: bytearray, gang: list[int]) -> int | None:
        """The node for task ``s`` among ``allowed`` ones, given the nodes the gang already uses."""
        ...

    def choose_place(self, ns: NodeState, s: TaskSpec) -> Place | None:
        """Devices on the picked node."""
        ...


class _OwnDevices:
    """Our scorers choose devices with the shared best-fit / most-free rule."""

    pack = True

    def choose_place(self, ns: NodeState, s: TaskSpec) -> Place | None:
        return choose_place(ns, s, self.pack)


def _fits_at(sess: Session, ni: int, s: TaskSpec) -> bool:
    return fits(sess.nodes[ni], sess.free_whole[ni], s)


def tightest_first(sess: Session, s: TaskSpec, allowed: bytearray) -> Iterator[int]:
    """Allowed nodes the task fits on, tightest fit first (partly used devices first for shared
    tasks, then nodes with the fewest free whole GPUs that suffice)."""
    if s.kind is FRACTION or s.kind is MEMORY:
        need = s.milli if s.kind is FRACTION else 1
        for level in sorted(k for k in sess.pbuckets if k >= need):
            for ni in sess.pbuckets[level]:
                if allowed[ni] and _fits_at(sess, ni, s):
                    yield ni
        first = 1
    else:
        first = s.count if s.kind is WHOLE else 0
    for k in range(first, sess.max_gpus + 1):
        for ni in sess.buckets[k]:
            if allowed[ni] and _fits_at(sess, ni, s):
                yield ni


class Binpack(_OwnDevices):
    name = "binpack"
    pack = True

    def pick(self, sess: Session, s: TaskSpec, allowed: bytearray, gang: list[int]) -> int | None:
        return next(tightest_first(sess, s, allowed), None)


class Spread(_OwnDevices):
    name = "spread"
    pack = False

    def pick(self, sess: Session, s: TaskSpec, allowed: bytearray, gang: list[int]) -> int | None:
        last = s.count if s.kind is WHOLE else 0
        for k in range(sess.max_gpus, last - 1, -1):
            for ni in sess.buckets[k]:
                if allowed[ni] and _fits_at(sess, ni, s):
                    return ni
        return None


class Topology(Binpack):
    name = "topology"
    pack = True

    def __init__(self, level: str) -> None:
        self.level = level

    def pick(self, sess: Session, s: TaskSpec, allowed: bytearray, gang: list[int]) -> int | None:
        if gang:
            for ni in reversed(gang):  # fill the node the gang is on first
                if allowed[ni] and _fits_at(sess, ni, s):
                    return ni
            domain = sess.nodes[gang[0]].node.domain(self.level)
            if domain:
                best = -1
                for ni in sess.domain_nodes(self.level).get(domain, ()):
                    if (
                        allowed[ni]
                        and _fits_at(sess, ni, s)
                        and (best < 0 or sess.free_whole[ni] < sess.free_whole[best])
                    ):
                        best = ni
                if best >= 0:
                    return best
        return super().pick(sess, s, allowed, gang)


class External:
    """Adapter for a policy of ``aifab.scheduler.placement``.

    The policy scores an array view of every node, which this adapter builds once per session
    and keeps in sync with the nodes the session's take/give touched, so the policy's per-node
    caches survive from one decision to the next. Only nodes our filters allow are scored; the
    policy picks node and devices, and we re-check its devices against the node state. A
    policy without a view entry point gets a candidate list (at most ``max_candidates`` of the
    tightest-fitting nodes when that is positive, like kube-scheduler's percentageOfNodesToScore).
    """

    pack = True

    def __init__(
        self, name: str, policy: Any, make_ctx: Callable[[int, frozenset[str]], Any], max_candidates: int = 0
    ) -> None:
        self.name = name
        self.max_candidates = max_candidates
        self.policy = policy
        self.make_ctx = make_ctx
        self.sequence = 0
        self.last: tuple[int, Place] | None = None
        self._sess: Session | None = None
        self._view: Any = None
        self._groups: Any = None
        self._rows: list[tuple[int, int, list[int]]] | None = None  # what a kept view holds
        self._masks: dict[int, tuple[bytearray, Any]] = {}

    def pick(self, sess: Session, s: TaskSpec, allowed: bytearray, gang: list[int]) -> int | None:
        self.last = None
        self.sequence += 1
        ctx = self.make_ctx(self.sequence, sess.gpu_models_hint)
        if hasattr(self.policy, "choose_in_view"):
            got = self._pick_in_view(sess, s, allowed, ctx)
            if got is not None:
                return got
            # None: fits no node, or its choice failed our re-check (per-device GPU memory,
            # which the view does not track): the candidate path below decides.
        if self.max_candidates > 0:
            picked = itertools.islice(tightest_first(sess, s, allowed), self.max_candidates)
            candidates: Sequence[NodeState] = [sess.nodes[ni] for ni in sorted(picked)]
        else:
            candidates = [ns for ns in sess.nodes if allowed[ns.index] and _fits_at(sess, ns.index, s)]
        if not candidates:
            return None
        choice = self.policy.choose(s.task, candidates, ctx)
        if choice is None:
            return None
        ni = sess.node_index.get(choice.node)
        if ni is None or not allowed[ni]:
            return None
        return self._accept(sess, s, ni, tuple(choice.devices), choice.gpu_milli, choice.gpu_memory_mib)

    def _pick_in_view(self, sess: Session, s: TaskSpec, allowed: bytearray, ctx: Any) -> int | None:
        view = self._synced_view(sess)
        got_mask = self._masks.get(id(allowed))
        if got_mask is None or got_mask[0] is not allowed:
            # Filters are built once per cycle and never changed: convert each one once.
            got_mask = self._masks[id(allowed)] = (allowed, np.frombuffer(allowed, np.uint8).astype(np.bool_))
        mask = got_mask[1]
        got = self.policy.choose_in_view(s.task, view, mask, self._groups, ctx)
        if got is None:
            return None
        ni, devices, milli, gmem = got
        if not allowed[ni]:
            return None
        return self._accept(sess, s, ni, tuple(devices), milli, gmem)

    def _synced_view(self, sess: Session) -> Any:
        if self._sess is not sess:
            placement = importlib.import_module("aifab.scheduler.placement")
            self._sess = sess
            slot = sess.view_slot
            nodes = sess.snapshot.nodes
            self._rows = None
            held = slot.rows if slot is not None and slot.nodes is nodes and slot.owner == self.name else None
            if slot is not None and held is not None:
                # The last cycle's view: re-copy the rows whose node differs now.
                self._view, self._groups, self._rows = slot.view, slot.groups, held
                stale = [
                    i
                    for i, ns in enumerate(sess.nodes)
                    if held[i][2] != ns.gpu_free_milli
                    or held[i][0] != ns.free_cpu
                    or held[i][1] != ns.free_memory
                ]
                if stale:
                    self._sync(sess, stale)
            else:
                self._view = placement.ClusterView.from_states(sess.nodes)
                self._groups = placement.device_memory_groups(sess.nodes)
                if slot is not None and isinstance(nodes, tuple):
                    self._rows = [(ns.free_cpu, ns.free_memory, list(ns.gpu_free_milli)) for ns in sess.nodes]
                    slot.view, slot.groups, slot.nodes, slot.owner, slot.rows = (
                        self._view,
                        self._groups,
                        nodes,
                        self.name,
                        self._rows,
                    )
            self._masks.clear()
            sess.touched.clear()
        elif sess.touched:
            self._sync(sess, sess.touched)
            sess.touched.clear()
        return self._view

    def _sync(self, sess: Session, rows: Iterable[int]) -> None:
        """Copy these nodes into the view (and note what it holds, when it is kept)."""
        rows = list(rows)
        self._view.sync(sess.nodes, rows)
        held = self._rows
        if held is not None:
            for i in rows:
                ns = sess.nodes[i]
                held[i] = (ns.free_cpu, ns.free_memory, list(ns.gpu_free_milli))

    def _accept(
        self, sess: Session, s: TaskSpec, ni: int, devices: tuple[int, ...], milli: int, gmem: int
    ) -> int | None:
        place: Place = (ni, devices, milli, gmem, s.cpu, s.memory)
        if _valid(sess.nodes[ni], s, place):
            self.last = (ni, place)
            return ni
        # Their devices do not hold (e.g. per-device GPU memory): keep the node if the task
        # fits it at all, and let choose_place pick the devices.
        return ni if _fits_at(sess, ni, s) else None

    def choose_place(self, ns: NodeState, s: TaskSpec) -> Place | None:
        if self.last is not None and self.last[0] == ns.index and _valid(ns, s, self.last[1]):
            return self.last[1]
        return choose_place(ns, s, True)


def _valid(ns: NodeState, s: TaskSpec, p: Place) -> bool:
    """Their choice must take what the task asks, on devices that have it free."""
    _, devices, milli, gmem, _, _ = p
    if ns.free_cpu < s.cpu or ns.free_memory < s.memory:
        return False
    if s.kind is WHOLE and (len(devices) != s.count or milli != 1000):
        return False
    if (s.kind is FRACTION and (len(devices) != 1 or milli < s.milli)) or (
        s.kind is MEMORY and (len(devices) != 1 or gmem < s.gmem)
    ):
        return False
    if s.kind is not WHOLE and s.kind is not FRACTION and s.kind is not MEMORY and devices:
        return False
    if len(set(devices)) != len(devices):
        return False
    return all(
        0 <= d < len(ns.gpu_free_milli) and ns.gpu_free_milli[d] >= milli and ns.gpu_free_memory[d] >= gmem
        for d in devices
    )


OURS: dict[str, Callable[[str], NodeScorer]] = {
    "binpack": lambda level: Binpack(),
    "spread": lambda level: Spread(),
    "topology": lambda level: Topology(level),
}


def resolve_scorer(name: str, innermost_level: str, seed: int = 0, max_candidates: int = 0) -> NodeScorer:
    """THE integration seam: our scorers by name, else the placement package's, else binpack."""
    if name in OURS:
        return OURS[name](innermost_level)
    try:
        placement = importlib.import_module("aifab.scheduler.placement")
        policy = placement.get_policy(name)
        context_type = placement.PlacementContext
    except (ImportError, AttributeError, KeyError, ValueError, LookupError):
        return Binpack()  # their package is missing or lacks the name

    def make_ctx(sequence: int, models: frozenset[str]) -> Any:
        # No target workload: FGD-style policies then measure fragmentation against the task's
        # own shape. Passing this cycle's running + pending shapes as the target was tried and
        # measured worse on the Philly replay (first 10,000 jobs: 34.74 h average JCT and a
        # 91.6 % quota promise, against 31.05 h and 94.4 %), so it is not done yet.
        return context_type(seed=seed, sequence=sequence, gpu_models=models)

    return External(name, policy, make_ctx, max_candidates)
