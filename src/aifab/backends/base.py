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
    # Where other nodes reach this one (a gang's torch.distributed master listens here).
    address: str = "127.0.0.1"


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
    # What the task asked for besides GPUs (engines that allocate them themselves: Slurm).
    cpu_milli: int = 0
    memory_mib: int = 0
    # For a gang: the node of every task, by task index, so that an engine that reserves a gang
    # as a whole (Ray's placement groups) can do so when the first of its tasks launches.
    gang_nodes: tuple[str, ...] = ()
    # GPUs per task of the gang, by task index (whole devices; fractions count as one).
    gang_gpus: tuple[int, ...] = ()


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
    # The GPU indices the engine really gave the task, when the engine picks them (Slurm):
    # the control plane writes them back into its records.
    devices: tuple[int, ...] | None = None


@dataclass(frozen=True, slots=True)
class Capabilities:
    gangs_across_nodes: bool = False
    fractional_gpus: bool = True
    preemption: bool = True
    log_streaming: bool = True
    # The engine, not aifab, picks which GPU indices of the chosen node a task gets (Slurm's
    # GRES); aifab still picks the node and the count.
    engine_assigns_devices: bool = False


class Backend(Protocol):
    name: str

    @property
    def capabilities(self) -> Capabilities: ...

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


class EngineUnavailable(BackendError):
    """The engine cannot be reached right now (controller down, connection refused). Transient:
    the control plane keeps its state, reports it, and tries again on its next pass."""
