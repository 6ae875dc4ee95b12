"""Reading what Slurm 22.05 prints: GRES strings, node and job records of ``sinfo --json`` /
``squeue --json``, ``scontrol show job -d``. Pure functions: no Slurm needed to test them."""

from __future__ import annotations

import re
import signal
from collections.abc import Iterable, Mapping
from typing import Any

from aifab.backends.base import GpuInfo, NodeInfo

DEFAULT_GPU_MODEL = "slurm-gpu"
PARTITION_LABEL = "slurm.partition"
FEATURE_LABEL_PREFIX = "slurm.feature/"
BACKEND_LABEL = "aifab.io/backend"
SIGNAL_EXIT_BASE = 128  # the supervisor exits 128 + N when its command died of signal N

# Base states (``state``) a node can run new work in; anything else (down, unknown, future,
# error) leaves it out of the inventory, and so do these flags.
USABLE_NODE_STATES = frozenset({"idle", "mixed", "allocated", "completing"})
UNUSABLE_NODE_FLAGS = frozenset(
    {
        "NOT_RESPONDING",
        "DRAIN",
        "DRAINING",
        "DRAINED",
        "FAIL",
        "FAILING",
        "MAINTENANCE",
        "POWER_DOWN",
        "POWERED_DOWN",
        "POWERING_DOWN",
        "POWERING_UP",
        "REBOOT_ISSUED",
        "DYNAMIC_FUTURE",
    }
)

# Job states in which the job holds, or will hold, its allocation.
LIVE_JOB_STATES = frozenset(
    {
        "PENDING",
        "CONFIGURING",
        "RUNNING",
        "COMPLETING",
        "SUSPENDED",
        "REQUEUED",
        "REQUEUE_HOLD",
        "REQUEUE_FED",
        "RESIZING",
        "SIGNALING",
        "STAGE_OUT",
        "RESV_DEL_HOLD",
        "SPECIAL_EXIT",
        "STOPPED",
    }
)
# Why Slurm holds a pending job for a node that cannot run it (drained, down, not responding).
NODE_UNAVAILABLE_REASONS = frozenset({"ReqNodeNotAvail", "NodeDown"})
# The job was lost with its node (or taken by Slurm for other work): not the task's doing, so
# the task reads as lost (UNKNOWN) and the control plane runs it again without counting a failure.
LOST_JOB_STATES = frozenset({"NODE_FAIL", "BOOT_FAIL", "PREEMPTED"})
# Ended without the batch script ending by itself: what the task died of, as a signal.
_SIGNAL_OF_END_STATE = {
    "CANCELLED": int(signal.SIGTERM),
    "TIMEOUT": int(signal.SIGKILL),
    "OUT_OF_MEMORY": int(signal.SIGKILL),
    "DEADLINE": int(signal.SIGKILL),
}

_GRES_ITEM = re.compile(r"^(?P<name>[^:(]+)(?::(?P<type>[^:(]+))?(?::(?P<count>\d+))?(?:\(.*\))?$")
_INDICES = re.compile(r"IDX:(?P<list>[0-9,\-]+)")


def split_gres(gres: str) -> list[str]:
    """``"gpu:a100:2(S:0-1),mps:100"`` → ``["gpu:a100:2(S:0-1)", "mps:100"]`` (commas inside
    parentheses belong to the item)."""
    items: list[str] = []
    current: list[str] = []
    depth = 0
    for ch in gres:
        if ch == "," and depth == 0:
            items.append("".join(current))
            current = []
            continue
        depth += {"(": 1, ")": -1}.get(ch, 0)
        current.append(ch)
    items.append("".join(current))
    return [item.strip() for item in items if item.strip() and item.strip() != "(null)"]


def gpu_counts(gres: str) -> list[tuple[str | None, int]]:
    """(type, count) of each ``gpu`` item of a node's GRES: ``"gpu:a100:2,gpu:4"`` →
    ``[("a100", 2), (None, 4)]``. A lone number after ``gpu:`` is a count, not a type."""
    out: list[tuple[str | None, int]] = []
    for item in split_gres(gres):
        m = _GRES_ITEM.match(item)
        if m is None or m["name"] != "gpu":
            continue
        gpu_type, count = m["type"], m["count"]
        if count is None and gpu_type is not None and gpu_type.isdigit():
            gpu_type, count = None, gpu_type
        out.append((gpu_type, int(count) if count is not None else 1))
    return out


def expand_indices(text: str) -> tuple[int, ...]:
    """``"0,2-3"`` → ``(0, 2, 3)``."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        low, _, high = part.partition("-")
        out.extend(range(int(low), int(high or low) + 1))
    return tuple(out)


def gpu_indices(gres_details: Iterable[str]) -> tuple[int, ...]:
    """The GPU indices of a job's GRES detail (``squeue --json`` ``gres_detail`` items or the
    ``GRES=`` field of ``scontrol show job -d``): ``"gpu:4(IDX:0-3)"``, ``"gpu(IDX:0-1)"``,
    ``"gpu:a100:2(IDX:0,2)"``. Other GRES (``mps``, ``shard``) are not GPUs of the task."""
    out: list[int] = []
    for detail in gres_details:
        for item in split_gres(detail):
            if not (item == "gpu" or item.startswith(("gpu:", "gpu("))):
                continue
            m = _INDICES.search(item)
            if m is not None:
                out.extend(expand_indices(m["list"]))
    return tuple(sorted(set(out)))


def scontrol_gres_details(text: str) -> list[str]:
    """The per-node ``GRES=...`` values of ``scontrol show job -d`` (not ``JOB_GRES=``)."""
    return re.findall(r"(?<![A-Z_])GRES=(\S+)", text)


def node_is_usable(raw: Mapping[str, Any]) -> bool:
    state = str(raw.get("state", "")).lower()
    flags = {str(f).upper() for f in raw.get("state_flags", ())}
    return state in USABLE_NODE_STATES and not flags & UNUSABLE_NODE_FLAGS


def node_info(
    raw: Mapping[str, Any],
    *,
    pool: str,
    partition: str | None,
    gpu_memory_mib: int,
    virtual_gpus: bool = False,
) -> NodeInfo | None:
    """The :class:`NodeInfo` of one ``sinfo --json`` node record; None when the node is not in
    ``partition`` or cannot run work now (down, drained, not responding)."""
    partitions = [str(p) for p in raw.get("partitions", ())]
    if partition is not None and partition not in partitions:
        return None
    if not node_is_usable(raw):
        return None
    gpus: list[GpuInfo] = []
    for gpu_type, count in gpu_counts(str(raw.get("gres") or "")):
        for _ in range(count):
            gpus.append(GpuInfo(len(gpus), gpu_type or DEFAULT_GPU_MODEL, gpu_memory_mib))
    features = [f for f in str(raw.get("active_features") or raw.get("features") or "").split(",") if f]
    address = str(raw.get("address") or raw.get("hostname") or raw["name"])
    labels = {
        BACKEND_LABEL: "slurm",
        PARTITION_LABEL: partition if partition is not None else ",".join(partitions),
        **{f"{FEATURE_LABEL_PREFIX}{f}": "true" for f in features},
    }
    return NodeInfo(
        name=str(raw["name"]),
        cpu_milli=int(raw.get("cpus") or 0) * 1000,
        memory_mib=int(raw.get("real_memory") or 0),
        gpus=tuple(gpus),
        pool=pool,
        labels=labels,
        virtual_gpus=virtual_gpus,
        address=address,
    )


def decode_wait_status(raw: int) -> tuple[int | None, int | None]:
    """(exit code, signal) of a wait(2) status as Slurm keeps it (``exit_code`` of squeue)."""
    sig = raw & 0x7F
    if sig:
        return None, sig
    return (raw >> 8) & 0xFF, None


def end_from_job(job: Mapping[str, Any]) -> tuple[int | None, int | None]:
    """How an ended job's task ended, from Slurm's record alone (the supervisor wrote nothing:
    it never ran, or it was killed)."""
    state = str(job.get("job_state", "")).upper()
    code, sig = decode_wait_status(int(job.get("exit_code") or 0))
    if sig is not None:
        return None, sig
    if state in _SIGNAL_OF_END_STATE:
        return None, _SIGNAL_OF_END_STATE[state]
    if code is not None and code > SIGNAL_EXIT_BASE and state == "FAILED":
        return None, code - SIGNAL_EXIT_BASE
    return code, None


def wants_gpus(job: dict[str, Any]) -> bool:
    """Whether the job asked for GPUs (its GRES request, as squeue reports it)."""
    requested = " ".join(str(job.get(k) or "") for k in ("tres_per_node", "tres_per_job", "tres_per_task"))
    return "gpu" in requested
