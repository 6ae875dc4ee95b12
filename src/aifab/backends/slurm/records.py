"""The files a Slurm task leaves under the backend's ``state_dir``, and the handle that names
them. Every node must see ``state_dir`` (and the log folder) at the same path: the supervisor
writes its start and exit records there. Files of one task::

    runs/<workload>/<attempt>/task-<i>.spec.json    what to run (mode 0600: env may hold secrets)
    runs/<workload>/<attempt>/task-<i>.sbatch       the batch script (the supervisor)
    runs/<workload>/<attempt>/task-<i>.lock         held while a launch is under way
    runs/<workload>/<attempt>/task-<i>.handle.json  the handle launch() returned
    runs/<workload>/<attempt>/task-<i>.start.json   written by the supervisor: node, GPU indices
    runs/<workload>/<attempt>/task-<i>.exit.json    written by the supervisor (or inferred here)
    runs/<workload>/<attempt>/task-<i>.stop.json    a stop request and its SIGKILL deadline
    logs/<workload>/<attempt>/task-<i>.log          stdout + stderr (unless the request names one)
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aifab.backends.base import BackendError, Handle, LaunchRequest, TaskState, TaskStatus
from aifab.backends.slurm.jobscript import write_json_atomic

HANDLE_VERSION = 1
_SAFE_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")  # ids become directory and job names
HANDLE_KEYS = ("job_id", "start_path", "exit_path", "stop_path", "log_path", "script_path")


# -- requests and handles ----------------------------------------------------------------------


def job_name(req: LaunchRequest) -> str:
    return f"aifab-{req.workload_id}-{req.attempt}-{req.task_index}"


def describe(req: LaunchRequest) -> str:
    return f"task {req.task_index} of {req.workload_id} (attempt {req.attempt})"


def check_request(req: LaunchRequest) -> None:
    if not _SAFE_ID.fullmatch(req.workload_id):
        raise BackendError(f"workload id {req.workload_id!r} cannot name a directory")
    if req.attempt < 0 or req.task_index < 0:
        raise BackendError(f"{describe(req)}: attempt and task index must be >= 0")
    if not req.command:
        raise BackendError(f"{describe(req)} has an empty command")
    if not _SAFE_ID.fullmatch(req.node):
        raise BackendError(f"{describe(req)}: {req.node!r} is not a Slurm node name")
    if not Path(req.workdir).is_dir():
        raise BackendError(f"{describe(req)}: working directory not found: {req.workdir}")
    if 0 < req.gpu_milli < 1000 and req.devices:
        raise BackendError(f"{describe(req)}: Slurm gives whole GPUs, not {req.gpu_milli / 1000:g} of one")


def new_handle(req: LaunchRequest, job_id: str, files: TaskFiles, log_path: Path) -> Handle:
    return {
        "version": HANDLE_VERSION,
        "backend": "slurm",
        "job_id": job_id,
        "job_name": job_name(req),
        "node": req.node,
        "command": list(req.command),
        "submitted_at": time.time(),
        "script_path": str(files.script),
        "spec_path": str(files.spec),
        "start_path": str(files.start),
        "exit_path": str(files.exit),
        "stop_path": str(files.stop),
        "ack_path": str(files.ack),
        "log_path": str(log_path),
    }


@dataclass(frozen=True, slots=True)
class TaskFiles:
    spec: Path
    script: Path
    lock: Path
    handle: Path
    start: Path
    exit: Path
    stop: Path
    ack: Path  # the control plane's acknowledgement of the end (see jobscript.Supervisor.await_ack)
    default_log: Path

    @classmethod
    def of(cls, root: Path, req: LaunchRequest) -> TaskFiles:
        run_dir = root / "runs" / req.workload_id / str(req.attempt)
        stem = f"task-{req.task_index}"
        return cls(
            spec=run_dir / f"{stem}.spec.json",
            script=run_dir / f"{stem}.sbatch",
            lock=run_dir / f"{stem}.lock",
            handle=run_dir / f"{stem}.handle.json",
            start=run_dir / f"{stem}.start.json",
            exit=run_dir / f"{stem}.exit.json",
            stop=run_dir / f"{stem}.stop.json",
            ack=run_dir / f"{stem}.ack",
            default_log=root / "logs" / req.workload_id / str(req.attempt) / f"{stem}.log",
        )


@dataclass(frozen=True, slots=True)
class Task:
    """The parts of a handle this backend relies on."""

    job_id: str
    start_path: Path
    exit_path: Path
    stop_path: Path
    log_path: Path
    script_path: Path

    @classmethod
    def of(cls, handle: Handle) -> Task:
        missing = [k for k in HANDLE_KEYS if k not in handle]
        if missing:
            raise BackendError(f"not a Slurm-backend handle: it lacks {', '.join(missing)}")
        job_id = str(handle["job_id"])
        if not job_id.isdigit():
            raise BackendError(f"malformed Slurm-backend handle: job id {job_id!r}")
        return cls(
            job_id=job_id,
            start_path=Path(handle["start_path"]),
            exit_path=Path(handle["exit_path"]),
            stop_path=Path(handle["stop_path"]),
            log_path=Path(handle["log_path"]),
            script_path=Path(handle["script_path"]),
        )


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise BackendError(f"unreadable task record {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise BackendError(f"unreadable task record {path}: not a JSON object")
    return data


def read_record(path: Path, job_id: str) -> dict[str, Any] | None:
    """A start or exit record of this very job (one left by another job is ignored)."""
    record = read_json(path)
    if record is None or str(record.get("job_id", job_id)) != job_id:
        return None
    return record


def devices_of(start: dict[str, Any] | None) -> tuple[int, ...] | None:
    if start is None or not isinstance(start.get("devices"), list):
        return None
    return tuple(int(d) for d in start["devices"])


def exited(record: dict[str, Any], start: dict[str, Any] | None) -> TaskStatus:
    """The status an end record stands for (a record of a job lost with its node: UNKNOWN)."""
    if record.get("lost"):
        return TaskStatus(TaskState.UNKNOWN, devices=devices_of(start))
    return TaskStatus(
        TaskState.EXITED,
        exit_code=record.get("exit_code"),
        signal=record.get("signal"),
        finished_at=record.get("finished_at"),
        devices=devices_of(start),
    )


def persist_inferred(task: Task, record: dict[str, Any]) -> dict[str, Any]:
    """Record an end worked out here unless a real record appeared meanwhile (link() never
    replaces a file), so every later reader, in any process, gets the same answer."""
    with contextlib.suppress(OSError):  # a folder gone or read-only: answer without recording
        write_json_atomic(task.exit_path, {**record, "job_id": task.job_id, "inferred": True}, replace=False)
    return read_record(task.exit_path, task.job_id) or record


def record_stop(task: Task, handle: Handle, grace_seconds: float) -> float:
    """Persist the SIGKILL deadline (a restarted control plane still enforces it); a repeated
    stop never extends an earlier one."""
    now = time.time()
    deadline = now + max(grace_seconds, 0.0)
    previous = read_json(task.stop_path)
    if previous is not None:
        deadline = min(deadline, float(previous["deadline"]))
    record = {**(previous or {}), "handle": dict(handle), "deadline": deadline}
    record.setdefault("requested_at", now)
    record.setdefault("killed_at", None)
    task.stop_path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(task.stop_path, record)
    return deadline


def mark_stop(task: Task, **fields: float) -> None:
    """Note what was done about a stop (``killed_at``, ``cancelled_at``); earlier notes stay."""
    record = read_json(task.stop_path) or {}
    record.update({k: v for k, v in fields.items() if record.get(k) is None})
    with contextlib.suppress(OSError):
        write_json_atomic(task.stop_path, record)


def load_stop(stop_path: Path) -> tuple[Task, float] | None:
    """A persisted deadline still worth enforcing (None once the task's end is recorded)."""
    try:
        record = read_json(stop_path)
        if record is None:
            return None
        task = Task.of(record["handle"])
        if task.exit_path.exists():
            return None
        return task, float(record["deadline"])
    except (BackendError, KeyError, TypeError, ValueError):
        return None  # a damaged record must not stop the reconcile loop


@contextlib.contextmanager
def held(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (released by the kernel if this process dies)."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
