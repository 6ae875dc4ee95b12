"""Timing helpers shared by the benchmarks: medians, and a same-run calibration baseline.

These machines are noisy, so every benchmark also times a fixed pure-Python reference workload in
the same run and reports its figures as ratios to it as well as in seconds.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any


def median_seconds(fn: Callable[[], Any], runs: int) -> tuple[float, list[float]]:
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples), samples


def calibration_workload() -> int:
    """A fixed mix of what the scheduler does a lot of: dict lookups, tuple sorts, small objects."""
    items = [((i * 7919) % 10007, i % 13, f"w{i}") for i in range(60000)]
    items.sort()
    index: dict[str, int] = {}
    for a, b, name in items:
        index[name] = a + b
    return sum(index.values())


def calibration_seconds(runs: int = 7) -> float:
    return median_seconds(calibration_workload, runs)[0]


def machine() -> dict[str, Any]:
    return {
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }
