"""The one small interface every execution backend implements (local processes now; Ray and
Slurm later). aifab decides where each task runs; a backend only executes that decision.

A backend must survive the control plane's restart: ``launch`` returns a JSON-able handle that
the control plane stores *before* relying on it, and ``status`` / ``stop`` / ``logs`` work from
that handle alone in a new process (``adopt`` is ``status`` over many handles).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

Handle = dict[str, Any]


@dataclass(frozen=True, slots=True)
class GpuInfo:
    index: int
    model: str
    memory_mib: int


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """A node as the backend sees it (becomes a core ``Node`` in the control plane)."""

    name: str
    cpu_milli: int
    memory_mib: int
    gpus: tuple[GpuInfo, ...] = ()
    pool: str = "default"
    labels: Mapping[str, str] = field(default_factory=dict)
    topology: Mapping[str, str] = field(default_factory=dict)
    virtual_gpus: bool = False  # declared, not detected (no CUDA device behind them)


@dataclass(frozen=True, slots=True)
class LaunchRequest:
    """One task of one attempt, placed by the scheduler.

    ``env`` already holds the aifab contract (AIFAB_JOB_ID, AIFAB_ATTEMPT, AIFAB_CHECKPOINT_DIR,
    CUDA_VISIBLE_DEVICES, torch.distributed variables, ...): the backend adds nothing but may
    need to translate device indices for its own engine."""

    workload_id: str
    attempt: int
    task_index: int
    node: str
    command: Sequence[str]
    workdir: str
    env: Mapping[str, str]
    devices: tuple[int, ...] = ()
    gpu_milli: int = 0
    log_path: str = ""


class TaskState(StrEnum):
    RUNNING = "running"
    EXITED = "exited"  # exit_code says how
    UNKNOWN = "unknown"  # the backend has no trace of it (lost)


@dataclass(frozen=True, slots=True)
class TaskStatus:
    state: TaskState
    exit_code: int | None = None
    signal: int | None = None  # the signal that ended it, if any
    finished_at: float | None = None


@dataclass(frozen=True, slots=True)
class Capabilities:
    gangs_across_nodes: bool = False
    fractional_gpus: bool = True
    preemption: bool = True
    log_streaming: bool = True


class Backend(Protocol):
    name: str
    capabilities: Capabilities

    def inventory(self) -> list[NodeInfo]:
        """The nodes this backend executes on, right now."""
        ...

    def launch(self, req: LaunchRequest) -> Handle:
        """Start the task; returns a handle to store. Raises BackendError if it cannot start."""
        ...

    def status(self, handle: Handle) -> TaskStatus:
        """What became of the task (works across control-plane restarts)."""
        ...

    def stop(self, handle: Handle, grace_seconds: float) -> None:
        """Ask the task to stop (SIGTERM to its process group); it is killed (SIGKILL) once
        ``grace_seconds`` have passed. Returns at once; ``status`` tells when it is gone."""
        ...

    def kill_overdue(self) -> None:
        """SIGKILL tasks whose grace period is over (called from the reconcile loop)."""
        ...

    def read_log(self, handle: Handle, offset: int = 0, limit: int = 1 << 20) -> tuple[bytes, int]:
        """(bytes from ``offset``, next offset) of the task's combined stdout/stderr."""
        ...


class BackendError(Exception):
    """The backend could not do what was asked (the control plane records it as an event)."""
