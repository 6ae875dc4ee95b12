"""The Microsoft Philly trace (Sep-Oct 2017), as summarised per job by the Pollux artifact.

Columns: ``timestamp`` (submit, ``YYYY-MM-DD HH:MM:SS``), ``duration`` (seconds),
``num_gpus``, ``gpu_time`` (GPU-seconds), ``cluster`` (the virtual cluster: a project).

Gang mapping: a job with at most 8 GPUs is one task of ``num_gpus`` whole GPUs (it must fit on
one 8-GPU node). A bigger job is a gang of ``k = ceil(n / 8)`` tasks whose sizes differ by at
most one GPU (n = 12 -> 6 + 6, 16 -> 8 + 8, 24 -> 8 + 8 + 8, 20 -> 7 + 7 + 6); all tasks start
together or not at all.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from aifab.core.errors import TraceError
from aifab.core.workloads import GpuRequest, TaskRequest, Workload

COLUMNS = ("timestamp", "duration", "num_gpus", "gpu_time", "cluster")
EXPECTED_ROWS = 52_849  # the Sep-Oct 2017 file
GPUS_PER_NODE = 8


@dataclass(frozen=True, slots=True)
class PhillyJob:
    line: int
    submit: float  # seconds since the first submit of the file
    duration: float
    num_gpus: int
    gpu_time: float
    cluster: str


def gang_sizes(num_gpus: int, per_node: int = GPUS_PER_NODE) -> list[int]:
    """GPUs of each task of the gang (see the module docstring)."""
    k = max(1, math.ceil(num_gpus / per_node))
    base, extra = divmod(num_gpus, k)
    return [base + 1 if i < extra else base for i in range(k)]


def read_philly(path: str | Path, *, limit: int | None = None) -> list[PhillyJob]:
    """Parse the CSV; every bad row raises TraceError naming the file, line and column.

    ``limit`` keeps the first N jobs by submit time (the whole file is still validated).
    """
    path = Path(path)
    name = path.name
    try:
        fh = path.open(newline="", encoding="utf-8")
    except OSError as exc:
        raise TraceError(str(path), 0, None, f"cannot read: {exc.strerror or exc}") from exc
    rows: list[tuple[int, datetime, float, int, float, str]] = []
    with fh:
        reader = csv.reader(fh)
        try:
            header = next(reader, None)
        except (csv.Error, UnicodeDecodeError) as exc:
            raise TraceError(name, 1, None, f"unreadable CSV: {exc}") from exc
        if header is None:
            raise TraceError(name, 1, None, "empty file: expected a header " + ",".join(COLUMNS))
        header = [h.strip() for h in header]
        missing = [c for c in COLUMNS if c not in header]
        if missing:
            raise TraceError(
                name, 1, None, f"header lacks column(s) {', '.join(missing)}; got {','.join(header)}"
            )
        pos = {c: header.index(c) for c in COLUMNS}
        line = 1
        try:
            for row in reader:
                line = reader.line_num
                if not row or all(not c.strip() for c in row):
                    continue
                if len(row) != len(header):
                    raise TraceError(name, line, None, f"expected {len(header)} fields, got {len(row)}")
                rows.append(_parse_row(name, line, row, pos))
        except (csv.Error, UnicodeDecodeError) as exc:
            raise TraceError(name, line + 1, None, f"unreadable CSV: {exc}") from exc
    if not rows:
        raise TraceError(name, 2, None, "no jobs in the file")
    t0 = min(r[1] for r in rows)
    jobs = [PhillyJob(r[0], (r[1] - t0).total_seconds(), r[2], r[3], r[4], r[5]) for r in rows]
    jobs.sort(key=lambda j: (j.submit, j.line))
    if limit is not None:
        # The first N by submit time (the file is not in time order), re-based to 0.
        jobs = jobs[:limit]
        first = jobs[0].submit
        jobs = [
            PhillyJob(j.line, j.submit - first, j.duration, j.num_gpus, j.gpu_time, j.cluster) for j in jobs
        ]
    return jobs


def _parse_row(
    name: str, line: int, row: list[str], pos: dict[str, int]
) -> tuple[int, datetime, float, int, float, str]:
    raw = row[pos["timestamp"]].strip()
    try:
        ts = datetime.fromisoformat(raw)
    except ValueError:
        raise TraceError(name, line, "timestamp", f"expected YYYY-MM-DD HH:MM:SS, got {raw!r}") from None
    raw = row[pos["duration"]].strip()
    try:
        duration = float(raw)
    except ValueError:
        duration = math.nan
    if not math.isfinite(duration) or duration <= 0:
        raise TraceError(name, line, "duration", f"expected a positive number of seconds, got {raw!r}")
    raw = row[pos["num_gpus"]].strip()
    try:
        gpus = int(raw)
    except ValueError:
        gpus = 0
    if gpus <= 0:
        raise TraceError(name, line, "num_gpus", f"expected a positive integer, got {raw!r}")
    raw = row[pos["gpu_time"]].strip()
    try:
        gpu_time = float(raw)
    except ValueError:
        gpu_time = math.nan
    if not math.isfinite(gpu_time) or gpu_time < 0:
        raise TraceError(name, line, "gpu_time", f"expected a non-negative number, got {raw!r}")
    cluster = row[pos["cluster"]].strip()
    if not cluster:
        raise TraceError(name, line, "cluster", "expected a virtual cluster name, got ''")
    return line, ts, duration, gpus, gpu_time, cluster


def to_workload(
    job: PhillyJob, *, index: int, checkpoint_interval: float | None, per_node: int = GPUS_PER_NODE
) -> Workload:
    """A pending, preemptible ``train`` workload for one Philly job (oracle duration set)."""
    tasks = tuple(TaskRequest(gpu=GpuRequest.whole(n)) for n in gang_sizes(job.num_gpus, per_node))
    return Workload(
        id=f"j{index:05d}",
        queue=job.cluster,
        tasks=tasks,
        priority_class="train",
        priority=50,
        preemptible=True,
        submit_time=job.submit,
        checkpoint_interval=checkpoint_interval,
        expected_duration=job.duration,
    )
