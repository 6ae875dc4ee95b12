"""Does a task fit on a node, and on which devices: the one place that knows GPU sharing rules.

Whole-GPU tasks take fully free devices. Fractional tasks (a share of compute, with the same
share of device memory) and memory tasks (GPU memory, with the matching compute share) take
one device; several of them may share a device as long as neither milli-GPU nor memory goes
beyond the device (NodeState refuses that anyway: a refusal there would be a bug here).
"""

from __future__ import annotations

from aifab.core.nodes import NodeState
from aifab.core.resources import GPU_MILLI, gpu_milli_for_memory, memory_for_gpu_milli
from aifab.core.workloads import GpuRequestKind
from aifab.scheduler.session import Place, TaskSpec

WHOLE = GpuRequestKind.WHOLE
FRACTION = GpuRequestKind.FRACTION
MEMORY = GpuRequestKind.MEMORY


def shared_need(ns: NodeState, d: int, s: TaskSpec) -> tuple[int, int]:
    """(milli, memory) a shared task takes on device ``d`` of this node."""
    dev_mem = ns.node.gpus[d].memory_mib
    if s.kind is FRACTION:
        return s.milli, memory_for_gpu_milli(s.milli, dev_mem)
    return gpu_milli_for_memory(s.gmem, dev_mem), s.gmem


def pick_shared_device(ns: NodeState, s: TaskSpec, pack: bool) -> int | None:
    """Best-fit device (least free compute that still fits) when packing, most free otherwise."""
    best = -1
    best_free = 0
    fmem = ns.gpu_free_memory
    gpus = ns.node.gpus
    fraction = s.kind is FRACTION
    milli = s.milli
    for d, free in enumerate(ns.gpu_free_milli):
        if fraction:
            # memory_for_gpu_milli inlined: this loop is the hot path for fractional tasks
            if free < milli or fmem[d] < milli * gpus[d].memory_mib // GPU_MILLI:
                continue
        elif fmem[d] < s.gmem or free < gpu_milli_for_memory(s.gmem, gpus[d].memory_mib):
            continue
        if best < 0 or (free < best_free if pack else free > best_free):
            best, best_free = d, free
    return None if best < 0 else best


def fits(ns: NodeState, free_whole: int, s: TaskSpec) -> bool:
    if ns.free_cpu < s.cpu or ns.free_memory < s.memory:
        return False
    if s.kind is WHOLE:
        return free_whole >= s.count
    if s.kind is FRACTION:
        if max(ns.gpu_free_milli, default=0) < s.milli:
            return False  # cheap C-level rejection before the per-device check
        return pick_shared_device(ns, s, True) is not None
    if s.kind is MEMORY:
        return pick_shared_device(ns, s, True) is not None
    return True


def choose_place(ns: NodeState, s: TaskSpec, pack: bool = True) -> Place | None:
    """Devices for the task on this node, or None if it does not fit."""
    if ns.free_cpu < s.cpu or ns.free_memory < s.memory:
        return None
    ni = ns.index
    if s.kind is WHOLE:
        devs = []
        gpus = ns.node.gpus
        for d, m in enumerate(ns.gpu_free_milli):
            if m == GPU_MILLI and ns.gpu_free_memory[d] == gpus[d].memory_mib:
                devs.append(d)
                if len(devs) == s.count:
                    mem = min(gpus[x].memory_mib for x in devs)
                    return (ni, tuple(devs), GPU_MILLI, mem, s.cpu, s.memory)
        return None
    if s.kind is FRACTION or s.kind is MEMORY:
        dev = pick_shared_device(ns, s, pack)
        if dev is None:
            return None
        milli, mem = shared_need(ns, dev, s)
        return (ni, (dev,), milli, mem, s.cpu, s.memory)
    return (ni, (), 0, 0, s.cpu, s.memory)


def capacity_in_tasks(ns: NodeState, free_whole: int, s: TaskSpec) -> int:
    """Roughly how many tasks like ``s`` the node could still take (for ranking domains)."""
    by_cpu = ns.free_cpu // s.cpu if s.cpu else 1 << 30
    by_mem = ns.free_memory // s.memory if s.memory else 1 << 30
    if s.kind is WHOLE:
        by_gpu = free_whole // s.count
    elif s.kind is FRACTION:
        by_gpu = sum(m // s.milli for m in ns.gpu_free_milli if m > 0)
    elif s.kind is MEMORY:
        by_gpu = sum(m // s.gmem for m in ns.gpu_free_memory if m > 0)
    else:
        by_gpu = 1 << 30
    return max(0, min(by_cpu, by_mem, by_gpu))
