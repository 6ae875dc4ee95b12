"""The FGD paper's baseline scoring policies, as its artifact implements them.

Each class cites the artifact file it follows (hkust-adsl/kubernetes-scheduler-simulator,
``pkg/simulator/plugin/``). Scores are the artifact's integer node scores (0..100, Go integer
arithmetic and truncation reproduced), because the quantisation decides which nodes tie, and
ties are broken by the per-run random node order (``view.rank``).
"""

from __future__ import annotations

import numpy as np

from aifab.core.resources import GPU_MILLI
from aifab.scheduler.placement.api import PlacementContext
from aifab.scheduler.placement.base import ScoringPolicy, mix64
from aifab.scheduler.placement.view import ClusterView, FloatArray, IntArray, PodShape, first_free_devices

MAX_SPEC_CPU = 128_000
"""Normaliser for CPU (millicores of the biggest node type), from the artifact's const.go."""
MAX_SPEC_GPU = 8_000
"""Normaliser for GPU (milli-GPUs of an 8-GPU node)."""
MAX_SCORE = 100


class RandomPolicy(ScoringPolicy):
    """``random_score.go``: a uniformly random feasible node; shared tasks go to a uniformly
    random fitting device (``-gpusel random``). Draws come from ``mix64(seed, tick, ...)``."""

    name = "random"

    def scores(self, view: ClusterView, pod: PodShape, idx: IntArray, ctx: PlacementContext) -> FloatArray:
        pick = mix64(ctx.seed, ctx.sequence, 1) % len(idx)
        out = np.zeros(len(idx), dtype=np.float64)
        out[pick] = 1.0
        return out

    def place(
        self, view: ClusterView, pod: PodShape, ctx: PlacementContext, tick: int
    ) -> tuple[int, tuple[int, ...]] | None:
        idx = np.flatnonzero(view.feasible(pod))
        if len(idx) == 0:
            return None
        n = int(idx[mix64(ctx.seed, tick, 1) % len(idx)])
        return n, self.devices(view, pod, n, ctx, tick)

    def devices(
        self, view: ClusterView, pod: PodShape, n: int, ctx: PlacementContext, tick: int
    ) -> tuple[int, ...]:
        row = view.gpu_left[n]
        if pod.num_gpu == 0:
            return ()
        if not pod.shared:
            return first_free_devices(row, pod.num_gpu)
        fitting = np.flatnonzero(row >= pod.milli)
        return (int(fitting[mix64(ctx.seed, tick, 2) % len(fitting)]),)


class DotProductPolicy(ScoringPolicy):
    """``dot_product_score.go`` with ``-dimext merge -norm max``: score = 1 - <free, request>/2
    over (CPU, total GPU) normalised by the largest node; prefers nodes with little left."""

    name = "dotprod"

    def scores(self, view: ClusterView, pod: PodShape, idx: IntArray, ctx: PlacementContext) -> FloatArray:
        cpu = view.cpu_left[idx] / MAX_SPEC_CPU * (pod.cpu / MAX_SPEC_CPU)
        gpu = view.gpu_left[idx].sum(axis=1) / MAX_SPEC_GPU * (pod.total_milli / MAX_SPEC_GPU)
        raw = 1.0 - (cpu + gpu) / 2.0
        out: FloatArray = np.trunc(MAX_SCORE * raw)
        return out


class GpuClusteringPolicy(ScoringPolicy):
    """``gpu_clustering_score.go``: keep tasks of one GPU shape together. Nodes already holding
    only this shape score in (75, 100], mixed nodes with it (50, 75], idle nodes (25, 50], the
    rest (0, 25]; inside a band the fuller node wins. CPU-only tasks score 0 everywhere."""

    name = "gpuclustering"

    def scores(self, view: ClusterView, pod: PodShape, idx: IntArray, ctx: PlacementContext) -> FloatArray:
        if pod.num_gpu == 0:
            return np.zeros(len(idx), dtype=np.float64)
        aff = view.affinity[idx]
        has = aff[:, pod.affinity_tag] > 0
        kinds = (aff > 0).sum(axis=1)
        fill = (MAX_SCORE // 4) * (MAX_SPEC_GPU - view.gpu_left[idx].sum(axis=1)) // MAX_SPEC_GPU
        band = np.where(has, np.where(kinds == 1, 75, 50), np.where(kinds == 0, 25, 0))
        out: FloatArray = (fill + band).astype(np.float64)
        return out


class GpuPackingPolicy(ScoringPolicy):
    """``gpu_packing_score.go``: prefer partially used GPUs, then partially used nodes, then idle
    nodes; among partially used GPUs the one with the least free share."""

    name = "gpupacking"

    def scores(self, view: ClusterView, pod: PodShape, idx: IntArray, ctx: PlacementContext) -> FloatArray:
        if pod.total_milli <= 0:
            return np.zeros(len(idx), dtype=np.float64)
        left = view.gpu_left[idx]
        count = view.gpu_count[idx]
        free = (left == GPU_MILLI).sum(axis=1)
        idle_score = np.maximum(MAX_SCORE // 3 - free, free)
        if pod.shared:
            tight = np.where(left >= pod.milli, left, GPU_MILLI + 1).min(axis=1)
            used_free = (tight == GPU_MILLI).astype(np.int64)
            ratio = tight * 100 // GPU_MILLI
        else:  # whole GPUs: only fully free devices qualify
            used_free = np.full(len(idx), pod.num_gpu, dtype=np.int64)
            ratio = np.zeros(len(idx), dtype=np.int64)
        partial = np.where(
            used_free > 0,
            np.maximum(MAX_SCORE // 2 - used_free, MAX_SCORE // 3),
            np.maximum(MAX_SCORE - ratio // 10, MAX_SCORE // 2),
        )
        out: FloatArray = np.where(free == count, idle_score, partial).astype(np.float64)
        return out


class BestFitPolicy(ScoringPolicy):
    """``best_fit_score.go``: least (CPU, GPU) left after placing, equally weighted and
    normalised by the largest node; the min-max normalisation it applies keeps the order."""

    name = "bestfit"

    def scores(self, view: ClusterView, pod: PodShape, idx: IntArray, ctx: PlacementContext) -> FloatArray:
        cpu = (view.cpu_left[idx] - pod.cpu) / MAX_SPEC_CPU * 0.5
        gpu = (view.gpu_left[idx].sum(axis=1) - pod.total_milli) / MAX_SPEC_GPU * 0.5
        out: FloatArray = np.trunc((1.0 - (cpu + gpu)) * MAX_SCORE)
        return out
