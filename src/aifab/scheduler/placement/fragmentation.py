"""FGD's target workload and its GPU-fragmentation measure, vectorised.

Follows the artifact of Weng et al., ATC'23 (hkust-adsl/kubernetes-scheduler-simulator):

* target workload = ``GetTypicalPods`` in ``pkg/utils/frag.go``: count task shapes (CPU, milli
  per GPU, GPU count, model list), sort by popularity, keep the most popular until they cover
  95 % of tasks (CPU-only tasks included), renormalise to frequencies summing to 1.
* fragmentation of a node = ``NodeGpuShareFragAmountScore``: for each target shape t with
  frequency p_t, the idle milli-GPUs that t could not use on this node, summed with weights
  p_t. If t fits (enough devices with enough free milli AND enough CPU) only the devices with
  less free milli than t needs count; in every other case (t lacks GPU, lacks CPU, cannot use
  this model, or is CPU-only) all idle milli-GPUs of the node count.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from aifab.scheduler.placement.view import BoolArray, FloatArray, IntArray, PodShape

POPULARITY_PCT = 95
"""Percent of tasks the target workload covers (the artifact's podPopularityThreshold)."""


def _sort_key(item: tuple[PodShape, int]) -> tuple[int, int, int, int, str]:
    shape, count = item
    # The artifact sorts by count, then (cpu, milli, gpu count, model string), all descending.
    return (count, shape.cpu, shape.milli, shape.num_gpu, "|".join(sorted(shape.models)))


@dataclass(frozen=True, eq=False)
class TargetWorkload:
    """The task shapes a cluster expects, with their frequencies (summing to 1)."""

    shapes: tuple[PodShape, ...]
    freq: FloatArray
    cpu: IntArray
    milli: IntArray
    num_gpu: IntArray
    memory: IntArray

    @staticmethod
    def of(weighted: Iterable[tuple[PodShape, float]]) -> TargetWorkload:
        """A target from explicit (shape, weight) pairs; weights are normalised."""
        pairs = [(s, float(w)) for s, w in weighted if w > 0]
        if not pairs:
            raise ValueError("a target workload needs at least one shape with positive weight")
        total = sum(w for _, w in pairs)
        shapes = tuple(s for s, _ in pairs)
        return TargetWorkload(
            shapes=shapes,
            freq=np.asarray([w / total for _, w in pairs], dtype=np.float64),
            cpu=np.asarray([s.cpu for s in shapes], dtype=np.int64),
            milli=np.asarray([s.milli for s in shapes], dtype=np.int64),
            num_gpu=np.asarray([s.num_gpu for s in shapes], dtype=np.int64),
            memory=np.asarray([s.memory for s in shapes], dtype=np.int64),
        )

    @staticmethod
    def from_tasks(tasks: Iterable[PodShape], popularity_pct: int = POPULARITY_PCT) -> TargetWorkload:
        """The artifact's typical pods: most popular shapes covering ``popularity_pct`` % of tasks.

        Memory is not part of a shape's identity (the artifact ignores it); each kept shape
        carries the mean memory of its tasks, which only aifab's measure looks at.
        """
        counts: Counter[PodShape] = Counter()
        memory: dict[PodShape, int] = {}
        for t in tasks:
            key = PodShape(cpu=t.cpu, memory=0, num_gpu=t.num_gpu, milli=t.milli, models=t.models)
            counts[key] += 1
            memory[key] = memory.get(key, 0) + t.memory
        ranked = sorted(counts.items(), key=_sort_key, reverse=True)
        total = sum(counts.values())
        expected = float(popularity_pct) * total / 100.0  # same float expression as the artifact
        kept: list[tuple[PodShape, float]] = []
        cumulative = 0
        for shape, count in ranked:
            if cumulative >= expected:
                break
            mean_mem = memory[shape] // count
            kept.append(
                (PodShape(shape.cpu, mean_mem, shape.num_gpu, shape.milli, shape.models), float(count))
            )
            cumulative += count
        return TargetWorkload.of(kept)

    def access(self, model_names: tuple[str, ...]) -> BoolArray:
        """(models x shapes): can shape t use a node of this model at all."""
        out = np.ones((len(model_names), len(self.shapes)), dtype=np.bool_)
        for j, s in enumerate(self.shapes):
            if s.models:
                out[:, j] = [m in s.models for m in model_names]
        return out


def fragmentation(
    cpu_left: IntArray, gpu_left: IntArray, access: BoolArray, target: TargetWorkload
) -> FloatArray:
    """Expected idle milli-GPUs the target workload cannot use, for K node states at once.

    ``cpu_left`` (K,), ``gpu_left`` (K, G) padded with zeros, ``access`` (K, T) from
    :meth:`TargetWorkload.access` indexed by each state's model.
    """
    total = gpu_left.sum(axis=1).astype(np.float64)  # (K,)
    milli = target.milli[None, None, :]  # (1, 1, T)
    enough = gpu_left[:, :, None] >= milli  # (K, G, T)
    gpu_ok = enough.sum(axis=1) >= target.num_gpu[None, :]  # (K, T)
    cpu_ok = cpu_left[:, None] >= target.cpu[None, :]
    usable = gpu_ok & cpu_ok & access & (target.num_gpu[None, :] > 0)
    # For a shape that fits, only the devices too small for it are stranded.
    small = np.where(enough, 0, gpu_left[:, :, None]).sum(axis=1).astype(np.float64)  # (K, T)
    stranded = np.where(usable, small, total[:, None])
    out: FloatArray = stranded @ target.freq
    return out


def fill_fragmentation(
    cpu_left: IntArray,
    gpu_left: IntArray,
    access: BoolArray,
    target: TargetWorkload,
    mem_left: IntArray | None = None,
) -> FloatArray:
    """Expected idle milli-GPUs left stranded if the node were filled with each target shape.

    For shape t: fit as many copies of t as the node's GPUs (per device for shared tasks) AND
    its CPU allow; what they cannot use is stranded. Unlike FGD's measure this sees the CPU a
    placement takes away from future GPU tasks before a threshold is crossed, which is what
    strands GPUs on CPU-tight nodes. CPU-only shapes use no GPU and count zero.
    """
    total = gpu_left.sum(axis=1).astype(np.float64)  # (K,)
    milli = np.maximum(target.milli, 1)
    num = np.maximum(target.num_gpu, 1)
    shared = (target.num_gpu == 1) & (target.milli < 1000)
    per_device = (gpu_left[:, :, None] // milli[None, None, :]).sum(axis=1)  # (K, T)
    whole = (gpu_left == 1000).sum(axis=1)[:, None] // num[None, :]  # (K, T)
    gpu_cap = np.where(shared[None, :], per_device, whole)
    cpu_cap = cpu_left[:, None] // np.maximum(target.cpu, 1)[None, :]
    copies = np.minimum(gpu_cap, cpu_cap)
    if mem_left is not None:
        copies = np.minimum(copies, mem_left[:, None] // np.maximum(target.memory, 1)[None, :])
    used = copies * (target.num_gpu * target.milli)[None, :]
    stranded = np.where(access, total[:, None] - used, total[:, None])
    stranded = np.where(target.num_gpu[None, :] > 0, stranded, 0.0)
    out: FloatArray = stranded @ target.freq
    return out


COMMON_SHARE = 0.01
"""A shared task size counts as common, for :func:`gap_waste_table`, when at least this share
of the target's tasks have it."""


def gap_waste_table(target: TargetWorkload, common_share: float = COMMON_SHARE) -> FloatArray:
    """Idle milli-GPUs a device with ``g`` free (index g, 0..1000) keeps for good when later
    tasks of the target's common shared sizes fill it as well as they can.

    ``E[g] = min(g, min over common sizes s <= g of E[g - s])`` and ``E[1000] = 0``: a free
    device takes a whole-GPU task. FGD's measure scores a device by which shapes fit it *now*, so
    a device with 680 free (a 320 on it) looks badly fragmented, as no 810 or whole-GPU task
    fits, and a 470 placed there looks like an improvement; yet the 210 it leaves fits no common
    task, while a 650 would have filled the 680 to 970. Rare sizes are left out because the
    stream has too few of them to fill every gap they could fill (the trace's 160-milli tasks
    against its thousands of 190 slivers).
    """
    per_size: dict[int, float] = {}
    for milli, num, freq in zip(
        target.milli.tolist(), target.num_gpu.tolist(), target.freq.tolist(), strict=True
    ):
        if num == 1 and 0 < milli < 1000:
            per_size[milli] = per_size.get(milli, 0.0) + freq
    sizes = sorted(s for s, f in per_size.items() if f >= common_share)
    table = np.arange(1001, dtype=np.float64)
    for g in range(1, 1000):
        for s in sizes:
            if s > g:
                break
            table[g] = min(table[g], table[g - s])
    table[1000] = 0.0
    return table


# ----- one node state against a one-shape target, without numpy --------------------------------
# The scheduler scores a task against its own shape (frequency exactly 1.0), and most evaluations
# are of a node or two that just changed, where numpy's cost per call is most of the time. With
# one shape every value is a whole number of milli-GPUs (times 1.0), so these give exactly the
# floats the functions above give (tests compare them).


def state_fragmentation(cpu: int, left: list[int], access: bool, shape: PodShape) -> float:
    """:func:`fragmentation` of one state (``left``: free milli per device, padded as in the
    view) against the target ``{shape: 1.0}``."""
    milli = shape.milli
    total = 0
    small = 0
    enough = 0
    for m in left:
        total += m
        if m >= milli:
            enough += 1
        else:
            small += m
    usable = enough >= shape.num_gpu and cpu >= shape.cpu and access and shape.num_gpu > 0
    return float(small if usable else total)


def state_fill(cpu: int, left: list[int], mem: int, access: bool, shape: PodShape) -> float:
    """:func:`fill_fragmentation` (with memory) of one state against the target ``{shape: 1.0}``."""
    if shape.num_gpu <= 0:
        return 0.0
    total = sum(left)
    if not access:
        return float(total)
    milli = max(shape.milli, 1)
    if shape.num_gpu == 1 and shape.milli < 1000:
        gpu_cap = sum(m // milli for m in left)
    else:
        gpu_cap = sum(1 for m in left if m == 1000) // max(shape.num_gpu, 1)
    copies = min(gpu_cap, cpu // max(shape.cpu, 1), mem // max(shape.memory, 1))
    return float(total - copies * (shape.num_gpu * shape.milli))
