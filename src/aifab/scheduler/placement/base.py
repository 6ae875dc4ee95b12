"""Shared machinery of the scoring policies: node selection, tie-breaking, ``choose``.

Each policy only says how to score feasible nodes (:meth:`ScoringPolicy.scores`) and which
devices to use on the chosen node (:meth:`ScoringPolicy.devices`). Selection is the artifact's:
the highest score wins, ties go to the lowest ``view.rank``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from aifab.core.nodes import NodeState
from aifab.core.resources import GPU_MILLI, memory_for_gpu_milli
from aifab.core.workloads import TaskRequest
from aifab.scheduler.placement.api import PlacementChoice, PlacementContext, task_shape
from aifab.scheduler.placement.view import (
    BoolArray,
    ClusterView,
    FloatArray,
    IntArray,
    PodShape,
    first_free_devices,
)

_MASK64 = (1 << 64) - 1


def mix64(*values: int) -> int:
    """Deterministic 64-bit hash of integers (splitmix64 finaliser chained over the inputs).

    The scheduler package may not use ``random``; this gives reproducible pseudo-random draws
    from (seed, decision number, salt) instead.
    """
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & _MASK64)) & _MASK64
        h = (h + 0x9E3779B97F4A7C15) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h


class ScoringPolicy:
    """Base of every placement policy; subclasses override :meth:`scores` and :meth:`devices`."""

    name = "base"

    def scores(self, view: ClusterView, pod: PodShape, idx: IntArray, ctx: PlacementContext) -> FloatArray:
        """Scores of the feasible nodes ``idx`` (higher is better)."""
        raise NotImplementedError

    def devices(
        self, view: ClusterView, pod: PodShape, n: int, ctx: PlacementContext, tick: int
    ) -> tuple[int, ...]:
        """Devices on node n: whole GPUs = lowest-index free ones; shared = tightest fit."""
        row = view.gpu_left[n]
        if pod.num_gpu == 0:
            return ()
        if not pod.shared:
            return first_free_devices(row, pod.num_gpu)
        fits = row >= pod.milli
        return (int(np.argmin(np.where(fits, row, GPU_MILLI + 1))),)

    def select(self, view: ClusterView, idx: IntArray, scores: FloatArray) -> int:
        """Highest score; among equals the lowest rank."""
        return int(idx[self._select_position(view, idx, scores)])

    @staticmethod
    def _select_position(view: ClusterView, idx: IntArray, scores: FloatArray) -> int:
        """Position in idx of :meth:`select`'s node."""
        if view.rank_is_row:  # idx ascends, so the first best is the lowest rank
            return int(np.argmax(scores))
        best = scores.max()
        tied = np.flatnonzero(scores == best)
        if len(tied) == 1:
            return int(tied[0])
        return int(tied[np.argmin(view.rank[idx[tied]])])

    def place(
        self, view: ClusterView, pod: PodShape, ctx: PlacementContext, tick: int
    ) -> tuple[int, tuple[int, ...]] | None:
        idx = np.flatnonzero(view.feasible(pod))
        if len(idx) == 0:
            return None
        n = self.select(view, idx, self.scores(view, pod, idx, ctx))
        return n, self.devices(view, pod, n, ctx, tick)

    def choose(
        self, task: TaskRequest, candidates: Sequence[NodeState], ctx: PlacementContext
    ) -> PlacementChoice | None:
        """Scheduler entry point over an explicit candidate list (a view is built for it)."""
        if not candidates:
            return None
        view = ClusterView.from_states(candidates)
        allowed = np.ones(view.size, dtype=np.bool_)
        got = self.choose_in_view(task, view, allowed, device_memory_groups(candidates), ctx)
        if got is None:
            return None
        n, devs, milli, mem = got
        state = candidates[n]
        if any(state.gpu_free_memory[d] < mem for d in devs):
            return None  # device memory already taken by other tenants: do not oversubscribe
        return PlacementChoice(state.node.name, n, devs, milli, mem)

    def best_in_mask(
        self, view: ClusterView, pod: PodShape, feasible: BoolArray, allowed: BoolArray, ctx: PlacementContext
    ) -> tuple[int, float] | None:
        """(row, score) of the node :meth:`select` picks among the rows both ``feasible`` (the
        view's mask for ``pod``) and ``allowed``, or None."""
        idx = np.flatnonzero(feasible & allowed)
        if len(idx) == 0:
            return None
        scores = self.scores(view, pod, idx, ctx)
        if type(self).select is ScoringPolicy.select:
            at = self._select_position(view, idx, scores)
            return int(idx[at]), float(scores[at])
        n = self.select(view, idx, scores)  # a policy with its own selection rule
        return n, float(scores[int(np.searchsorted(idx, n))])

    def choose_in_view(
        self,
        task: TaskRequest,
        view: ClusterView,
        allowed: BoolArray,
        groups: Sequence[tuple[int, BoolArray]],
        ctx: PlacementContext,
    ) -> tuple[int, tuple[int, ...], int, int] | None:
        """(row, devices, milli per device, GPU memory per device) for ``task`` among the
        ``allowed`` rows of a view the caller keeps up to date, or None if it fits none.

        ``groups`` splits the rows by device memory so that a request for GPU memory turns into
        the right milli-GPU share on each node. Per-node scores are memoised in ``view.cache``
        and recomputed only for rows whose ``view.version`` changed, so a scheduler that keeps
        one view per cycle pays for the nodes its previous decisions touched, not for all.
        """
        best: tuple[float, int, int, tuple[int, ...], int] | None = None
        for device_mem, members in groups:
            pod = task_shape(task, device_mem, ctx.gpu_models)
            here = allowed & members if len(groups) > 1 else allowed
            got = self.best_in_mask(view, pod, view.feasible(pod), here, ctx)
            if got is None:
                continue
            n, score = got
            if best is None or score > best[0] or (score == best[0] and n < best[1]):
                devs = self.devices(view, pod, n, ctx, ctx.sequence)
                best = (score, n, pod.milli, devs, device_mem)
        if best is None:
            return None
        _, n, milli, devs, device_mem = best
        mem = memory_for_gpu_milli(milli, device_mem) if devs else 0
        if devs and milli < GPU_MILLI and task.gpu.memory_mib:
            mem = task.gpu.memory_mib
        return n, devs, milli, mem


def device_memory_groups(states: Sequence[NodeState]) -> list[tuple[int, BoolArray]]:
    """Rows grouped by their devices' memory (0 for nodes without GPUs), as boolean masks."""
    mems = np.asarray([s.node.gpus[0].memory_mib if s.node.gpus else 0 for s in states], dtype=np.int64)
    return [(int(m), mems == m) for m in np.unique(mems)]
