"""Loader for Alibaba's cluster-trace-gpu-v2023 ("openb") node and pod lists.

Files: ``openb_node_list_gpu_node.csv`` (sn, cpu_milli, memory_mib, gpu, model) and
``openb_pod_list_*.csv`` (name, cpu_milli, memory_mib, num_gpu, gpu_milli[, gpu_spec, ...]).
Every bad value raises :class:`~aifab.core.errors.TraceError` naming file, line and column, so a
corrupted trace fails loudly instead of silently skewing a benchmark.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from aifab.core.errors import TraceError
from aifab.core.nodes import GpuDevice, Node
from aifab.core.resources import GPU_MILLI
from aifab.core.workloads import GpuRequest, TaskRequest
from aifab.scheduler.placement.view import PodShape

NODE_COLUMNS = ("sn", "cpu_milli", "memory_mib", "gpu", "model")
POD_COLUMNS = ("name", "cpu_milli", "memory_mib", "num_gpu", "gpu_milli")
MAX_GPUS_PER_POD = 8
MAX_GPUS_PER_NODE = 8

# GPU memory per model (MiB), from the artifact's open-gpu-share const.go; only used when the
# nodes are turned into core Node objects (the packing experiment works in milli-GPU).
GPU_MEMORY_MIB = {
    "P4": 7611,
    "2080": 11019,
    "1080": 11178,
    "M40": 11448,
    "T4": 15109,
    "V100M16": 16160,
    "P100": 16280,
    "A10": 22731,
    "3090": 24268,
    "V100M32": 32510,
    "A100": 81251,
    "G1": 10000,
    "G2": 20000,
    "G3": 30000,
}


@dataclass(frozen=True, slots=True)
class TraceNode:
    name: str
    cpu_milli: int
    memory_mib: int
    gpus: int
    model: str

    def to_node(self) -> Node:
        mem = GPU_MEMORY_MIB.get(self.model, 16384)
        devices = tuple(GpuDevice(i, self.model, mem) for i in range(self.gpus))
        return Node(self.name, self.cpu_milli, self.memory_mib, devices)


@dataclass(frozen=True, slots=True)
class TracePod:
    name: str
    cpu_milli: int
    memory_mib: int
    num_gpu: int
    gpu_milli: int  # per GPU; 1000 for whole GPUs, 0 for CPU-only
    gpu_spec: frozenset[str]  # accepted models; empty = any

    @property
    def total_gpu_milli(self) -> int:
        return self.num_gpu * self.gpu_milli

    def shape(self) -> PodShape:
        return PodShape(self.cpu_milli, self.memory_mib, self.num_gpu, self.gpu_milli, self.gpu_spec)

    def to_task(self) -> TaskRequest:
        if self.num_gpu == 0:
            gpu = GpuRequest.none()
        elif self.gpu_milli < GPU_MILLI:
            gpu = GpuRequest.fraction(self.gpu_milli / GPU_MILLI)
        else:
            gpu = GpuRequest.whole(self.num_gpu)
        return TaskRequest(gpu=gpu, cpu_milli=self.cpu_milli, memory_mib=self.memory_mib)


def _rows(path: Path, required: tuple[str, ...]) -> Iterator[tuple[int, dict[str, str]]]:
    name = path.name
    try:
        handle = path.open(newline="", encoding="utf-8")
    except OSError as exc:
        raise TraceError(name, 0, None, f"cannot open: {exc.strerror}") from exc
    with handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            raise TraceError(name, 1, None, "empty file, expected a header row")
        header = [h.strip() for h in header]
        missing = [c for c in required if c not in header]
        if missing:
            raise TraceError(name, 1, None, f"missing column(s) {', '.join(missing)}; header is {header}")
        for lineno, row in enumerate(reader, start=2):
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != len(header):
                raise TraceError(name, lineno, None, f"expected {len(header)} fields, got {len(row)}")
            yield lineno, dict(zip(header, row, strict=True))


def _int(name: str, line: int, row: dict[str, str], col: str, lo: int, hi: int | None) -> int:
    raw = row[col].strip()
    bound = f"{lo}-{hi}" if hi is not None else f">= {lo}"
    try:
        value = int(raw)
    except ValueError:
        raise TraceError(name, line, col, f"expected an integer {bound}, got {raw!r}") from None
    if value < lo or (hi is not None and value > hi):
        raise TraceError(name, line, col, f"expected an integer {bound}, got {raw!r}")
    return value


def load_nodes(path: str | Path) -> list[TraceNode]:
    """GPU nodes of the trace, in file order."""
    p = Path(path)
    out: list[TraceNode] = []
    seen: set[str] = set()
    for line, row in _rows(p, NODE_COLUMNS):
        name = row["sn"].strip()
        if not name:
            raise TraceError(p.name, line, "sn", "empty node name")
        if name in seen:
            raise TraceError(p.name, line, "sn", f"duplicate node name {name!r}")
        seen.add(name)
        gpus = _int(p.name, line, row, "gpu", 0, MAX_GPUS_PER_NODE)
        model = row["model"].strip()
        if gpus and not model:
            raise TraceError(p.name, line, "model", "a GPU node needs a model")
        out.append(
            TraceNode(
                name=name,
                cpu_milli=_int(p.name, line, row, "cpu_milli", 0, None),
                memory_mib=_int(p.name, line, row, "memory_mib", 0, None),
                gpus=gpus,
                model=model,
            )
        )
    return out


def load_pods(path: str | Path) -> list[TracePod]:
    """Pods of the trace, in file order (which is name order in the published files)."""
    p = Path(path)
    out: list[TracePod] = []

    def check(line: int, row: dict[str, str], col: str, lo: int, hi: int | None) -> int:
        return _int(p.name, line, row, col, lo, hi)

    for line, row in _rows(p, POD_COLUMNS):
        name = row["name"].strip()
        if not name:
            raise TraceError(p.name, line, "name", "empty pod name")
        num_gpu = check(line, row, "num_gpu", 0, MAX_GPUS_PER_POD)
        milli = check(line, row, "gpu_milli", 0, GPU_MILLI)
        if num_gpu == 0 and milli != 0:
            raise TraceError(p.name, line, "gpu_milli", f"must be 0 when num_gpu is 0, got {milli}")
        if num_gpu > 0 and milli == 0:
            raise TraceError(p.name, line, "gpu_milli", "must be 1-1000 when num_gpu > 0, got 0")
        if num_gpu > 1 and milli != GPU_MILLI:
            raise TraceError(
                p.name, line, "gpu_milli", f"a pod with {num_gpu} GPUs must take 1000, got {milli}"
            )
        spec = row.get("gpu_spec", "") or ""
        models = frozenset(m.strip() for m in spec.split("|") if m.strip())
        out.append(
            TracePod(
                name=name,
                cpu_milli=check(line, row, "cpu_milli", 0, None),
                memory_mib=check(line, row, "memory_mib", 0, None),
                num_gpu=num_gpu,
                gpu_milli=milli,
                gpu_spec=models if num_gpu else frozenset(),
            )
        )
    return out
