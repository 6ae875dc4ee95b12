"""aifab's default placement policy: FGD + a CPU/memory-aware look-ahead + a gap term + a scarcity reserve.

Measured on the FGD paper's packing experiment (bench/packing.py), in order of what helped:

* Reserve: a placement that makes a node unable to host a task shape costs
  ``0.3 x p_t x size_t x N / H_t`` (p_t = share of tasks with that shape among ALL shapes of the
  trace, size_t = its milli-GPUs, or its CPU's GPU-equivalent for CPU-only shapes, N nodes, H_t
  nodes that can host it now). Common shapes cost little; the rare 8-GPU, 120-core tasks that
  only the 39 G3 nodes can host cost a lot. Without it the look-ahead below spends those nodes
  on small tasks early and the big tasks fail already at 10 % load (allocation at 90 % arrived
  fell 1.5 points below FGD); with it aifab matches FGD at 80-90 % and gains more at 130 %.

* FGD's measure only notices that a placement takes CPU (or memory) away from future GPU
  tasks once a threshold is crossed: taking 12 cores from a 96-core, 8-GPU node scores the same
  as taking them from a 104-core, 2-GPU node. We add a look-ahead term, the idle milli-GPUs
  left stranded if the node were filled with copies of each target shape under its GPU, CPU
  *and memory* limits (:func:`fill_fragmentation`), weighted 0.25 against FGD's measure
  (0.25-0.35 measured best on ``default``; 0.5-2.0 gain less). Largest gain on CPU-heavy
  traces (cpu250, seeds 42-43: FGD 93.1 %, look-ahead alone 94.8 % but starving big tasks,
  with the reserve 93.8 % at 130 % arrived).
* Gap term: 3 x the idle milli-GPUs each device would keep for good if later tasks of the
  trace's common shared sizes (>= 1 % of its tasks) filled it as well as they can
  (:func:`gap_waste_table`). FGD's measure calls a device with 680 free fragmented (no 810 or
  whole-GPU task fits) and fills it with a 470, leaving 210 that no common task uses; a 650
  would have left 30. On ``default`` at 130 % arrived it cut the unallocated share from 4.10 to
  3.94 % (seeds 42-45; weight 2-3 alike, 1 gained half) and from 4.19 to 4.01 % on seeds 46-51
  that were not used to choose it; gpushare40 5.56 -> 5.27 %, cpu250 6.23 -> 6.14 % (seeds 42-43).
* Nodes are ranked by the raw change of that combined measure (rounded to 1e-6 so equal
  changes tie). With FGD's own measure the raw change did worse than FGD's integer sigmoid
  score; with the look-ahead term it does better.
* Inside a node, a shared task takes the device with the best change, then the tightest fit.
* Remaining ties go to the node with the least CPU and GPU left (best fit); FGD breaks them by
  an arbitrary node order, and worst-fit tie-breaking is disastrous (-6 points).

The scheduler scores a task against its own shape; there a node's score depends on the node
alone except for the reserve, which is one cost for every node that would lose the shape. So
its choices go through a :class:`~aifab.scheduler.placement.board.Board` per shape, which keeps
the nodes grouped by score and looks at the best groups only, instead of scoring every
feasible node (a dozen array operations over thousands of nodes) for every task. It chooses
exactly the node and score that scoring every node gives (tests compare the two).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from aifab.scheduler.placement.api import PlacementContext
from aifab.scheduler.placement.board import Board, rounded
from aifab.scheduler.placement.fgd import FgdPolicy, own_target
from aifab.scheduler.placement.fragmentation import (
    TargetWorkload,
    fill_fragmentation,
    gap_waste_table,
    state_fill,
    state_fragmentation,
)
from aifab.scheduler.placement.view import (
    BoolArray,
    ClusterView,
    FloatArray,
    IntArray,
    PodShape,
    with_whole_taken,
)

_MAX_CPU = 128_000.0
_MAX_GPU = 8_000.0
FILL_WEIGHT = 0.25
GAP_WEIGHT = 3.0


class FillFgdPolicy(FgdPolicy):
    """FGD's measure + 0.25 x fill look-ahead, raw deltas, best-fit tie-break (no reserve)."""

    name = "aifab_fill"
    fill_weight = FILL_WEIGHT
    gap_weight = 0.0

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
        base = super().frag(view, models, cpu, gpu, mem, ctx, pod)
        full = ctx.full_target or ctx.target or own_target(pod)
        fill = fill_fragmentation(cpu, gpu, self._access(view, full)[models], full, mem)
        out: FloatArray = base + self.fill_weight * fill
        if self.gap_weight:
            # A trial state of a device too small for the task holds a negative count and
            # indexes the table from its end; FgdPolicy._evaluate discards those states.
            out = out + self.gap_weight * _gap_table(view, full)[gpu].sum(axis=1)
        return out

    rows_in_python = True  # evaluate a few rows without numpy where exact (tests compare with False)

    def _evaluates_one(self, ctx: PlacementContext) -> bool:
        # Exact for a task scored against its own shape with this class's measure (see
        # fragmentation.state_fragmentation), whatever the subclass does with the values.
        cls = type(self)
        return (
            self.rows_in_python
            and ctx.target is None
            and ctx.full_target is None
            and cls.frag is FillFgdPolicy.frag
            and cls.pick_device is FillFgdPolicy.pick_device
            and cls.secondary is FillFgdPolicy.secondary
        )

    def _evaluate_one(
        self, view: ClusterView, pod: PodShape, i: int, ctx: PlacementContext
    ) -> tuple[float, int, float]:
        target = own_target(pod)
        cpu, mem, model, row = view.row(i)
        access = bool(self._access(view, target)[model, 0])
        left = list(row)
        before = self._state_frag(view, target, cpu, left, mem, access, pod)
        cpu_after, mem_after = cpu - pod.cpu, mem - pod.memory
        extra = -((cpu_after / _MAX_CPU) + (sum(left) - pod.total_milli) / _MAX_GPU) / 2.0
        if not pod.shared:
            after = with_whole_taken(left, pod.num_gpu) if pod.num_gpu else left
            delta = before - self._state_frag(view, target, cpu_after, after, mem_after, access, pod)
            return delta, -1, extra
        # The device with the best rounded change, then the least free milli (pick_device).
        best, best_key, best_delta = 0, -np.inf, -np.inf
        for d, m in enumerate(left):
            if m < pod.milli:
                continue  # and the first device, if none fits, with -inf (as argmax gives)
            trial = left.copy()
            trial[d] = m - pod.milli
            dd = before - self._state_frag(view, target, cpu_after, trial, mem_after, access, pod)
            key = rounded(dd) * 4096.0 - m
            if key > best_key:
                best, best_key, best_delta = d, key, dd
        return best_delta, best, extra

    def _state_frag(
        self,
        view: ClusterView,
        target: TargetWorkload,
        cpu: int,
        left: list[int],
        mem: int,
        access: bool,
        pod: PodShape,
    ) -> float:
        """:meth:`frag` of one state against the task's own shape."""
        out = state_fragmentation(cpu, left, access, pod) + self.fill_weight * state_fill(
            cpu, left, mem, access, pod
        )
        if self.gap_weight:
            table = _gap_list(view, target)
            out = out + self.gap_weight * float(sum(table[m] for m in left))
        return out

    def quantise(self, delta: FloatArray) -> FloatArray:
        # Round away float noise so that equal changes really tie.
        out: FloatArray = np.round(delta, 6)
        return out

    def pick_device(self, scores: FloatArray, delta: FloatArray, left: IntArray, pod: PodShape) -> IntArray:
        # Best change; among equal changes the device with the least free milli (tightest).
        key = np.where(np.isfinite(delta), np.round(delta, 6) * 4096.0 - left, -np.inf)
        out: IntArray = np.argmax(key, axis=1).astype(np.int64)
        return out

    def secondary(
        self, view: ClusterView, pod: PodShape, nodes: IntArray, left: IntArray, dev: IntArray
    ) -> FloatArray:
        cpu_after = (view.cpu_left[nodes] - pod.cpu) / _MAX_CPU
        gpu_after = (view.gpu_left[nodes].sum(axis=1) - pod.total_milli) / _MAX_GPU
        out: FloatArray = -(cpu_after + gpu_after) / 2.0  # in (-1, 0]: fuller nodes score higher
        return out

    def combine(self, score: FloatArray, delta: FloatArray, extra: FloatArray) -> FloatArray:
        # Lexicographic: the rounded change first, the best-fit key only among equal changes
        # (|extra| < 1, scaled far below the 1e-6 rounding step).
        out: FloatArray = score + extra * 1e-7
        return out


def _gap_table(view: ClusterView, full: TargetWorkload) -> FloatArray:
    """:func:`gap_waste_table` of a target, memoised on the view."""
    key = ("gap_table", id(full))
    hit: Any = view.cache.get(key)
    if hit is None or hit[0] is not full:
        hit = (full, gap_waste_table(full))
        view.cache[key] = hit
    out: FloatArray = hit[1]
    return out


def _gap_list(view: ClusterView, full: TargetWorkload) -> list[float]:
    """:func:`_gap_table` as a list, for one state at a time."""
    key = ("gap_list", id(full))
    hit: Any = view.cache.get(key)
    if hit is None or hit[0] is not full:
        hit = (full, _gap_table(view, full).tolist())
        view.cache[key] = hit
    out: list[float] = hit[1]
    return out


def _can_host(
    cpu: IntArray, gpu: IntArray, mem: IntArray, access: BoolArray, target: TargetWorkload
) -> BoolArray:
    """(K, T): could each node state host one task of each shape right now."""
    enough = (gpu[:, :, None] >= target.milli[None, None, :]).sum(axis=1) >= target.num_gpu[None, :]
    out: BoolArray = (
        enough & access & (cpu[:, None] >= target.cpu[None, :]) & (mem[:, None] >= target.memory[None, :])
    )
    return out


def _state_hosts(cpu: int, mem: int, left: Sequence[int], shape: PodShape, access: bool) -> bool:
    """Whether a node state (free CPU, memory, milli-GPU per device) can host one ``shape``."""
    if not access or cpu < shape.cpu or mem < shape.memory:
        return False
    return sum(1 for m in left if m >= shape.milli) >= shape.num_gpu


def _per_node_cache(
    view: ClusterView, key: tuple[Any, ...], full: TargetWorkload
) -> tuple[IntArray, BoolArray]:
    """A per-node x per-shape boolean matrix memoised on the view, with the node version each row
    was computed at (-1 = never): rows are recomputed only for nodes that changed since."""
    entry: Any = view.cache.get(key)
    if entry is None or entry[0] is not full:
        entry = (full, np.full(view.size, -1, dtype=np.int64), np.zeros((view.size, len(full.shapes)), bool))
        view.cache[key] = entry
    return entry[1], entry[2]


def _lost_rows(
    view: ClusterView,
    pod: PodShape,
    rows: IntArray,
    full: TargetWorkload,
    device: IntArray,
    hosts: BoolArray,
    access: BoolArray,
) -> BoolArray:
    """Per row: the target shapes it can host now and could not once ``pod`` is placed there
    (on ``device[row]`` for a shared task, on the lowest free devices for whole GPUs)."""
    left = view.gpu_left[rows].copy()
    if pod.shared:
        left[np.arange(len(rows)), device[rows]] -= pod.milli
    elif pod.num_gpu:
        free = left == 1000
        left = np.where(free & (np.cumsum(free, axis=1) <= pod.num_gpu), 0, left)
    after = _can_host(
        view.cpu_left[rows] - pod.cpu,
        left,
        view.mem_left[rows] - pod.memory,
        access[view.model_idx[rows]],
        full,
    )
    out: BoolArray = hosts[rows] & ~after
    return out


def _lost_one(view: ClusterView, pod: PodShape, i: int, device: int, shape: PodShape, access: bool) -> bool:
    """:func:`_lost_rows` for one row and a one-shape target that the row can host now."""
    cpu, mem, _, row = view.row(i)
    left = with_whole_taken(row, pod.num_gpu) if not pod.shared and pod.num_gpu else list(row)
    if pod.shared:
        left[device] -= pod.milli
    return not _state_hosts(cpu - pod.cpu, mem - pod.memory, left, shape, access)


class _HostTable:
    """Per node and target shape: could the node host one task of the shape now, with the
    number of nodes that can per shape; rows are recomputed as the view's log says they change."""

    def __init__(self, full: TargetWorkload, size: int) -> None:
        self.full = full
        self.stamp = np.full(size, -1, dtype=np.int64)  # view.version of each row when computed
        self.mat = np.zeros((size, len(full.shapes)), dtype=np.bool_)
        self.count = np.zeros(len(full.shapes), dtype=np.int64)
        self.at = -1  # view.log_end when last refreshed (-1: never; compare versions)

    def refresh(self, view: ClusterView, access: BoolArray) -> None:
        rows = view.changed_since(self.at)
        self.at = view.log_end
        mat, stamp, version = self.mat, self.stamp, view.version
        if rows is not None and len(rows) <= 16 and len(self.full.shapes) == 1:
            shape = self.full.shapes[0]  # the usual case, without numpy overhead
            ok: list[bool] = access[:, 0].tolist()
            gained = 0
            for i in set(rows):
                if stamp[i] != version[i]:
                    cpu, mem, model, left = view.row(i)
                    now = _state_hosts(cpu, mem, left, shape, ok[model])
                    gained += int(now) - int(mat[i, 0])
                    mat[i, 0] = now
                    stamp[i] = version[i]
            if gained:
                self.count[0] += gained
            return
        if rows is None:
            stale = np.flatnonzero(stamp != version)
        else:
            stale = np.unique(np.asarray(rows, dtype=np.int64))
            stale = stale[stamp[stale] != version[stale]]
        if len(stale):
            new = _can_host(
                view.cpu_left[stale],
                view.gpu_left[stale],
                view.mem_left[stale],
                access[view.model_idx[stale]],
                self.full,
            )
            self.count += new.sum(axis=0) - mat[stale].sum(axis=0)
            mat[stale] = new
            stamp[stale] = version[stale]


class _Hosts(NamedTuple):
    """The nodes that can host one task of a one-shape target now (what a _HostTable holds)."""

    full: TargetWorkload
    mat: BoolArray  # (nodes, 1)
    how_many: int


class AifabPolicy(FillFgdPolicy):
    """aifab's default: fill-aware FGD + a penalty for taking away the last nodes able to host
    a scarce task shape (see the module docstring)."""

    name = "aifab"
    gap_weight = GAP_WEIGHT
    reserve_weight = 0.3
    scarcity_power = 1.0
    boards = True  # choose through a Board where one applies (tests compare with False)

    def _full(self, ctx: PlacementContext, pod: PodShape) -> TargetWorkload:
        return ctx.full_target or ctx.target or own_target(pod)

    def _hosts(self, view: ClusterView, full: TargetWorkload) -> BoolArray:
        return self._host_table(view, full).mat

    def _host_table(self, view: ClusterView, full: TargetWorkload) -> _HostTable:
        key = ("hosts", id(full))
        table: Any = view.cache.get(key)
        if table is None or table.full is not full:
            table = view.cache[key] = _HostTable(full, view.size)
        table.refresh(view, self._access(view, full))
        out: _HostTable = table
        return out

    @staticmethod
    def _shape_value(view: ClusterView, full: TargetWorkload) -> FloatArray:
        """freq x size of each target shape, memoised per view and target; CPU-only shapes are
        valued at their CPU's GPU-equivalent in this cluster (capacities never change)."""
        key = ("shape_value", id(full))
        hit: Any = view.cache.get(key)
        if hit is None or hit[0] is not full:
            gpu_per_cpu = view.gpu_count.sum() * 1000 / max(int(view.cpu_cap.sum()), 1)
            size = np.where(full.num_gpu > 0, full.num_gpu * full.milli, full.cpu * gpu_per_cpu)
            hit = (full, full.freq * size)
            view.cache[key] = hit
        out: FloatArray = hit[1]
        return out

    def _lost(
        self,
        view: ClusterView,
        pod: PodShape,
        idx: IntArray,
        full: TargetWorkload,
        col: Any,
        hosts: BoolArray,
    ) -> BoolArray:
        """Per node in idx: the target shapes it could host before placing pod and not after
        (``col`` is pod's up-to-date column, ``hosts`` the up-to-date host matrix)."""
        key = ("lost", pod, id(full))
        stamp, mat = _per_node_cache(view, key, full)
        stale = idx[stamp[idx] != view.version[idx]]
        if len(stale):
            mat[stale] = _lost_rows(view, pod, stale, full, col.device, hosts, self._access(view, full))
            stamp[stale] = view.version[stale]
        out: BoolArray = mat[idx]
        return out

    def _value(self, view: ClusterView, full: TargetWorkload, table: _HostTable) -> FloatArray:
        """What losing the ability to host each target shape costs, given how many nodes can."""
        scarcity = (view.size / np.maximum(table.count, 1)) ** self.scarcity_power
        out: FloatArray = self._shape_value(view, full) * scarcity
        return out

    def scores(self, view: ClusterView, pod: PodShape, idx: IntArray, ctx: PlacementContext) -> FloatArray:
        col = self._column(view, pod, idx, ctx)
        full = self._full(ctx, pod)
        table = self._host_table(view, full)
        lost = self._lost(view, pod, idx, full, col, table.mat)
        penalty = lost.astype(np.float64) @ self._value(view, full, table)
        delta = col.delta[idx] - self.reserve_weight * penalty
        return self.combine(self.quantise(delta), delta, col.extra[idx])

    def best_in_mask(
        self, view: ClusterView, pod: PodShape, feasible: BoolArray, allowed: BoolArray, ctx: PlacementContext
    ) -> tuple[int, float] | None:
        board = self._board(view, pod, ctx) if self.boards else None
        if board is None or not board.usable or not allowed.all():
            return super().best_in_mask(view, pod, feasible, allowed, ctx)
        full = own_target(pod)
        hosts = self._own_hosts(view, pod, full)
        self._bring_up_to_date(board, view, pod, feasible, ctx, hosts)
        if not board.usable:  # kept so: this shape is scored node by node on this view
            return super().best_in_mask(view, pod, feasible, allowed, ctx)
        # c exactly as scores() works it out: value x 1.0 (a one-shape target) x the weight.
        value = self._shape_value(view, full)[0] * (view.size / max(hosts.how_many, 1)) ** self.scarcity_power
        return board.best(self.reserve_weight * float(value))

    def _own_hosts(self, view: ClusterView, pod: PodShape, full: TargetWorkload) -> _Hosts:
        """Which nodes can host one task of ``pod``'s own shape now, and how many (what the host
        table of ``own_target(pod)`` holds)."""
        if pod.num_gpu > 0 or not pod.models:
            # The same checks as the view's feasibility mask (model, CPU, memory, devices),
            # which is up to date already: no table to keep. (A CPU-only task may name GPU
            # models, which the mask ignores and the table does not.)
            mask, count = view.feasible_with_count(pod)
            return _Hosts(full, mask[:, None], count)
        table = self._host_table(view, full)
        return _Hosts(full, table.mat, int(table.count[0]))

    def _board(self, view: ClusterView, pod: PodShape, ctx: PlacementContext) -> Board | None:
        """The board of this shape, where its scores are the ones it assumes: a view whose ties
        go to the lowest row, no target workload, this class's scoring."""
        if not (
            view.rank_is_row and ctx.target is None and ctx.full_target is None and self._board_scoring()
        ):
            return None
        key = (self.name, "board", pod)
        board: Any = view.cache.get(key)
        if board is None or board.worn():
            board = view.cache[key] = Board(view.size)
        out: Board = board
        return out

    def _board_scoring(self) -> bool:
        cls = type(self)
        return (
            cls.scores is AifabPolicy.scores
            and cls.quantise is FillFgdPolicy.quantise
            and cls.combine is FillFgdPolicy.combine
            and cls._value is AifabPolicy._value
        )

    def _bring_up_to_date(
        self,
        board: Board,
        view: ClusterView,
        pod: PodShape,
        feasible: BoolArray,
        ctx: PlacementContext,
        table: _Hosts,
    ) -> None:
        changed = view.changed_since(board.at)
        board.at = view.log_end
        if changed is None:
            rows = np.flatnonzero(feasible)
            for i in np.flatnonzero(~feasible).tolist():
                board.drop_row(i)
        else:
            few: list[int] = []
            for i in set(changed):
                if feasible[i]:
                    few.append(i)
                else:
                    board.drop_row(i)
            if len(few) <= 12:  # the usual case: a node or a few changed since
                if few:
                    self._set_rows(board, view, pod, few, ctx, table)
                return
            rows = np.asarray(few, dtype=np.int64)
        if not len(rows):
            return
        col = self._column(view, pod, rows, ctx)
        access = self._access(view, table.full)
        lost = _lost_rows(view, pod, rows, table.full, col.device, table.mat, access)
        for i, d, e, gone in zip(
            rows.tolist(),
            col.delta[rows].tolist(),
            col.extra[rows].tolist(),
            lost[:, 0].tolist(),
            strict=True,
        ):
            board.set_row(i, d, e, gone)

    def _set_rows(
        self,
        board: Board,
        view: ClusterView,
        pod: PodShape,
        rows: list[int],
        ctx: PlacementContext,
        table: _Hosts,
    ) -> None:
        """:meth:`_bring_up_to_date`'s last step for a few rows, without numpy overhead."""
        col = self._column(view, pod, rows, ctx)
        ok: list[bool] = self._access(view, table.full)[:, 0].tolist()
        shape = table.full.shapes[0]
        for i in rows:
            gone = bool(table.mat[i, 0]) and _lost_one(
                view, pod, i, int(col.device[i]), shape, ok[view.row(i)[2]]
            )
            board.set_row(i, float(col.delta[i]), float(col.extra[i]), gone)
