"""The runner: the body of the plain Ray task (not an actor) that runs one aifab task's command.

Ray places the task exactly where aifab decided (hard node affinity, or its gang's bundle) and
gives it its GPUs, on one of the node's pooled worker processes: no process starts per task. The
runner claims the task's ``start`` record (so that it runs once, however often it was submitted),
starts the command as a child process in a process group of its own, with the request's
environment and Ray's GPU ids in ``CUDA_VISIBLE_DEVICES``, and its output in the task's log file.

While the command runs, a watcher thread polls the task's records (every 0.1 s at first, then
less often, at most every second): a ``stop`` record gets SIGTERM to the group and SIGKILL once
its deadline has passed, enforced here whoever drives the cluster meanwhile; a vanished
``start`` record (``RayBackend.release`` dropped the task's records) gets SIGKILL at once. When
the command ends, the runner kills what is left of its group, records the end and returns, so
that Ray gives its GPUs back at once. A runner whose worker dies unannounced is recorded by its
node's agent (``agent.py``), which submitted the task and watches it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import ray

from aifab.backends.base import EngineUnavailable
from aifab.backends.ray import gang
from aifab.backends.ray.records import ENDS_KEY, Records, task_prefix, task_record

EXIT_CANNOT_RUN = 126  # the shell's codes, as the local backend reports them
EXIT_NOT_FOUND = 127
# How long a runner keeps trying to record an end while the GCS is away (Ray itself ends
# workers that lose the GCS for about a minute); it then hands the record to its agent.
RECORD_PATIENCE_S = 120.0
POLL_FIRST_S = 0.1  # the watcher's first polls; it slows down by POLL_GROWTH per second run
POLL_GROWTH = 0.05
POLL_MAX_S = 1.0
_PR_SET_PDEATHSIG = 1
_T = TypeVar("_T")


def run(spec: dict[str, Any]) -> dict[str, Any] | None:
    """The task's body. ``spec`` holds: namespace, record_timeout, key, launch_id, gang (its key
    or None), node (its name), agent (the submitting agent's actor id), command, workdir, env,
    log_path. Returns the end record, with ``recorded`` False if it could not be stored (the
    agent stores it then); None if this submission was not the one to run."""
    return _Runner(spec).run()


class _Runner:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.key: str = spec["key"]
        self.records = Records(spec["namespace"], float(spec["record_timeout"]))
        self.devices = [_device_id(g) for g in ray.get_gpu_ids()]
        self.lock = threading.Lock()
        self.proc: subprocess.Popen[bytes] | None = None
        self.swept = False  # the group was swept: its id may be reused, never signal it again
        self.deadline: float | None = None  # SIGKILL deadline (wall clock), once a stop is seen
        self.killed_at: float | None = None
        self.kill_sent = False
        self.released = False
        self.error: str | None = None
        self.run_id = ""
        self.ended = threading.Event()

    def run(self) -> dict[str, Any] | None:
        handle_key, stop_key = task_record(self.key, "handle"), task_record(self.key, "stop")
        seen = _patiently(lambda: self.records.get_many([handle_key, stop_key]))
        handle = seen.get(handle_key)
        if handle is None or handle.get("launch_id") != self.spec["launch_id"]:
            return None  # released before it started, or another launch's: not to be run
        self.run_id = uuid.uuid4().hex
        start = {
            "run_id": self.run_id,
            "agent": self.spec["agent"],
            "node_id": ray.get_runtime_context().get_node_id(),
            "worker_pid": os.getpid(),
            "devices": self.devices,
            "started_at": time.time(),
        }
        if not _patiently(lambda: self._claim_start(start)):
            return None  # started by another submission, or settled by the backend
        if stop_key in seen:  # stopped before it could start
            return self._finish(-signal.SIGTERM)
        try:
            proc = self._spawn()
        except OSError as exc:
            return self._finish(self._cannot_run(exc))
        with self.lock:
            self.proc = proc
        watcher = threading.Thread(target=self._watch, name="aifab-watch", daemon=True)
        watcher.start()
        # This thread waits: the command is bound to die with it (PR_SET_PDEATHSIG), and Ray
        # runs a task on its worker's main thread, which lives as long as the worker.
        returncode = proc.wait()
        self.ended.set()
        watcher.join()
        return self._finish(returncode)

    def _claim_start(self, start: dict[str, Any]) -> bool:
        key = task_record(self.key, "start")
        if self.records.claim(key, start):
            return True
        stored = self.records.get(key)  # a first try may have got through unanswered
        return stored is not None and stored.get("run_id") == self.run_id

    # -- the command ------------------------------------------------------------------------

    def _spawn(self) -> subprocess.Popen[bytes]:
        spec = self.spec
        env = {**os.environ, **spec["env"]}
        if "OMP_NUM_THREADS" not in spec["env"]:
            # Ray set it to 1 for this zero-CPU task; it says nothing about the task's share.
            env.pop("OMP_NUM_THREADS", None)
        # Ray, not aifab, picks the device ids on the node; the task must see Ray's.
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(d) for d in self.devices)
        log_path = Path(spec["log_path"])
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            return subprocess.Popen(
                spec["command"],
                cwd=spec["workdir"],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a group of its own: a stop signals the whole tree
                preexec_fn=_die_with_parent_hook(),
                close_fds=True,
            )

    def _cannot_run(self, exc: OSError) -> int:
        """The shell's exit code for it; the reason goes to the log."""
        spec = self.spec
        if not Path(spec["workdir"]).is_dir():
            code, reason = EXIT_CANNOT_RUN, f"working directory not found: {spec['workdir']}"
        elif isinstance(exc, FileNotFoundError):
            code, reason = EXIT_NOT_FOUND, "command not found"
        else:
            code, reason = EXIT_CANNOT_RUN, str(exc)
        self.error = f"aifab: cannot run {spec['command'][0]!r} on node {spec['node']}: {reason}"
        with contextlib.suppress(OSError):
            Path(spec["log_path"]).parent.mkdir(parents=True, exist_ok=True)
            with open(spec["log_path"], "ab") as log:
                log.write(self.error.encode() + b"\n")
        return code

    # -- stops --------------------------------------------------------------------------------

    def _watch(self) -> None:
        """Polls the records and enforces the SIGKILL deadline until the command has ended."""
        began = time.monotonic()
        next_poll = began + POLL_FIRST_S
        while True:
            now = time.monotonic()
            with self.lock:
                deadline = None if self.kill_sent else self.deadline
            wait = next_poll - now
            if deadline is not None:
                wait = min(wait, deadline - time.time())
            if self.ended.wait(max(wait, 0.0)):
                return
            with self.lock:
                if self.deadline is not None and time.time() >= self.deadline and not self.kill_sent:
                    self._kill_now()
            if time.monotonic() >= next_poll:
                self._poll()
                ran = time.monotonic() - began
                next_poll = time.monotonic() + min(POLL_FIRST_S + POLL_GROWTH * ran, POLL_MAX_S)

    def _poll(self) -> None:
        start_key, stop_key = task_record(self.key, "start"), task_record(self.key, "stop")
        try:
            seen = self.records.get_many([start_key, stop_key])
        except EngineUnavailable:
            return  # the GCS is away: a deadline known already is enforced all the same
        start = seen.get(start_key)
        with self.lock:
            if start is None or start.get("run_id") != self.run_id:
                self.released = True  # its records were dropped: nobody wants it any more
                self._kill_now()
            elif stop_key in seen:
                self._stop(float(seen[stop_key]["deadline"]))

    def _stop(self, deadline: float) -> None:
        """SIGTERM the first time (a second one could cut a checkpoint short), SIGKILL once the
        deadline is over; a later stop can shorten the deadline, never extend it. Caller holds
        the lock."""
        first = self.deadline is None
        self.deadline = deadline if self.deadline is None else min(self.deadline, deadline)
        if time.time() >= self.deadline:
            self._kill_now()
        elif first:
            self._signal(signal.SIGTERM)

    def _kill_now(self) -> None:
        self.kill_sent = True
        if self._signal(signal.SIGKILL) and self.killed_at is None:
            self.killed_at = time.time()

    def _signal(self, signum: int) -> bool:
        """Signal the command's whole group (caller holds the lock)."""
        if self.proc is None or self.swept:
            return False
        try:
            os.killpg(self.proc.pid, signum)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    # -- the end --------------------------------------------------------------------------------

    def _finish(self, returncode: int) -> dict[str, Any] | None:
        with self.lock:
            # What the command left behind (helpers, dataloader workers) must not hold the GPUs
            # once the end is recorded.
            self._signal(signal.SIGKILL)
            self.swept = True
        end = {
            "exit_code": returncode if returncode >= 0 else None,
            "signal": -returncode if returncode < 0 else None,
            "finished_at": time.time(),
            "killed_at": self.killed_at,
            "error": self.error,
            "devices": self.devices,
        }
        if self.released:
            with contextlib.suppress(EngineUnavailable):
                self.records.delete(task_prefix(self.key), prefix=True)
            return None
        recorded = self.records.add_persistently(task_record(self.key, "exit"), end, RECORD_PATIENCE_S)
        if recorded:  # a hint for the control plane to look now (aifab.backends.ends)
            with contextlib.suppress(EngineUnavailable):
                self.records.put(ENDS_KEY, {"key": self.key, "at": end["finished_at"]})
        if recorded and self.spec["gang"] is not None:
            # Last: removing the group ends the worker that runs this very task.
            with contextlib.suppress(Exception):  # the backend's status() retries this
                gang.release_if_done(self.records, self.spec["gang"])
        return {**end, "recorded": recorded}


def _patiently(call: Callable[[], _T]) -> _T:
    """``call``, retried while the GCS is away (it may be restarting). Past the patience the
    error ends the task: its agent records it, once the GCS answers."""
    deadline = time.monotonic() + RECORD_PATIENCE_S
    while True:
        try:
            return call()
        except EngineUnavailable:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.5)


def _device_id(gpu: Any) -> int | str:
    text = str(gpu)
    return int(text) if text.isdigit() else text


def _die_with_parent_hook() -> Callable[[], None] | None:
    """Makes the command die with the thread that started it (Linux only), so a runner killed
    without warning (its worker or node gone, a forced cancel) leaves no task running unwatched."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before fork: no dlsym in the child
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def die_with_parent() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)

    return die_with_parent
