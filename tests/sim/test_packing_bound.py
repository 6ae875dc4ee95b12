"""The offline packing floor (aifab.sim.packing_bound): hand-checked packings, the relaxation
below the integer optimum, and the integer optimum equal to an exhaustive search."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aifab.sim.packing_bound import PackingBoundError, offline_floor


def test_hand_checked_packing_of_big_and_small_pods() -> None:
    # 810+160 leaves 30, the other 810 leaves 190, 470+470 leaves 60: 280. The 160 cannot join
    # the 470s (1,100), and 470+160 would leave 370 there plus 530 next to the other 470.
    placed = {810: 2, 160: 1, 470: 2}
    exact = offline_floor(placed, integer=True)
    assert exact.idle_milli == pytest.approx(280)
    assert exact.gpus == pytest.approx(3)
    assert exact.packed == pytest.approx({160: 1, 470: 2, 810: 2})
    assert offline_floor(placed).idle_milli <= 280 + 1e-6


def test_pods_above_half_a_gpu_each_take_one() -> None:
    floor = offline_floor({600: 3})
    assert floor.idle_milli == pytest.approx(1200)
    assert floor.gpus == pytest.approx(3)


def test_pods_that_fill_gpus_exactly_leave_nothing() -> None:
    assert offline_floor({500: 4, 250: 4}).idle_milli == pytest.approx(0)


def test_available_pods_may_fill_what_the_placed_ones_leave() -> None:
    assert offline_floor({810: 1}, {810: 1, 190: 1}).idle_milli == pytest.approx(0)
    assert offline_floor({810: 1}, {810: 1, 190: 0}).idle_milli == pytest.approx(190)
    # More 810s may be placed, but each would add its own 190: the optimum adds none.
    assert offline_floor({810: 1}, {810: 5}, integer=True).packed == pytest.approx({810: 1})


def test_sizes_on_a_coarse_grid_use_their_common_divisor() -> None:
    # gcd(1000, 300, 450) = 50: 450+450 leaves 100, 300+300+300 leaves 100.
    assert offline_floor({450: 2, 300: 3}, integer=True).idle_milli == pytest.approx(200)


def test_nothing_to_pack() -> None:
    floor = offline_floor({})
    assert (floor.idle_milli, floor.gpus, floor.packed) == (0.0, 0.0, {})


@pytest.mark.parametrize(
    ("placed", "available", "message"),
    [
        ({0: 1}, None, "placed: pod size 0 milli-GPU is outside 1..1000"),
        ({1200: 1}, None, "placed: pod size 1200 milli-GPU is outside 1..1000"),
        ({500: -1}, None, "placed: -1 pods of size 500"),
        ({500: 3}, {500: 2}, "placed: 3 pods of size 500, but only 2 available"),
        ({500: 1}, {500: 1, 2000: 1}, "available: pod size 2000 milli-GPU is outside 1..1000"),
        ({500.5: 1}, None, "placed: sizes and counts are whole numbers, got 500.5: 1"),
        ({500: 1.0}, None, "placed: sizes and counts are whole numbers, got 500: 1.0"),
    ],
)
def test_bad_input_names_what_is_wrong(
    placed: dict[int, int], available: dict[int, int] | None, message: str
) -> None:
    with pytest.raises(PackingBoundError, match=message.replace("+", r"\+")):
        offline_floor(placed, available)


def _fewest_gpus(items: list[int], capacity: int) -> int:
    """Exhaustive: every item into every open GPU or a new one."""
    best = len(items)

    def go(i: int, loads: list[int]) -> None:
        nonlocal best
        if len(loads) >= best:
            return
        if i == len(items):
            best = len(loads)
            return
        for k in range(len(loads)):
            if loads[k] + items[i] <= capacity:
                loads[k] += items[i]
                go(i + 1, loads)
                loads[k] -= items[i]
        loads.append(items[i])
        go(i + 1, loads)
        loads.pop()

    go(0, [])
    return best


SIZES = st.sampled_from([110, 160, 230, 320, 370, 460, 470, 550, 650, 810])


@settings(max_examples=40, deadline=None)
@given(st.lists(SIZES, min_size=1, max_size=7))
def test_integer_optimum_is_the_exhaustive_one_and_bounds_the_relaxation(items: list[int]) -> None:
    placed = dict(Counter(items))
    exact = offline_floor(placed, integer=True)
    fewest = _fewest_gpus(sorted(items, reverse=True), 1000)
    assert exact.idle_milli == pytest.approx(fewest * 1000 - sum(items))
    assert offline_floor(placed).idle_milli <= exact.idle_milli + 1e-6
