"""The least GPU share any placement of a given set of shared pods must leave idle.

Shared pods (a fraction of one GPU each) are packed into GPUs of ``capacity`` milli-GPU; a GPU
holding shared pods is idle for whatever they leave of it. Whole-GPU pods never leave a device
partly idle, so the idle milli-GPUs of shared devices are the part of the packing experiment's
unallocated share that placement decides (section 5a of issue 2).

:func:`offline_floor` answers: for pods that must all be placed (``placed``, size: count), and
optionally more of each size up to ``available``, what is the least idle milli-GPU over every
way to put them on GPUs? It is Gilmore and Gomory's cutting-stock problem in the arc-flow form
of Valério de Carvalho (1999): a GPU is a path from 0 to ``capacity`` milli-GPU whose steps are
pods, or idle steps of the sizes' common divisor; the paths are a flow, the pods' counts bound
the steps of their size, and the cost is the idle steps. Its linear relaxation (solved with
HiGHS) is a lower bound on every real packing, so on the waste of any placement of the same
pods, whatever the order they come in, and however nodes' CPU and memory restrict them (both are
ignored here, which can only lower the bound). ``integer=True`` solves the integer program
instead: the exact optimum of this relaxed problem, slower.

GPUs are not counted: a packing with fewer shared GPUs leaves more whole ones, and the bound
takes those as filled by whole-GPU pods (the packing experiment's stream has many of them).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from aifab.core.resources import GPU_MILLI


class PackingBoundError(ValueError):
    """The pods cannot be packed as asked (a size that fits no GPU, more placed than
    available), or the solver failed."""


@dataclass(frozen=True, slots=True)
class Floor:
    idle_milli: float  # least idle milli-GPU on the GPUs holding shared pods
    gpus: float  # GPUs holding shared pods in that optimum (fractional for the relaxation)
    packed: dict[int, float]  # pods of each size packed in that optimum
    integer: bool  # solved as an integer program (exact), not its relaxation (a lower bound)


def offline_floor(
    placed: Mapping[int, int],
    available: Mapping[int, int] | None = None,
    *,
    capacity: int = GPU_MILLI,
    integer: bool = False,
) -> Floor:
    """The least idle milli-GPU over every packing of ``placed`` (size in milli-GPU: count),
    which may add up to ``available[size]`` pods of a size (default: exactly ``placed``)."""
    wanted, allowed = _checked(placed, available, capacity)
    sizes = sorted(s for s in allowed if allowed[s] > 0)
    if not sizes:
        return Floor(0.0, 0.0, {}, integer)
    step = math.gcd(capacity, *sizes)
    arcs = _arcs(sizes, capacity, step)
    value, columns = _solve(arcs, sizes, wanted, allowed, capacity, step, integer)
    packed = {s: 0.0 for s in sizes}
    for (_, _, size), x in zip(arcs, columns, strict=False):
        if size:
            packed[size] += x
    return Floor(idle_milli=value, gpus=columns[len(arcs)], packed=packed, integer=integer)


def _checked(
    placed: Mapping[int, int], available: Mapping[int, int] | None, capacity: int
) -> tuple[dict[int, int], dict[int, int]]:
    if capacity <= 0:
        raise PackingBoundError(f"capacity must be positive, got {capacity}")
    allowed = dict(placed if available is None else available)
    for name, counts in (("placed", placed), ("available", allowed)):
        for size, count in counts.items():
            if not isinstance(size, int) or not isinstance(count, int):
                raise PackingBoundError(
                    f"{name}: sizes and counts are whole numbers, got {size!r}: {count!r}"
                )
            if not 0 < size <= capacity:
                raise PackingBoundError(f"{name}: pod size {size} milli-GPU is outside 1..{capacity}")
            if count < 0:
                raise PackingBoundError(f"{name}: {count} pods of size {size} (a count cannot be negative)")
    for size, count in placed.items():
        if count > allowed.get(size, 0):
            raise PackingBoundError(
                f"placed: {count} pods of size {size}, but only {allowed.get(size, 0)} available"
            )
    return dict(placed), allowed


def _arcs(sizes: list[int], capacity: int, step: int) -> list[tuple[int, int, int]]:
    """(from, to, pod size or 0 for an idle step) between the multiples of ``step``."""
    arcs: list[tuple[int, int, int]] = []
    for at in range(0, capacity, step):
        arcs.extend((at, at + s, s) for s in sizes if at + s <= capacity)
        arcs.append((at, at + step, 0))
    return arcs


def _solve(
    arcs: list[tuple[int, int, int]],
    sizes: list[int],
    wanted: dict[int, int],
    allowed: dict[int, int],
    capacity: int,
    step: int,
    integer: bool,
) -> tuple[float, list[float]]:
    import highspy  # here, not at the top: only this bound needs the solver

    h = highspy.Highs()  # type: ignore[no-untyped-call]
    h.setOptionValue("output_flag", False)
    n = len(arcs)  # one column per arc, then one for the number of GPUs (the flow's value)
    cost = np.array([float(b - a) if s == 0 else 0.0 for a, b, s in arcs] + [0.0])
    h.addVars(n + 1, np.zeros(n + 1), np.full(n + 1, highspy.kHighsInf))
    everything = np.arange(n + 1, dtype=np.int32)
    h.changeColsCost(n + 1, everything, cost)
    if integer:
        h.changeColsIntegrality(n + 1, everything, np.array([highspy.HighsVarType.kInteger] * (n + 1)))
    ins: dict[int, list[int]] = {}
    outs: dict[int, list[int]] = {}
    for k, (a, b, _) in enumerate(arcs):
        outs.setdefault(a, []).append(k)
        ins.setdefault(b, []).append(k)
    for at in range(0, capacity + 1, step):  # flow in - flow out = 0, the GPUs leave 0, reach capacity
        cols = ins.get(at, []) + outs.get(at, [])
        vals = [1.0] * len(ins.get(at, [])) + [-1.0] * len(outs.get(at, []))
        if at in (0, capacity):
            cols.append(n)
            vals.append(1.0 if at == 0 else -1.0)
        h.addRow(0.0, 0.0, len(cols), np.array(cols, dtype=np.int32), np.array(vals))
    for size in sizes:
        cols = [k for k, (_, _, s) in enumerate(arcs) if s == size]
        low, high = float(wanted.get(size, 0)), float(allowed[size])
        h.addRow(low, high, len(cols), np.array(cols, dtype=np.int32), np.ones(len(cols)))
    h.run()
    status = h.getModelStatus()
    if status != highspy.HighsModelStatus.kOptimal:
        raise PackingBoundError(f"the solver did not find the optimum: {h.modelStatusToString(status)}")
    return float(h.getInfo().objective_function_value), list(h.getSolution().col_value)
