"""The local backend: runs each task as a process tree on this machine.

Every task runs under a small supervisor (``wrapper.py``) that leads its own session and process
group, so the task outlives the control plane (even ``kill -9``), and that records the task's end
in a file, so a *new* control-plane process can still learn it. Files of one task::

    root/runs/<workload>/<attempt>/task-<i>.spec.json    what to run (mode 0600: env may hold secrets)
    root/runs/<workload>/<attempt>/task-<i>.handle.json  the handle launch() returned
    root/runs/<workload>/<attempt>/task-<i>.exit         {"exit_code", "signal", "finished_at"}
    root/runs/<workload>/<attempt>/task-<i>.stop         a stop request and its SIGKILL deadline
    root/logs/<workload>/<attempt>/task-<i>.log          stdout + stderr (unless the request names one)

Status semantics (``status``):

* the exit file exists → EXITED with its exit code / signal;
* the wrapper (pid *and* creation time *and* command line match) is alive → RUNNING;
* the wrapper is gone without a record: it can only have died of an uncatchable signal, in
  practice SIGKILL (the OOM killer, an operator, or ``kill_overdue``). The backend finishes the
  wrapper's last duty (SIGKILLs whatever is left of the group), then reports EXITED with
  ``exit_code=None, signal=9`` — or the wrapper's real status when this process started it and
  reaped it — and writes that to the exit file so every later reader sees the same answer;
* UNKNOWN only when nothing is left to judge by: the machine rebooted since the task started,
  or the task's run directory is gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from aifab.backends.base import (
    BackendError,
    Capabilities,
    Handle,
    LaunchRequest,
    NodeInfo,
    TaskState,
    TaskStatus,
)
from aifab.backends.ends import ENDS_FILE, journal_mark

WRAPPER_MODULE = "aifab.backends.local.wrapper"
HANDLE_VERSION = 1
# Creation times are computed from the boot time, which the kernel re-derives from the wall
# clock: two processes can see it differ by up to a second. Identity also checks the wrapper's
# command line (it names the task's own spec file), so the tolerance costs no safety.
_CREATE_TIME_TOLERANCE_S = 1.0
_SAFE_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")  # ids become directory names
_REMEMBERED_RETURNCODES = 4096
_WRAPPER_HANDLED = {signal.SIGTERM, signal.SIGINT}
_HANDLE_KEYS = ("pid", "pgid", "create_time", "spec_path", "exit_path", "stop_path", "log_path")
_WORLD_KEYS = {
    "master_addr": "MASTER_ADDR",
    "master_port": "MASTER_PORT",
    "world_size": "WORLD_SIZE",
    "rank": "RANK",
    "local_rank": "LOCAL_RANK",
    "local_world_size": "LOCAL_WORLD_SIZE",
}


def task_env(
    workload_id: str,
    attempt: int,
    checkpoint_dir: str,
    devices: Sequence[int],
    gpu_milli: int,
    gpu_memory_mib: int | None,
    world: Mapping[str, str | int] | None,
) -> dict[str, str]:
    """The environment contract a task sees (built by the control plane, passed as ``req.env``)."""
    env = {
        "AIFAB_JOB_ID": workload_id,
        "AIFAB_ATTEMPT": str(attempt),
        "AIFAB_CHECKPOINT_DIR": checkpoint_dir,
        "CUDA_VISIBLE_DEVICES": ",".join(str(d) for d in devices),
        # CUDA numbers GPUs fastest-first by default, NVML (our inventory) by PCI bus: without
        # this, index 0 in CUDA_VISIBLE_DEVICES could be another task's GPU.
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
    }
    if 0 < gpu_milli < 1000:
        env["AIFAB_GPU_FRACTION"] = f"{gpu_milli / 1000:g}"
    if gpu_memory_mib is not None:
        env["AIFAB_GPU_MEMORY_MIB"] = str(gpu_memory_mib)
    if world is not None:
        missing = sorted(set(_WORLD_KEYS) - set(world))
        if missing:
            raise BackendError(f"distributed world description lacks {', '.join(missing)}")
        env.update({var: str(world[key]) for key, var in _WORLD_KEYS.items()})
    return env


@dataclass(frozen=True, slots=True)
class _TaskFiles:
    spec: Path
    handle: Path
    exit: Path
    stop: Path
    default_log: Path

    @classmethod
    def of(cls, root: Path, req: LaunchRequest) -> _TaskFiles:
        run_dir = root / "runs" / req.workload_id / str(req.attempt)
        stem = f"task-{req.task_index}"
        return cls(
            spec=run_dir / f"{stem}.spec.json",
            handle=run_dir / f"{stem}.handle.json",
            exit=run_dir / f"{stem}.exit",
            stop=run_dir / f"{stem}.stop",
            default_log=root / "logs" / req.workload_id / str(req.attempt) / f"{stem}.log",
        )


@dataclass(frozen=True, slots=True)
class _Task:
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
    def of(cls, handle: Handle) -> _Task:
        missing = [k for k in _HANDLE_KEYS if k not in handle]
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


class _Children:
    """Wrappers this Python process started. They must be waited for or they stay zombies
    (which also look alive to ``kill(pid, 0)``). Shared by every LocalBackend in the process;
    wrappers of an earlier control-plane process were re-parented to init, which reaps them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[int, tuple[float, subprocess.Popen[bytes]]] = {}
        self._returncodes: dict[tuple[int, float], int] = {}

    def add(self, proc: subprocess.Popen[bytes], create_time: float) -> None:
        with self._lock:
            self._running[proc.pid] = (create_time, proc)

    def reap(self) -> None:
        with self._lock:
            for pid, (create_time, proc) in list(self._running.items()):
                returncode = proc.poll()
                if returncode is not None:
                    del self._running[pid]
                    self._returncodes[(pid, create_time)] = returncode
            # Only needed until status() has settled the end into an exit file: keep the newest.
            while len(self._returncodes) > _REMEMBERED_RETURNCODES:
                del self._returncodes[next(iter(self._returncodes))]

    def returncode(self, task: _Task) -> int | None:
        with self._lock:
            for (pid, create_time), returncode in self._returncodes.items():
                if pid == task.pid and _same_start(create_time, task.create_time):
                    return returncode
        return None


_CHILDREN = _Children()


class LocalBackend:
    """Runs tasks as supervised process trees on this machine (see the module docstring)."""

    name = "local"
    capabilities = Capabilities(
        gangs_across_nodes=False, fractional_gpus=True, preemption=True, log_streaming=True
    )

    def __init__(self, root: Path, node: NodeInfo) -> None:
        self.root = Path(root)
        self.node = node
        self._lock = threading.Lock()
        self._deadlines: dict[Path, tuple[_Task, float]] = {}  # by stop file
        self._deadlines_loaded = False

    def inventory(self) -> list[NodeInfo]:
        return [self.node]

    def exit_mark(self) -> int:
        """Changes whenever one of this backend's tasks ends (see :mod:`aifab.backends.ends`)."""
        return journal_mark(self.root / ENDS_FILE)

    # -- launch -----------------------------------------------------------------------------

    def launch(self, req: LaunchRequest) -> Handle:
        """Start the task. Idempotent per (workload, attempt, task index): launching the same
        task again returns the first handle, so a control plane that crashed between launch and
        storing the handle can simply launch again."""
        self._check_request(req)
        _CHILDREN.reap()
        files = _TaskFiles.of(self.root, req)
        previous = _previous_handle(files, req)
        if previous is not None:
            return previous
        env = _child_env(req)
        _check_command(req.command, req.workdir, env)
        log_path = Path(req.log_path) if req.log_path else files.default_log
        _claim(files, req, env, self.root / ENDS_FILE)
        try:
            proc = _spawn_wrapper(files.spec, log_path)
        except OSError as exc:
            files.spec.unlink(missing_ok=True)  # let a retry start afresh
            raise BackendError(f"cannot start the supervisor of {_describe(req)}: {exc}") from exc
        handle = _handle(req, proc, files, log_path)
        write_json_atomic(files.handle, handle)
        return handle

    def _check_request(self, req: LaunchRequest) -> None:
        if req.node != self.node.name:
            raise BackendError(f"{_describe(req)} is placed on node {req.node!r}, this is {self.node.name!r}")
        if not _SAFE_ID.fullmatch(req.workload_id):
            raise BackendError(f"workload id {req.workload_id!r} cannot name a directory")
        if req.attempt < 0 or req.task_index < 0:
            raise BackendError(f"{_describe(req)}: attempt and task index must be >= 0")
        if not req.command:
            raise BackendError(f"{_describe(req)} has an empty command")
        if not Path(req.workdir).is_dir():
            raise BackendError(f"{_describe(req)}: working directory not found: {req.workdir}")
        unknown = sorted(set(req.devices) - {g.index for g in self.node.gpus})
        if unknown:
            raise BackendError(f"{_describe(req)}: node {self.node.name} has no GPU {unknown}")

    # -- status -----------------------------------------------------------------------------

    def status(self, handle: Handle) -> TaskStatus:
        task = _Task.of(handle)
        _CHILDREN.reap()
        recorded = _read_exit(task.exit_path)
        if recorded is not None:
            return recorded
        if _wrapper_alive(task):
            return TaskStatus(TaskState.RUNNING)
        return _settle_unrecorded_end(task)

    # -- stop -------------------------------------------------------------------------------

    def stop(self, handle: Handle, grace_seconds: float) -> None:
        task = _Task.of(handle)
        if task.exit_path.exists():
            return  # it ended, and its wrapper already swept the group
        deadline = _record_stop(task, handle, grace_seconds)
        with self._lock:
            self._deadlines[task.stop_path] = (task, deadline)
        # The stop file is written first: it tells the wrapper the command got this signal
        # from the kernel, so the wrapper does not relay a second copy.
        _signal_group(task, signal.SIGTERM if grace_seconds > 0 else signal.SIGKILL)

    def kill_overdue(self) -> None:
        self._load_deadlines_once()
        _CHILDREN.reap()
        now = time.time()
        with self._lock:
            pending = list(self._deadlines.items())
        for stop_path, (task, deadline) in pending:
            if not _group_alive(task):
                with self._lock:
                    self._deadlines.pop(stop_path, None)
            elif now >= deadline and _signal_group(task, signal.SIGKILL):
                _mark_killed(task, now)

    def _load_deadlines_once(self) -> None:
        """A restarted control plane enforces the deadlines its predecessor set."""
        with self._lock:
            if self._deadlines_loaded:
                return
            self._deadlines_loaded = True
            for stop_path in self.root.glob("runs/*/*/task-*.stop"):
                loaded = _load_stop(stop_path)
                if loaded is not None and stop_path not in self._deadlines:
                    self._deadlines[stop_path] = loaded

    # -- logs -------------------------------------------------------------------------------

    def read_log(self, handle: Handle, offset: int = 0, limit: int = 1 << 20) -> tuple[bytes, int]:
        task = _Task.of(handle)
        if offset < 0 or limit < 0:
            raise BackendError(f"offset and limit must be >= 0, got {offset} and {limit}")
        try:
            with open(task.log_path, "rb") as f:
                f.seek(offset)
                data = f.read(limit)
        except FileNotFoundError as exc:
            raise BackendError(f"log not found: {task.log_path}") from exc
        return data, offset + len(data)


# -- launching ---------------------------------------------------------------------------------


def _describe(req: LaunchRequest) -> str:
    return f"task {req.task_index} of {req.workload_id} (attempt {req.attempt})"


def _child_env(req: LaunchRequest) -> dict[str, str]:
    """The parent's environment with the request's on top (what users of a shell expect)."""
    env = dict(os.environ)
    env.update(req.env)
    if "CUDA_VISIBLE_DEVICES" not in req.env:
        # Never let a task inherit the control plane's view of the GPUs: it would see them all.
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(d) for d in req.devices)
    return env


def _check_command(command: Sequence[str], workdir: str, env: Mapping[str, str]) -> None:
    """Fail the launch, not the task, when the program obviously cannot be found (the wrapper
    still reports exit code 127 if it disappears before the wrapper starts it)."""
    program = command[0]
    if os.sep in program:
        path = Path(workdir, program)  # relative paths resolve against the working directory
        found = path.is_file() and os.access(path, os.X_OK)
    else:
        found = shutil.which(program, path=env.get("PATH", os.defpath)) is not None
    if not found:
        raise BackendError(f"command not found: {program!r} (workdir {workdir}, PATH={env.get('PATH', '')})")


def _previous_handle(files: _TaskFiles, req: LaunchRequest) -> Handle | None:
    handle = _read_json(files.handle)
    if handle is not None:
        if handle.get("command") != list(req.command):
            raise BackendError(f"{_describe(req)} was already launched with another command")
        return handle
    if files.spec.exists():
        raise BackendError(
            f"an earlier launch of {_describe(req)} was interrupted before it recorded a handle; "
            "launch a new attempt"
        )
    return None


def _claim(files: _TaskFiles, req: LaunchRequest, env: Mapping[str, str], ends: Path) -> None:
    """Write the wrapper's spec. O_EXCL makes it a claim: two concurrent launches of one task
    cannot both start it."""
    spec = {
        "command": list(req.command),
        "workdir": req.workdir,
        "env": dict(env),
        "exit_path": str(files.exit),
        "stop_path": str(files.stop),
        "ends_path": str(ends),
    }
    files.spec.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(files.spec, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as exc:
        raise BackendError(f"{_describe(req)} is being launched concurrently") from exc
    with os.fdopen(fd, "w") as f:
        json.dump(spec, f)


def _spawn_wrapper(spec_path: Path, log_path: Path) -> subprocess.Popen[bytes]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # The child inherits this thread's signal mask: with SIGTERM/SIGINT blocked, a stop() that
    # lands while the wrapper's interpreter is still starting waits for its handler instead of
    # killing it before it can record anything. The wrapper unblocks them; our mask is restored.
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _WRAPPER_HANDLED)
    try:
        return _popen_wrapper(spec_path, log_path)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def _popen_wrapper(spec_path: Path, log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", WRAPPER_MODULE, str(spec_path)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=spec_path.parent,
            start_new_session=True,  # its own session and group: survives us, killable as one
            close_fds=True,
        )


def _handle(req: LaunchRequest, proc: subprocess.Popen[bytes], files: _TaskFiles, log_path: Path) -> Handle:
    try:
        create_time = psutil.Process(proc.pid).create_time()
    except psutil.NoSuchProcess as exc:  # impossible while unreaped, but never guess a pid's start
        raise BackendError(f"the supervisor of {_describe(req)} vanished at once") from exc
    _CHILDREN.add(proc, create_time)
    return {
        "backend": "local",
        "version": HANDLE_VERSION,
        "node": req.node,
        "workload_id": req.workload_id,
        "attempt": req.attempt,
        "task_index": req.task_index,
        "command": list(req.command),
        "pid": proc.pid,
        "pgid": proc.pid,  # start_new_session makes the wrapper its group's leader
        "create_time": create_time,
        "start_ticks": _start_ticks(proc.pid),
        "started_at": time.time(),
        "spec_path": str(files.spec),
        "exit_path": str(files.exit),
        "stop_path": str(files.stop),
        "log_path": str(log_path),
    }


# -- process identity --------------------------------------------------------------------------


def _same_start(a: float, b: float) -> bool:
    return abs(a - b) <= _CREATE_TIME_TOLERANCE_S


def _start_ticks(pid: int) -> int | None:
    """When the process started, in clock ticks since boot (``/proc/<pid>/stat``, field 22).
    Unlike psutil's wall-clock creation time (boot time + ticks), it does not move when the
    system clock is stepped: a stepped clock must never make a live wrapper look like a stranger
    (its task would be settled as killed). None where there is no such file."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
        return int(raw[raw.rindex(b")") + 2 :].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _is_our_wrapper(proc: psutil.Process, task: _Task) -> bool:
    """True if ``proc`` is this task's wrapper, not a process that was given a recycled pid.
    Raises psutil.AccessDenied when that cannot be told (another user's process)."""
    try:
        ticks = _start_ticks(proc.pid) if task.start_ticks is not None else None
        if ticks is not None:
            if ticks != task.start_ticks:
                return False
        elif not _same_start(proc.create_time(), task.create_time):
            return False
        if proc.status() == psutil.STATUS_ZOMBIE:
            return True  # its command line is gone; the creation time has to do
        return str(task.spec_path) in proc.cmdline()
    except psutil.NoSuchProcess:
        return False


def _wrapper_alive(task: _Task) -> bool:
    try:
        proc = psutil.Process(task.pid)
        return _is_our_wrapper(proc, task) and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied as exc:
        # Concluding "gone" here would record a false end for a task that may be running.
        raise BackendError(
            f"cannot inspect pid {task.pid}: permission denied (is the control plane running as "
            "another user than the one that launched the task?)"
        ) from exc


def _group_is_ours(task: _Task) -> bool:
    """Whether the process group ``task.pgid`` is still this task's (safe to signal)."""
    try:
        return _is_our_wrapper(psutil.Process(task.pgid), task)
    except psutil.AccessDenied:
        return False  # never signal what we cannot identify
    except psutil.NoSuchProcess:
        # The leader is gone. Linux does not hand out a number still in use as a group id, so
        # if members remain they are ours. (A recycled number would need the group to empty,
        # the pid to come round again, and its new leader to die before its members: ignored.)
        return True


def _group_alive(task: _Task) -> bool:
    if not _group_is_ours(task):
        return False
    for pid in group_members(task.pgid):
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            continue
    return False


def _signal_group(task: _Task, signum: int) -> bool:
    """Signal the task's whole process group if it is still the task's; True if sent."""
    if not _group_is_ours(task):
        return False
    try:
        os.killpg(task.pgid, signum)
    except (ProcessLookupError, PermissionError):
        return False
    return True


# -- exit records (written by the wrapper, read here) ------------------------------------------


def write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    """Readers see the old file or the whole new one, never a torn write."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())  # the record must survive a host crash right after the task ends
    os.replace(tmp, path)


def exit_record(returncode: int) -> dict[str, Any]:
    """The status file's content for a ``Popen.returncode`` (negative: killed by that signal)."""
    return {
        "exit_code": returncode if returncode >= 0 else None,
        "signal": -returncode if returncode < 0 else None,
        "finished_at": time.time(),
    }


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


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise BackendError(f"unreadable task record {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise BackendError(f"unreadable task record {path}: not a JSON object")
    return data


def _read_exit(path: Path) -> TaskStatus | None:
    record = _read_json(path)
    if record is None:
        return None
    return TaskStatus(
        TaskState.EXITED,
        exit_code=record.get("exit_code"),
        signal=record.get("signal"),
        finished_at=record.get("finished_at"),
    )


def _settle_unrecorded_end(task: _Task) -> TaskStatus:
    """The wrapper is gone. Either it wrote its record after our first look, or it was killed
    by a signal it cannot catch before it could write one (see the module docstring)."""
    _CHILDREN.reap()  # it may have ended since status() last reaped
    recorded = _read_exit(task.exit_path)
    if recorded is not None:
        return recorded
    _signal_group(task, signal.SIGKILL)  # the wrapper's last duty: leave nothing unsupervised
    returncode = _CHILDREN.returncode(task)
    if returncode is not None:
        record = exit_record(returncode)
    elif not task.spec_path.exists() or psutil.boot_time() > task.create_time + _CREATE_TIME_TOLERANCE_S:
        return TaskStatus(TaskState.UNKNOWN)
    else:
        record = {"exit_code": None, "signal": int(signal.SIGKILL), "finished_at": time.time()}
    return _persist_inferred(task.exit_path, {**record, "inferred": True})


def _persist_inferred(path: Path, record: dict[str, Any]) -> TaskStatus:
    """Record an inferred end unless a real record appeared meanwhile (link() never overwrites),
    so every later status() call, in any process, gives the same answer."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.inferred")
    try:
        tmp.write_text(json.dumps(record))
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    except OSError:
        pass  # the run directory is gone or read-only: answer without recording
    finally:
        tmp.unlink(missing_ok=True)
    recorded = _read_exit(path)
    if recorded is not None:
        return recorded
    return TaskStatus(TaskState.EXITED, record["exit_code"], record["signal"], record["finished_at"])


# -- stop records ------------------------------------------------------------------------------


def _record_stop(task: _Task, handle: Handle, grace_seconds: float) -> float:
    """Persist the SIGKILL deadline; a repeated stop never extends an earlier one."""
    now = time.time()
    deadline = now + max(grace_seconds, 0.0)
    previous = _read_json(task.stop_path)
    if previous is not None:
        deadline = min(deadline, float(previous["deadline"]))
    record = {"handle": dict(handle), "requested_at": now, "deadline": deadline, "killed_at": None}
    task.stop_path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(task.stop_path, record)
    return deadline


def _mark_killed(task: _Task, when: float) -> None:
    record = _read_json(task.stop_path) or {}
    with contextlib.suppress(OSError):
        write_json_atomic(task.stop_path, {**record, "killed_at": record.get("killed_at") or when})


def _load_stop(stop_path: Path) -> tuple[_Task, float] | None:
    """A persisted deadline still worth enforcing (None for tasks whose end is recorded)."""
    try:
        record = _read_json(stop_path)
        if record is None:
            return None
        task = _Task.of(record["handle"])
        if task.exit_path.exists():
            return None
        return task, float(record["deadline"])
    except (BackendError, KeyError, TypeError, ValueError):
        return None  # a damaged record must not stop the reconcile loop
