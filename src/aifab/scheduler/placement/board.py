"""The best node for one task shape under aifab's policy, kept up to date as nodes change.

aifab's score of a node (see :mod:`aifab.scheduler.placement.aifab`) for a task scored against
its own shape is ``round(delta, 6) + extra * 1e-7`` when placing the task would leave the node
still able to host the shape, and ``round(delta - c, 6) + extra * 1e-7`` when it would not
("lost"), where ``delta`` and ``extra`` depend on the node alone and ``c`` on how many nodes can
host the shape (the same for every node at one moment). Ties go to the lowest row.

Scoring every feasible node for every decision costs a dozen array operations over thousands
of nodes. A :class:`Board` instead groups the rows by what they score: rows that would not
lose the shape by their exact score, lost rows by ``(delta, extra)``; each group keeps its rows
in a heap and the groups sit in a heap ordered by score (or by ``delta``, then ``extra``, for
lost ones, whose final order ``c`` cannot change: rounding is monotone). A choice looks at the
top groups only. Rows leave groups lazily: a row's current group is ``keys[row]``, and heap
entries that disagree are dropped when they reach the top.
"""

from __future__ import annotations

import math
from heapq import heappop, heappush

NOT_LOST = False
LOST = True
GroupKey = tuple[bool, float, float]


def rounded(x: float) -> float:
    """``numpy.round(x, 6)`` for one float: ``rint(x * 1e6) / 1e6`` (round() rounds half to even)."""
    return float(round(x * 1e6)) / 1e6


def final_score(delta: float, extra: float) -> float:
    """The policy's score from its rounded change and its tie-break key."""
    return rounded(delta) + extra * 1e-7


class Board:
    """Rows of a view grouped by score for one task shape (see the module docstring)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.keys: list[GroupKey | None] = [None] * size  # each row's group; None: not a candidate
        self.groups: dict[GroupKey, list[int]] = {}  # group -> heap of rows (stale ones included)
        self.kept: list[float] = []  # heap of -score of groups that would keep the shape
        self.lost: list[tuple[float, float]] = []  # heap of (-delta, -extra) of lost groups
        self.at = -1  # view.log_end when last brought up to date (-1: never)
        self.pushes = 0  # heap entries made since built: bounds the stale ones
        self.usable = True  # False: a value the ordering cannot take (NaN, extra > 0)

    def worn(self) -> bool:
        """Whether stale entries may outnumber live ones: then the board is built anew."""
        return self.pushes > 2 * self.size + 1024

    def set_row(self, row: int, delta: float, extra: float, lost: bool) -> None:
        if math.isnan(delta) or not extra <= 0.0:
            self.usable = False  # the heaps' order assumes both (see best)
            return
        key: GroupKey = (LOST, delta, extra) if lost else (NOT_LOST, final_score(delta, extra), 0.0)
        if self.keys[row] == key:
            return
        self.keys[row] = key
        group = self.groups.get(key)
        if group is None:
            group = self.groups[key] = []
            if lost:
                heappush(self.lost, (-delta, -extra))
            else:
                heappush(self.kept, -key[1])
        heappush(group, row)
        self.pushes += 1

    def drop_row(self, row: int) -> None:
        self.keys[row] = None

    def _first_row(self, key: GroupKey) -> int | None:
        """The lowest row still in group ``key``, or None (the group is gone)."""
        group = self.groups.get(key)
        keys = self.keys
        while group and keys[group[0]] != key:
            heappop(group)
        if not group:
            self.groups.pop(key, None)
            return None
        return group[0]

    def best(self, lost_cost: float) -> tuple[int, float] | None:
        """(row, score) of the best candidate, ties to the lowest row; ``lost_cost`` is ``c``."""
        best_score, best_row = -math.inf, -1
        kept = self.kept
        while kept:
            score = -kept[0]
            row = self._first_row((NOT_LOST, score, 0.0))
            if row is None:
                heappop(kept)
                continue
            best_score, best_row = score, row
            break
        lost = self.lost
        seen: list[tuple[float, float]] = []
        while lost:
            delta, extra = -lost[0][0], -lost[0][1]
            base = rounded(delta - lost_cost)
            if base < best_score:
                break  # extra <= 0: this group and every later one score below the best
            top = heappop(lost)
            row = self._first_row((LOST, delta, extra))
            if row is None:
                continue
            seen.append(top)
            score = base + extra * 1e-7
            if score > best_score or (score == best_score and row < best_row):
                best_score, best_row = score, row
        for top in seen:
            heappush(lost, top)
        return None if best_row < 0 else (best_row, best_score)
