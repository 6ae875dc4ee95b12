from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aifab.core.errors import ValidationError
from aifab.core.resources import (
    GPU_MILLI,
    Resources,
    dominant_share,
    format_gpus,
    gpu_milli_for_memory,
    memory_for_gpu_milli,
)
from aifab.core.workloads import GpuRequest, GpuRequestKind


def test_human_units_convert_exactly() -> None:
    r = Resources.of(gpus=2.5, cpus=1.25, memory_mib=512)
    assert (r.gpu, r.cpu, r.memory) == (2500, 1250, 512)
    assert format_gpus(r.gpu) == "2.5"
    assert format_gpus(3000) == "3"


def test_fractions_add_up_without_float_drift() -> None:
    # Ten tenths of a GPU are exactly one GPU in milli units (0.1 * 10 != 1.0 in floats).
    total = Resources()
    for _ in range(10):
        total = total + Resources.of(gpus=0.1)
    assert total.gpu == GPU_MILLI


def test_dominant_share_picks_the_largest_resource() -> None:
    total = Resources(gpu=8000, cpu=64000, memory=1000)
    used = Resources(gpu=2000, cpu=32000, memory=100)
    assert dominant_share(used, total) == pytest.approx(0.5)


def test_memory_requests_become_a_share_of_the_device() -> None:
    assert gpu_milli_for_memory(20480, 81920) == 250
    assert gpu_milli_for_memory(1, 81920) == 1  # rounded up, never zero
    assert memory_for_gpu_milli(500, 81920) == 40960


@pytest.mark.parametrize(
    ("value", "kind", "nominal"),
    [(0, GpuRequestKind.NONE, 0), (0.5, GpuRequestKind.FRACTION, 500), (4, GpuRequestKind.WHOLE, 4000)],
)
def test_gpu_request_parse(value: float, kind: GpuRequestKind, nominal: int) -> None:
    req = GpuRequest.parse(value)
    assert req.kind is kind
    assert req.milli_nominal() == nominal


@pytest.mark.parametrize("value", [-1, 1.5, 2.25])
def test_gpu_request_rejects_unsharable_shapes(value: float) -> None:
    with pytest.raises(ValidationError, match="gpus"):
        GpuRequest.parse(value)


@given(st.integers(0, 10**6), st.integers(0, 10**6), st.integers(0, 10**6))
def test_add_then_subtract_is_identity(g: int, c: int, m: int) -> None:
    a = Resources(g, c, m)
    b = Resources(m, g, c)
    assert (a + b) - b == a
