"""Fragmentation Gradient Descent (``fgd_score.go``) and aifab's default policy built on it.

FGD scores a node by how much placing the task there increases the node's fragmentation
(measured against the target workload, see :mod:`fragmentation`):
``score = int(sigmoid((frag_before - frag_after) / 1000) * 100)``. A shared task is tried on
every device that fits and the best device is kept (first index among equal scores). Whole
GPUs go to the lowest-index free devices.

A node's scores for a task shape depend only on that node's free resources, so they are
memoised per (shape, node) in ``view.cache`` and recomputed only for nodes whose
``view.version`` changed since: in the packing run one placement changes one node, so almost
every lookup hits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from aifab.core.resources import GPU_MILLI
from aifab.scheduler.placement.api import PlacementContext
from aifab.scheduler.placement.base import ScoringPolicy
from aifab.scheduler.placement.fragmentation import TargetWorkload, fragmentation
from aifab.scheduler.placement.view import (
    BoolArray,
    ClusterView,
    FloatArray,
    IntArray,
    PodShape,
    RowState,
    lowest_free,
)

MAX_SCORE = 100


_OWN_TARGETS: dict[PodShape, TargetWorkload] = {}


def own_target(pod: PodShape) -> TargetWorkload:
    """The one-shape target of a task scored without a target workload. One object per shape,
    so that per-target caches (keyed by identity) keep hitting across decisions."""
    got = _OWN_TARGETS.get(pod)
    if got is None:
        if len(_OWN_TARGETS) > 4096:  # shapes are few; bound it anyway
            _OWN_TARGETS.clear()
        got = _OWN_TARGETS[pod] = TargetWorkload.of([(pod, 1.0)])
    return got


def _target(ctx: PlacementContext, pod: PodShape) -> TargetWorkload:
    if ctx.target is not None:
        return ctx.target
    return own_target(pod)


_KNOWN_MAX = 65_536  # row contents remembered per column
_ONE_BY_ONE = 12  # rows evaluated without numpy, where a policy can (numpy's cost per call dominates)


@dataclass
class _Column:
    """Memoised evaluation of one task shape on every node of a view."""

    target: TargetWorkload | None
    full_target: TargetWorkload | None
    stamp: IntArray  # view.version when computed, -1 = never
    delta: FloatArray  # frag_before - frag_after on the best device
    device: IntArray  # best device for a shared task (-1 otherwise)
    extra: FloatArray  # policy-specific secondary key (aifab)
    # (delta, device, extra) by row content: a node back in a state seen before (a placement
    # tried and rolled back, a job ended) gets its values without evaluating it again
    known: dict[RowState, tuple[float, int, float]] = field(default_factory=dict)


class FgdPolicy(ScoringPolicy):
    """FGD exactly as the artifact scores it (integer scores, first best device)."""

    name = "fgd"

    # ----- fragmentation state kept per view ---------------------------------------------
    def _access(self, view: ClusterView, target: TargetWorkload) -> BoolArray:
        """(models x shapes) access matrix, memoised; the entry keeps its target so that a
        recycled ``id`` can never return another target's matrix."""
        key = ("fgd_access", id(target))
        hit: Any = view.cache.get(key)
        if hit is None or hit[0] is not target:
            hit = (target, target.access(view.model_names))
            view.cache[key] = hit
        acc: BoolArray = hit[1]
        return acc

    @staticmethod
    def _ctx_key(ctx: PlacementContext, pod: PodShape) -> tuple[object, ...]:
        # Without a target FGD scores against the task's own shape, so memoise per shape.
        return (id(ctx.target), id(ctx.full_target), pod if ctx.target is None else None)

    def _before(self, view: ClusterView, ctx: PlacementContext, pod: PodShape, idx: IntArray) -> FloatArray:
        key = (self.name, "before", *self._ctx_key(ctx, pod))
        entry: Any = view.cache.get(key)
        if entry is None or entry[0] is not ctx.target or entry[1] is not ctx.full_target:
            entry = (
                ctx.target,
                ctx.full_target,
                np.full(view.size, -1, dtype=np.int64),
                np.zeros(view.size, dtype=np.float64),
            )
            view.cache[key] = entry
        _, _, stamp, value = entry
        stale = idx[stamp[idx] != view.version[idx]]
        if len(stale):
            value[stale] = self.frag(
                view,
                view.model_idx[stale],
                view.cpu_left[stale],
                view.gpu_left[stale],
                view.mem_left[stale],
                ctx,
                pod,
            )
            stamp[stale] = view.version[stale]
        out: FloatArray = value[idx]
        return out

    # ----- hypothetical placements ------------------------------------------------------
    def _evaluate(
        self, view: ClusterView, pod: PodShape, nodes: IntArray, ctx: PlacementContext
    ) -> tuple[FloatArray, IntArray, FloatArray]:
        """(best delta, best device, secondary key) for placing ``pod`` on each of ``nodes``."""
        before = self._before(view, ctx, pod, nodes)
        models = view.model_idx[nodes]
        cpu = view.cpu_left[nodes] - pod.cpu
        mem = view.mem_left[nodes] - pod.memory
        left = view.gpu_left[nodes]
        k, g = left.shape
        if pod.shared:
            # One hypothetical state per (node, device); unusable devices get -inf.
            trial = np.repeat(left[:, None, :], g, axis=1)  # (k, g, g)
            eye = np.eye(g, dtype=np.int64)[None, :, :] * pod.milli
            trial = trial - eye
            ok = left >= pod.milli  # (k, g)
            after = self.frag(
                view,
                np.repeat(models, g),
                np.repeat(cpu, g),
                trial.reshape(k * g, g),
                np.repeat(mem, g),
                ctx,
                pod,
            ).reshape(k, g)
            delta_all = np.where(ok, before[:, None] - after, -np.inf)
            scores = self.quantise(delta_all)
            scores = np.where(ok, scores, -np.inf)
            dev = self.pick_device(scores, delta_all, left, pod)
            rows = np.arange(k)
            return delta_all[rows, dev], dev.astype(np.int64), self.secondary(view, pod, nodes, left, dev)
        if pod.num_gpu:
            free = left == GPU_MILLI
            taken = free & (np.cumsum(free, axis=1) <= pod.num_gpu)
            left = np.where(taken, 0, left)
        after = self.frag(view, models, cpu, left, mem, ctx, pod)
        dev = np.full(k, -1, dtype=np.int64)
        return before - after, dev, self.secondary(view, pod, nodes, view.gpu_left[nodes], dev)

    def frag(
        self,
        view: ClusterView,
        models: IntArray,
        cpu: IntArray,
        gpu: IntArray,
        mem: IntArray,
        ctx: PlacementContext,
        pod: PodShape,
    ) -> FloatArray:
        """Fragmentation of K node states (FGD: the artifact's measure; memory unused)."""
        target = _target(ctx, pod)
        return fragmentation(cpu, gpu, self._access(view, target)[models], target)

    def quantise(self, delta: FloatArray) -> FloatArray:
        """The artifact's integer score: int64(sigmoid(delta / 1000) * 100)."""
        with np.errstate(over="ignore"):
            out: FloatArray = np.trunc(1.0 / (1.0 + np.exp(-delta / 1000.0)) * MAX_SCORE)
        return out

    def pick_device(self, scores: FloatArray, delta: FloatArray, left: IntArray, pod: PodShape) -> IntArray:
        """First device with the best integer score (Go's strict ``>`` in the device loop)."""
        out: IntArray = np.argmax(scores, axis=1).astype(np.int64)
        return out

    def secondary(
        self, view: ClusterView, pod: PodShape, nodes: IntArray, left: IntArray, dev: IntArray
    ) -> FloatArray:
        """Tie-break key among equal scores (higher wins); FGD has none beyond the node rank."""
        return np.zeros(len(nodes), dtype=np.float64)

    def _column(
        self, view: ClusterView, pod: PodShape, idx: IntArray | list[int], ctx: PlacementContext
    ) -> _Column:
        key = (self.name, "col", pod, *self._ctx_key(ctx, pod))
        col: Any = view.cache.get(key)
        if col is None or col.target is not ctx.target or col.full_target is not ctx.full_target:
            n = view.size
            col = _Column(
                ctx.target,
                ctx.full_target,
                np.full(n, -1, dtype=np.int64),
                np.zeros(n, dtype=np.float64),
                np.full(n, -1, dtype=np.int64),
                np.zeros(n, dtype=np.float64),
            )
            view.cache[key] = col
        version = view.version
        if isinstance(idx, list) or len(idx) <= 4:  # a few rows: without numpy overhead
            rows = [i for i in (idx if isinstance(idx, list) else idx.tolist()) if col.stamp[i] != version[i]]
        else:
            rows = idx[col.stamp[idx] != version[idx]].tolist()
        if rows:
            # A row's values depend only on what the row holds (as the per-version memo
            # already assumes): rows in a state evaluated before are looked up.
            known = col.known
            contents = [view.row(i) for i in rows]  # a row's values depend on these alone
            miss = [k for k, c in enumerate(contents) if c not in known]
            if miss and len(known) > _KNOWN_MAX:
                known.clear()
            if miss and len(miss) <= _ONE_BY_ONE and self._evaluates_one(ctx):
                for k in miss:
                    known[contents[k]] = self._evaluate_one(view, pod, rows[k], ctx)
            elif miss:
                at = np.asarray([rows[k] for k in miss], dtype=np.int64)
                delta, dev, extra = self._evaluate(view, pod, at, ctx)
                for k, d, v, e in zip(miss, delta.tolist(), dev.tolist(), extra.tolist(), strict=True):
                    known[contents[k]] = (d, v, e)
            for i, c in zip(rows, contents, strict=True):
                col.delta[i], col.device[i], col.extra[i] = known[c]
                col.stamp[i] = version[i]
        result: _Column = col
        return result

    def _evaluates_one(self, ctx: PlacementContext) -> bool:
        """Whether :meth:`_evaluate_one` gives exactly what :meth:`_evaluate` gives here (FGD's
        own scores are evaluated with numpy only)."""
        return False

    def _evaluate_one(
        self, view: ClusterView, pod: PodShape, i: int, ctx: PlacementContext
    ) -> tuple[float, int, float]:
        """:meth:`_evaluate` for row ``i`` alone, without numpy."""
        raise NotImplementedError

    def scores(self, view: ClusterView, pod: PodShape, idx: IntArray, ctx: PlacementContext) -> FloatArray:
        col = self._column(view, pod, idx, ctx)
        return self.combine(self.quantise(col.delta[idx]), col.delta[idx], col.extra[idx])

    def combine(self, score: FloatArray, delta: FloatArray, extra: FloatArray) -> FloatArray:
        """Final node score from the integer FGD score, the raw delta and the secondary key."""
        return score

    def devices(
        self, view: ClusterView, pod: PodShape, n: int, ctx: PlacementContext, tick: int
    ) -> tuple[int, ...]:
        if pod.num_gpu == 0:
            return ()
        if not pod.shared:
            return tuple(lowest_free(view.row(n)[3], pod.num_gpu))
        col = self._column(view, pod, [n], ctx)
        return (int(col.device[n]),)
