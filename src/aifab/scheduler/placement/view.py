"""Array view of a set of nodes, and the pod shape the placement policies score.

Policies score every candidate node for one task at a time. Doing that with Python loops over
:class:`~aifab.core.nodes.NodeState` objects is far too slow for the packing benchmark (10,000
tasks x 1,213 nodes x 7 policies x 90 runs), so the policies work on this struct-of-arrays
view instead. The scheduler-facing :meth:`PlacementPolicy.choose` builds a small view from its
candidates; the packing simulator keeps one view for the whole run and mutates it with
:meth:`ClusterView.apply`. Both go through the same scoring code.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from aifab.core.nodes import NodeState
from aifab.core.resources import GPU_MILLI

IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]
FloatArray = npt.NDArray[np.float64]
RowState = tuple[int, int, int, tuple[int, ...]]  # see ClusterView.row

AFFINITY_TAGS = 9
"""GPU-shape tags tracked per node for GpuClustering: 0 = shared GPU, k = k whole GPUs (k <= 8)."""


@dataclass(frozen=True, slots=True)
class PodShape:
    """What a task asks for, in the terms every policy scores with.

    ``milli`` is per device: a shared task has ``num_gpu == 1`` and ``0 < milli < 1000``; a
    whole-GPU task has ``milli == 1000``; a CPU-only task has ``num_gpu == 0`` and ``milli == 0``.
    ``models`` lists the GPU models the task accepts (empty = any). Shapes are hashable so that
    policies can memoise per shape.
    """

    cpu: int
    memory: int
    num_gpu: int
    milli: int
    models: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if self.cpu < 0 or self.memory < 0 or self.num_gpu < 0:
            raise ValueError(f"negative request in {self}")
        if self.num_gpu == 0 and self.milli != 0:
            raise ValueError(f"milli without GPUs in {self}")
        if self.num_gpu > 0 and not 0 < self.milli <= GPU_MILLI:
            raise ValueError(f"milli per GPU must be in (0, 1000], got {self.milli}")
        if self.num_gpu > 1 and self.milli != GPU_MILLI:
            raise ValueError("a multi-GPU task must take whole GPUs")

    @property
    def shared(self) -> bool:
        return self.num_gpu == 1 and self.milli < GPU_MILLI

    @property
    def total_milli(self) -> int:
        return self.num_gpu * self.milli

    @property
    def affinity_tag(self) -> int:
        """Index into :data:`AFFINITY_TAGS`, or -1 for a CPU-only task."""
        if self.num_gpu == 0:
            return -1
        return 0 if self.shared else min(self.num_gpu, AFFINITY_TAGS - 1)


@dataclass(eq=False)
class ClusterView:
    """Free resources of N nodes as numpy arrays (one row per node, GPUs padded with zeros).

    ``rank`` breaks score ties: the lowest rank wins (the artifact breaks ties by the smallest
    node name after prefixing names with a random permutation, i.e. a per-run random order).
    ``version[n]`` increases whenever node n changes so policies can keep per-node caches in
    ``cache`` and know when an entry went stale.
    """

    names: tuple[str, ...]
    model_names: tuple[str, ...]
    model_idx: IntArray
    gpu_count: IntArray
    cpu_cap: IntArray
    cpu_left: IntArray
    mem_left: IntArray
    gpu_left: IntArray
    rank: IntArray
    affinity: IntArray
    version: IntArray
    cache: dict[Hashable, Any] = field(default_factory=dict)
    rank_is_row: bool = False  # rank[i] == i: ties go to the lowest row
    # Rows in the order they changed (see changed_since); log[0] is change number log_start.
    log: list[int] = field(default_factory=list)
    log_start: int = 0
    # Per row, what row() returned since the row last changed (None: not asked yet)
    _rows: list[RowState | None] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self.rank_is_row = bool(np.array_equal(self.rank, np.arange(len(self.rank))))
        self._rows = [None] * len(self.names)

    def row(self, i: int) -> RowState:
        """Row ``i`` as Python values: (free CPU, free memory, model index, free milli per
        device, padded). Code that looks at a row or two at a time reads it here, without numpy's
        cost per element; kept until the row changes (direct writes to the arrays must come
        before the first read, as for every cache of the view)."""
        got = self._rows[i]
        if got is None:
            got = self._rows[i] = (
                int(self.cpu_left[i]),
                int(self.mem_left[i]),
                int(self.model_idx[i]),
                tuple(self.gpu_left[i].tolist()),
            )
        return got

    @property
    def log_end(self) -> int:
        """The number of the next change: what a cache notes when it is up to date."""
        return self.log_start + len(self.log)

    def changed_since(self, at: int) -> list[int] | None:
        """The rows changed since change number ``at`` (repeats possible), or None when the
        log no longer reaches back that far or ``at`` is -1 (never): the caller then compares
        versions."""
        if at < self.log_start or at < 0:
            return None
        return self.log[at - self.log_start :]

    def _changed(self, i: int) -> None:
        self.version[i] += 1
        self._rows[i] = None
        log = self.log
        if len(log) >= 4 * len(self.names) + 1024:  # bound it; older readers compare versions
            self.log_start += len(log)
            log.clear()
        log.append(i)

    @property
    def size(self) -> int:
        return len(self.names)

    @property
    def max_gpus(self) -> int:
        return int(self.gpu_left.shape[1])

    @staticmethod
    def build(
        names: Sequence[str],
        models: Sequence[str],
        gpu_counts: Sequence[int],
        cpu: Sequence[int],
        memory: Sequence[int],
        rank: Sequence[int] | None = None,
    ) -> ClusterView:
        """An empty cluster: every node fully free."""
        n = len(names)
        model_names = tuple(sorted(set(models)))
        lookup = {m: i for i, m in enumerate(model_names)}
        counts = np.asarray(gpu_counts, dtype=np.int64).reshape(n)
        width = max(1, int(counts.max()) if n else 1)
        gpu_left = np.where(np.arange(width)[None, :] < counts[:, None], GPU_MILLI, 0).astype(np.int64)
        return ClusterView(
            names=tuple(names),
            model_names=model_names,
            model_idx=np.asarray([lookup[m] for m in models], dtype=np.int64).reshape(n),
            gpu_count=counts,
            cpu_cap=np.asarray(cpu, dtype=np.int64).reshape(n).copy(),
            cpu_left=np.asarray(cpu, dtype=np.int64).reshape(n).copy(),
            mem_left=np.asarray(memory, dtype=np.int64).reshape(n).copy(),
            gpu_left=gpu_left,
            rank=np.asarray(rank if rank is not None else range(n), dtype=np.int64).reshape(n),
            affinity=np.zeros((n, AFFINITY_TAGS), dtype=np.int64),
            version=np.zeros(n, dtype=np.int64),
        )

    @staticmethod
    def from_states(states: Sequence[NodeState]) -> ClusterView:
        """A view of the scheduler's node states; candidates' order is the tie-break order.

        NodeState does not record which task shapes a node holds, so GpuClustering sees every
        node without affinity here (it only loses its preference, never correctness).
        """
        view = ClusterView.build(
            [s.node.name for s in states],
            [s.node.gpu_model or "" for s in states],
            [len(s.gpu_free_milli) for s in states],
            [s.node.cpu_milli for s in states],
            [s.free_memory for s in states],
        )
        view.cpu_left[:] = [s.free_cpu for s in states]
        for i, s in enumerate(states):
            view.gpu_left[i, : len(s.gpu_free_milli)] = s.gpu_free_milli
        return view

    def sync(self, states: Sequence[NodeState], rows: Iterable[int]) -> None:
        """Copy the free resources of ``states[i]`` into row i for each listed row and mark the
        row changed (a scheduler keeps one view per cycle and syncs the nodes it touched)."""
        for i in rows:
            s = states[i]
            self.cpu_left[i] = s.free_cpu
            self.mem_left[i] = s.free_memory
            self.gpu_left[i, : len(s.gpu_free_milli)] = s.gpu_free_milli
            self._changed(i)

    def model_mask(self, models: frozenset[str]) -> BoolArray:
        """Nodes whose GPU model the task accepts (all nodes when it accepts any)."""
        key = ("model_mask", models)
        hit = self.cache.get(key)
        if hit is None:
            if models:
                ok = np.asarray([m in models for m in self.model_names], dtype=np.bool_)
                hit = ok[self.model_idx]
            else:
                hit = np.ones(self.size, dtype=np.bool_)
            self.cache[key] = hit
        mask: BoolArray = hit
        return mask

    def feasible(self, pod: PodShape) -> BoolArray:
        """Nodes where the task fits right now: CPU, memory, model and GPU devices.

        Memoised per shape; only rows changed since are recomputed (found in the change log,
        or by comparing versions when the log no longer reaches back; a caller that writes
        the arrays directly must do so before anything is memoised)."""
        mask: BoolArray = self._feasible_entry(pod)[1]
        return mask

    def feasible_with_count(self, pod: PodShape) -> tuple[BoolArray, int]:
        """:meth:`feasible` and how many nodes it lets in (kept up to date with the mask)."""
        entry = self._feasible_entry(pod)
        return entry[1], entry[3]

    def _feasible_entry(self, pod: PodShape) -> list[Any]:
        """[version stamps, mask, log_end when brought up to date, number of rows in the mask]."""
        key = ("feasible", pod)
        entry: list[Any] | None = self.cache.get(key)
        if entry is None:
            entry = [np.full(self.size, -1, dtype=np.int64), np.zeros(self.size, dtype=np.bool_), -1, 0]
            self.cache[key] = entry
        stamp, mask, at = entry[0], entry[1], entry[2]
        rows = self.changed_since(at)
        entry[2] = self.log_end
        if rows is not None:
            if len(rows) <= 16:  # the usual case in a scheduler: a node or a few changed since
                for i in set(rows):
                    now = self._feasible_row(pod, i)
                    entry[3] += int(now) - int(mask[i])
                    mask[i] = now
                    stamp[i] = self.version[i]
                return entry
            stale = np.unique(np.asarray(rows, dtype=np.int64))
        else:
            stale = np.flatnonzero(stamp != self.version)
        if len(stale) == self.size:
            mask[:] = self._feasible_rows(pod, slice(None))
        elif len(stale) <= 2:
            for i in stale.tolist():
                mask[i] = self._feasible_row(pod, i)
        elif len(stale):
            mask[stale] = self._feasible_rows(pod, stale)
        stamp[stale] = self.version[stale]
        entry[3] = int(np.count_nonzero(mask))
        return entry

    def _feasible_row(self, pod: PodShape, i: int) -> bool:
        """:meth:`_feasible_rows` for one row, without numpy's per-call overhead."""
        cpu, mem, _, left = self.row(i)
        if cpu < pod.cpu or mem < pod.memory:
            return False
        if pod.num_gpu == 0:
            return True
        if pod.models and not self.model_mask(pod.models)[i]:
            return False
        fits = sum(1 for m in left if m >= pod.milli)
        return fits >= (1 if pod.shared else pod.num_gpu)

    def _feasible_rows(self, pod: PodShape, rows: slice | IntArray) -> BoolArray:
        mask: BoolArray = (self.cpu_left[rows] >= pod.cpu) & (self.mem_left[rows] >= pod.memory)
        if pod.num_gpu == 0:
            return mask
        mask &= self.model_mask(pod.models)[rows]
        left = self.gpu_left[rows]
        if pod.shared:
            mask &= (left >= pod.milli).any(axis=1)
        else:
            mask &= (left >= pod.milli).sum(axis=1) >= pod.num_gpu
        return mask

    def fits_on(self, n: int, pod: PodShape, devices: Sequence[int]) -> bool:
        """Whether ``pod`` fits node n on exactly these devices (a guard before mutating)."""
        if self.cpu_left[n] < pod.cpu or self.mem_left[n] < pod.memory:
            return False
        if len(devices) != pod.num_gpu or len(set(devices)) != len(devices):
            return False
        if pod.num_gpu and not self.model_mask(pod.models)[n]:
            return False
        return all(0 <= d < self.gpu_count[n] and self.gpu_left[n, d] >= pod.milli for d in devices)

    def apply(self, n: int, pod: PodShape, devices: Sequence[int]) -> None:
        """Take the task's resources on node n. Raises ValueError rather than oversubscribe."""
        if not self.fits_on(n, pod, devices):
            raise ValueError(f"{pod} does not fit node {self.names[n]} on devices {tuple(devices)}")
        self.cpu_left[n] -= pod.cpu
        self.mem_left[n] -= pod.memory
        for d in devices:
            self.gpu_left[n, d] -= pod.milli
        if pod.affinity_tag >= 0:
            self.affinity[n, pod.affinity_tag] += 1
        self._changed(n)


def first_free_devices(row: IntArray, count: int) -> tuple[int, ...]:
    """The ``count`` lowest-index fully free devices (the artifact's exclusive-GPU choice)."""
    free = np.flatnonzero(row == GPU_MILLI)[:count]
    return tuple(int(d) for d in free)


def lowest_free(left: Sequence[int], count: int) -> list[int]:
    """:func:`first_free_devices` for a row as Python values (see ClusterView.row)."""
    return [d for d, m in enumerate(left) if m == GPU_MILLI][:count]


def with_whole_taken(left: Sequence[int], count: int) -> list[int]:
    """A row (Python values) after a task took ``count`` whole GPUs on its lowest free devices."""
    out = list(left)
    for d in lowest_free(left, count):
        out[d] = 0
    return out


def best_fit_device(row: IntArray, milli: int) -> int:
    """The device with the least free milli-GPU that still fits (lowest index on ties)."""
    fits = row >= milli
    masked = np.where(fits, row, GPU_MILLI + 1)
    return int(np.argmin(masked))
