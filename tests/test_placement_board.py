"""aifab's boards (placement.board): the order they keep, by hand; that they choose exactly as
scoring every node is checked in test_placement_policies."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from aifab.scheduler.placement.board import Board, final_score, rounded


@given(
    st.floats(min_value=-1e9, max_value=1e9, allow_nan=False)
    | st.integers(-(10**9), 10**9).map(lambda k: k / 2e6)
)
def test_rounded_is_numpys_round_to_six_decimals(x: float) -> None:
    # k / 2e6 hits the halves, where rounding to even matters.
    assert rounded(x) == float(np.round(np.float64(x), 6))
    assert rounded(x) == float(np.round(np.asarray([x]), 6)[0])


def test_a_node_that_keeps_the_shape_beats_one_that_loses_it_by_the_cost() -> None:
    board = Board(3)
    board.set_row(0, 10.0, -0.5, True)  # would lose the shape: 10 - c
    board.set_row(2, 9.0, -0.5, False)
    assert board.best(2.0) == (2, final_score(9.0, -0.5))
    assert board.best(0.5) == (0, final_score(9.5, -0.5))


def test_equal_scores_go_to_the_lowest_row_across_kept_and_lost() -> None:
    board = Board(4)
    board.set_row(3, 10.0, -0.5, False)
    board.set_row(1, 12.5, -0.5, True)  # 12.5 - 2.5 rounds to the same 10.0
    assert board.best(2.5) == (1, final_score(10.0, -0.5))
    board.set_row(0, 10.0, -0.5, False)  # the same group as row 3, a lower row
    assert board.best(2.5) == (0, final_score(10.0, -0.5))


def test_lost_groups_that_round_alike_are_all_weighed() -> None:
    board = Board(6)
    # Both round to 5.0: the one with the smaller change but the better extra wins.
    board.set_row(0, 5.0000004, -0.9, True)
    board.set_row(2, 5.0000001, -0.1, True)
    assert board.best(0.0) == (2, 5.0 - 0.1e-7)
    # Two groups of equal score (extra 0): the lower row wins although its change is smaller.
    board.set_row(5, 7.0000004, 0.0, True)
    board.set_row(4, 7.0000001, 0.0, True)
    assert board.best(0.0) == (4, 7.0)
    # The heap is left as it was: asking again gives the same answer.
    assert board.best(0.0) == (4, 7.0)


def test_rows_move_between_groups_and_leave() -> None:
    board = Board(3)
    board.set_row(0, 3.0, -0.2, False)
    board.set_row(1, 3.0, -0.2, False)
    assert board.best(0.0) == (0, final_score(3.0, -0.2))
    board.set_row(0, 1.0, -0.2, False)  # row 0 changed: its old group's entry is stale
    assert board.best(0.0) == (1, final_score(3.0, -0.2))
    board.drop_row(1)  # no longer a candidate (no longer fits)
    assert board.best(0.0) == (0, final_score(1.0, -0.2))
    board.drop_row(0)
    assert board.best(0.0) is None
    board.set_row(1, 3.0, -0.2, False)  # back into a group that had emptied
    assert board.best(0.0) == (1, final_score(3.0, -0.2))
    assert board.usable


def test_values_the_order_cannot_take_make_the_board_unusable() -> None:
    for delta, extra in ((math.nan, -0.1), (1.0, 0.5), (1.0, math.nan)):
        board = Board(1)
        board.set_row(0, delta, extra, False)
        assert not board.usable
