"""Who a local task's processes are: the identity its handle records, and the checks that a
pid or a process group is still the task's before anything reads or signals it (the kernel
recycles pids)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import psutil

from aifab.backends.base import BackendError, Handle

# Creation times are computed from the boot time, which the kernel re-derives from the wall
# clock: two processes can see it differ by up to a second. Identity also checks the wrapper's
# command line (it names the task's own spec file), so the tolerance costs no safety.
CREATE_TIME_TOLERANCE_S = 1.0
HANDLE_KEYS = ("pid", "pgid", "create_time", "spec_path", "exit_path", "stop_path", "log_path")


@dataclass(frozen=True, slots=True)
class Task:
    """The parts of a handle this backend relies on."""

    pid: int
    pgid: int
    create_time: float
    spec_path: Path
    exit_path: Path
    stop_path: Path
    log_path: Path
    start_ticks: int | None = None  # handles written before it was recorded have none

    @classmethod
    def of(cls, handle: Handle) -> Task:
        missing = [k for k in HANDLE_KEYS if k not in handle]
        if missing:
            raise BackendError(f"not a local-backend handle: it lacks {', '.join(missing)}")
        try:
            return cls(
                pid=int(handle["pid"]),
                pgid=int(handle["pgid"]),
                create_time=float(handle["create_time"]),
                spec_path=Path(handle["spec_path"]),
                exit_path=Path(handle["exit_path"]),
                stop_path=Path(handle["stop_path"]),
                log_path=Path(handle["log_path"]),
                start_ticks=int(handle["start_ticks"]) if handle.get("start_ticks") is not None else None,
            )
        except (TypeError, ValueError) as exc:
            raise BackendError(f"malformed local-backend handle: {exc}") from exc


def same_start(a: float, b: float) -> bool:
    return abs(a - b) <= CREATE_TIME_TOLERANCE_S


def start_ticks(pid: int) -> int | None:
    """When the process started, in clock ticks since boot (``/proc/<pid>/stat``, field 22).
    Unlike psutil's wall-clock creation time (boot time + ticks), it does not move when the
    system clock is stepped: a stepped clock must never make a live wrapper look like a stranger
    (its task would be settled as killed). None where there is no such file."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
        return int(raw[raw.rindex(b")") + 2 :].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def is_our_wrapper(proc: psutil.Process, task: Task) -> bool:
    """True if ``proc`` is this task's wrapper, not a process that was given a recycled pid.
    Raises psutil.AccessDenied when that cannot be told (another user's process)."""
    try:
        ticks = start_ticks(proc.pid) if task.start_ticks is not None else None
        if ticks is not None:
            if ticks != task.start_ticks:
                return False
        elif not same_start(proc.create_time(), task.create_time):
            return False
        if proc.status() == psutil.STATUS_ZOMBIE:
            return True  # its command line is gone; the creation time has to do
        return str(task.spec_path) in proc.cmdline()
    except psutil.NoSuchProcess:
        return False


def wrapper_alive(task: Task) -> bool:
    try:
        proc = psutil.Process(task.pid)
        return is_our_wrapper(proc, task) and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied as exc:
        # Concluding "gone" here would record a false end for a task that may be running.
        raise BackendError(
            f"cannot inspect pid {task.pid}: permission denied (is the control plane running as "
            "another user than the one that launched the task?)"
        ) from exc


def group_is_ours(task: Task) -> bool:
    """Whether the process group ``task.pgid`` is still this task's (safe to signal)."""
    try:
        return is_our_wrapper(psutil.Process(task.pgid), task)
    except psutil.AccessDenied:
        return False  # never signal what we cannot identify
    except psutil.NoSuchProcess:
        # The leader is gone. Linux does not hand out a number still in use as a group id, so
        # if members remain they are ours. (A recycled number would need the group to empty,
        # the pid to come round again, and its new leader to die before its members: ignored.)
        return True


def group_alive(task: Task) -> bool:
    if not group_is_ours(task):
        return False
    for pid in group_members(task.pgid):
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            continue
    return False


def signal_group(task: Task, signum: int) -> bool:
    """Signal the task's whole process group if it is still the task's; True if sent."""
    if not group_is_ours(task):
        return False
    try:
        os.killpg(task.pgid, signum)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def group_members(pgid: int, exclude: int | None = None) -> list[int]:
    """The pids in process group ``pgid`` (zombies included)."""
    members = []
    for pid in psutil.pids():
        if pid == exclude:
            continue
        try:
            if os.getpgid(pid) == pgid:
                members.append(pid)
        except (ProcessLookupError, PermissionError):
            continue
    return members
