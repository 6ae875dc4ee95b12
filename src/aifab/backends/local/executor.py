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
from aifab.backends.local.processes import (
    CREATE_TIME_TOLERANCE_S,
    Task,
    group_alive,
    same_start,
    signal_group,
    start_ticks,
    wrapper_alive,
)

WRAPPER_MODULE = "aifab.backends.local.wrapper"
HANDLE_VERSION = 1
_SAFE_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")  # ids become directory names
_REMEMBERED_RETURNCODES = 4096
_WRAPPER_HANDLED = {signal.SIGTERM, signal.SIGINT}
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

    def returncode(self, task: Task) -> int | None:
        with self._lock:
            for (pid, create_time), returncode in self._returncodes.items():
                if pid == task.pid and same_start(create_time, task.create_time):
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
        self._deadlines: dict[Path, tuple[Task, float]] = {}  # by stop file
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
        task = Task.of(handle)
        _CHILDREN.reap()
        recorded = _read_exit(task.exit_path)
        if recorded is not None:
            return recorded
        if wrapper_alive(task):
            return TaskStatus(TaskState.RUNNING)
        return _settle_unrecorded_end(task)

    # -- stop -------------------------------------------------------------------------------

    def stop(self, handle: Handle, grace_seconds: float) -> None:
        task = Task.of(handle)
        if task.exit_path.exists():
            return  # it ended, and its wrapper already swept the group
        deadline = _record_stop(task, handle, grace_seconds)
        with self._lock:
            self._deadlines[task.stop_path] = (task, deadline)
        # The stop file is written first: it tells the wrapper the command got this signal
        # from the kernel, so the wrapper does not relay a second copy.
        signal_group(task, signal.SIGTERM if grace_seconds > 0 else signal.SIGKILL)

    def kill_overdue(self) -> None:
        self._load_deadlines_once()
        _CHILDREN.reap()
        now = time.time()
        with self._lock:
            pending = list(self._deadlines.items())
        for stop_path, (task, deadline) in pending:
            if not group_alive(task):
                with self._lock:
                    self._deadlines.pop(stop_path, None)
            elif now >= deadline and signal_group(task, signal.SIGKILL):
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
        task = Task.of(handle)
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
        "start_ticks": start_ticks(proc.pid),
        "started_at": time.time(),
        "spec_path": str(files.spec),
        "exit_path": str(files.exit),
        "stop_path": str(files.stop),
        "log_path": str(log_path),
    }


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


def _settle_unrecorded_end(task: Task) -> TaskStatus:
    """The wrapper is gone. Either it wrote its record after our first look, or it was killed
    by a signal it cannot catch before it could write one (see the module docstring)."""
    _CHILDREN.reap()  # it may have ended since status() last reaped
    recorded = _read_exit(task.exit_path)
    if recorded is not None:
        return recorded
    signal_group(task, signal.SIGKILL)  # the wrapper's last duty: leave nothing unsupervised
    returncode = _CHILDREN.returncode(task)
    if returncode is not None:
        record = exit_record(returncode)
    elif not task.spec_path.exists() or psutil.boot_time() > task.create_time + CREATE_TIME_TOLERANCE_S:
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


def _record_stop(task: Task, handle: Handle, grace_seconds: float) -> float:
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


def _mark_killed(task: Task, when: float) -> None:
    record = _read_json(task.stop_path) or {}
    with contextlib.suppress(OSError):
        write_json_atomic(task.stop_path, {**record, "killed_at": record.get("killed_at") or when})


def _load_stop(stop_path: Path) -> tuple[Task, float] | None:
    """A persisted deadline still worth enforcing (None for tasks whose end is recorded)."""
    try:
        record = _read_json(stop_path)
        if record is None:
            return None
        task = Task.of(record["handle"])
        if task.exit_path.exists():
            return None
        return task, float(record["deadline"])
    except (BackendError, KeyError, TypeError, ValueError):
        return None  # a damaged record must not stop the reconcile loop
