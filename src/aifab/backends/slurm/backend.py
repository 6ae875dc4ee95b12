"""The Slurm backend: each aifab task is one Slurm batch job, pinned to the node aifab chose.

aifab picks the node and the number of GPUs; Slurm picks which GPU indices (GRES), and the
backend reports them back (``TaskStatus.devices``). The batch script is a small supervisor
(``jobscript.py``) that records the task's start and end in files under ``state_dir``, so the
outcome is known after slurmctld forgets the job (there is no slurmdbd to ask).

Status semantics (``status``):

* the supervisor's exit record exists → EXITED with its exit code / signal;
* Slurm holds the job pending or running → RUNNING (with ``devices`` once it has GPUs), except
  a job still pending for its node while that node cannot run work (drained or down before the
  job started: it would wait until someone brings the node back): the job is cancelled and
  the task reads as lost (UNKNOWN, recorded), so the control plane places it again elsewhere;
* Slurm says the job ended but the supervisor wrote nothing (it never started, or was killed
  outright) → EXITED with what Slurm's record says (a cancel reads as SIGTERM, a time or memory
  limit as SIGKILL), written to the exit file so every later reader sees the same answer;
* Slurm lost the job with its node (NODE_FAIL, BOOT_FAIL) or preempted it for other work →
  UNKNOWN (recorded too): the control plane runs it again without counting a failure, even if
  the supervisor, cut off from Slurm, records an end of its own later;
* Slurm no longer knows the job and nothing was recorded → UNKNOWN, unless this backend had
  killed it (then EXITED by SIGKILL).

Stopping: ``scancel --batch --signal=TERM`` reaches the supervisor alone, which relays it to the
command's process group (so the command sees it once); past the deadline ``kill_overdue`` sends
SIGUSR2, which the supervisor turns into SIGKILL for the group. A job whose supervisor is not
running yet (pending) is simply cancelled. Deadlines live in files, so a restarted control
plane enforces them.

Handing a node over: with ``end_hold_s`` > 0 a job whose command ended keeps its allocation
until the control plane calls ``acknowledge_ends`` (it has recorded the end and submitted what
takes the room), at most that long. Slurm starts queued batch jobs at its once-a-second
scheduling pass, or at once when an ending job's node reports back late; the successor is then
queued already and may start at once, instead of at the next pass (``docs/benchmarks.md``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aifab.backends.base import (
    BackendError,
    Capabilities,
    EngineUnavailable,
    Handle,
    LaunchRequest,
    NodeInfo,
    TaskState,
    TaskStatus,
)
from aifab.backends.ends import ENDS_FILE, journal_mark
from aifab.backends.slurm import jobscript, parse
from aifab.backends.slurm.commands import NOT_READ_YET, JobTable, SlurmCli, SlurmTimeout
from aifab.backends.slurm.records import (
    Task,
    TaskFiles,
    check_request,
    describe,
    devices_of,
    exited,
    held,
    job_name,
    load_stop,
    mark_stop,
    new_handle,
    persist_inferred,
    read_json,
    read_record,
    record_stop,
)

_KILL_NOW = "USR2"  # the supervisor's "SIGKILL the command now" (see jobscript.py)
# After this long past a SIGKILL request that did not end the job (supervisor hung or gone),
# Slurm's own cancel takes over.
_ESCALATE_AFTER_S = 10.0
_SIGKILL = 9


class SlurmBackend:
    """Runs aifab's tasks as Slurm batch jobs (see the module docstring)."""

    capabilities = Capabilities(
        gangs_across_nodes=True,
        fractional_gpus=False,
        preemption=True,
        log_streaming=True,
        engine_assigns_devices=True,
    )

    def __init__(
        self,
        name: str,
        pool: str,
        partition: str | None,
        slurm_conf: str | None,
        state_dir: Path,
        *,
        gpu_memory_mib: int = 81920,
        virtual_gpus: bool = False,
        python: str = sys.executable,
        default_cpus: int = 1,
        default_memory_mib: int = 1024,
        sbatch_args: Sequence[str] = (),
        command_timeout_s: float = 30.0,
        status_cache_s: float = 2.0,
        end_hold_s: float = 0.0,
    ) -> None:
        if not python or any(ch.isspace() for ch in python):
            raise BackendError(f"the batch script's interpreter must be a path without spaces: {python!r}")
        self.name = name
        self.pool = pool
        self.partition = partition
        self.state_dir = Path(state_dir).absolute()
        self.gpu_memory_mib = gpu_memory_mib
        # Slurm cannot say how much memory its GPUs have, nor whether a GRES is backed by a
        # real device (a test cluster declares character devices): the operator says so.
        self.virtual_gpus = virtual_gpus
        self.python = python
        self.default_cpus = default_cpus
        self.default_memory_mib = default_memory_mib
        self.sbatch_args = tuple(sbatch_args)
        # How long a finished job waits for acknowledge_ends (jobscript.Supervisor.await_ack).
        # 0 without a control plane that acknowledges: nobody would, and every job would linger.
        self.end_hold_s = end_hold_s
        self.cli = SlurmCli(slurm_conf, timeout_s=command_timeout_s)
        self.jobs = JobTable(self.cli, ttl_s=status_cache_s)
        self._lock = threading.Lock()
        self._deadlines: dict[Path, tuple[Task, float]] = {}  # by stop file
        self._deadlines_loaded = False

    # -- inventory --------------------------------------------------------------------------

    def exit_mark(self) -> int:
        """Changes whenever one of this backend's jobs ends (see :mod:`aifab.backends.ends`)."""
        return journal_mark(self.state_dir / ENDS_FILE)

    def inventory(self) -> list[NodeInfo]:
        """The usable nodes of the partition (all partitions when None). Nodes that are down,
        drained or not responding are left out, so the control plane sees them go."""
        nodes = []
        for raw in self.cli.nodes():
            info = parse.node_info(
                raw,
                pool=self.pool,
                partition=self.partition,
                gpu_memory_mib=self.gpu_memory_mib,
                virtual_gpus=self.virtual_gpus,
            )
            if info is not None:
                nodes.append(info)
        return sorted(nodes, key=lambda n: n.name)

    # -- launch -----------------------------------------------------------------------------

    def launch(self, req: LaunchRequest) -> Handle:
        """Submit the task's batch job. Idempotent per (workload, attempt, task index): a
        launch repeated after a control-plane crash returns the job submitted the first time
        (found by its batch script in Slurm's queue if the crash came before the handle was
        written)."""
        check_request(req)
        # Slurm resolves relative paths against the job's working directory, this process
        # against its own: only absolute paths mean the same to both.
        req = dataclasses.replace(
            req,
            workdir=str(Path(req.workdir).absolute()),
            log_path=str(Path(req.log_path).absolute()) if req.log_path else "",
        )
        files = TaskFiles.of(self.state_dir, req)
        files.spec.parent.mkdir(parents=True, exist_ok=True)
        with held(files.lock):  # concurrent launches of one task wait for each other
            previous = self._previous_handle(files, req)
            if previous is not None:
                return previous
            log_path = Path(req.log_path) if req.log_path else files.default_log
            log_path.parent.mkdir(parents=True, exist_ok=True)
            self._write_job_files(files, req)
            try:
                job_id = self.cli.submit(
                    self._sbatch_options(req, log_path), str(files.script), [str(files.spec)]
                )
            except SlurmTimeout:
                raise  # the job may exist: the next launch looks for it before submitting again
            except EngineUnavailable:
                files.spec.unlink(missing_ok=True)  # refused outright: no job exists
                raise
            except BackendError as exc:
                files.spec.unlink(missing_ok=True)  # let a retry start afresh
                raise BackendError(f"{describe(req)}: {exc}") from exc
            handle = new_handle(req, job_id, files, log_path)
            jobscript.write_json_atomic(files.handle, handle)
            return handle

    def _previous_handle(self, files: TaskFiles, req: LaunchRequest) -> Handle | None:
        handle = read_json(files.handle)
        if handle is not None:
            if handle.get("command") != list(req.command):
                raise BackendError(f"{describe(req)} was already launched with another command")
            return handle
        if not files.spec.exists():
            return None
        # An earlier launch wrote its files, then died around sbatch: did the job get in?
        job = self.jobs.find(script=str(files.script))
        if job is not None:
            spec = read_json(files.spec) or {}
            if spec.get("command") != list(req.command):
                raise BackendError(f"{describe(req)} was already launched with another command")
            log_path = Path(str(job.get("standard_output") or files.default_log))
            handle = new_handle(req, str(job["job_id"]), files, log_path)
            jobscript.write_json_atomic(files.handle, handle)
            return handle
        if files.start.exists() or files.exit.exists():
            raise BackendError(
                f"{describe(req)} already ran and Slurm no longer knows its job; launch a new attempt"
            )
        return None  # the earlier sbatch never created a job: submit afresh

    def _write_job_files(self, files: TaskFiles, req: LaunchRequest) -> None:
        spec = {
            "command": list(req.command),
            "workdir": req.workdir,
            "env": dict(req.env),
            "start_path": str(files.start),
            "exit_path": str(files.exit),
            "ends_path": str(self.state_dir / ENDS_FILE),
            "ack_path": str(files.ack),
            "hold_s": self.end_hold_s,
        }
        for stale in (files.start, files.exit, files.stop, files.ack):
            stale.unlink(missing_ok=True)  # left by a job that never got a handle
        fd = os.open(files.spec, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(spec, f)
        files.script.write_text(f"#!{self.python}\n{_SUPERVISOR_SOURCE}")
        files.script.chmod(0o700)

    def _sbatch_options(self, req: LaunchRequest, log_path: Path) -> list[str]:
        # The request has no CPU or memory of its own yet: optional fields are honoured when
        # present, else the backend's defaults (Slurm must be told some memory, or the job
        # takes the whole node's).
        cpu_milli = req.cpu_milli
        memory_mib = req.memory_mib
        cpus = max(1, math.ceil(cpu_milli / 1000)) if cpu_milli else self.default_cpus
        options = [
            f"--job-name={job_name(req)}",
            f"--nodelist={req.node}",
            "--nodes=1",
            "--ntasks=1",
            f"--cpus-per-task={cpus}",
            f"--mem={memory_mib or self.default_memory_mib}M",
            f"--chdir={req.workdir}",
            f"--output={log_path}",
            "--no-requeue",  # retries are aifab's decision, never Slurm's
            "--export=ALL",
        ]
        if self.partition is not None:
            options.append(f"--partition={self.partition}")
        if req.devices:
            options.append(f"--gres=gpu:{len(req.devices)}")
        return [*options, *self.sbatch_args]

    # -- status -----------------------------------------------------------------------------

    def status(self, handle: Handle) -> TaskStatus:
        task = Task.of(handle)
        start = read_record(task.start_path, task.job_id)
        ended = read_record(task.exit_path, task.job_id)
        if ended is not None:
            return exited(ended, start)
        job = self.jobs.lookup(task.job_id, _number(handle.get("submitted_at")))
        if job is NOT_READ_YET:  # submitted since Slurm's table was read: queued or running
            return TaskStatus(TaskState.RUNNING, devices=devices_of(start))
        state = str(job.get("job_state", "")).upper() if job is not None else ""
        if job is not None and state in parse.LIVE_JOB_STATES:
            ended = read_record(task.exit_path, task.job_id) if state == "COMPLETING" else None
            if ended is not None:
                return exited(ended, start)
            if state == "PENDING" and start is None and self._stranded(job):
                return self._give_up_stranded(task, job)
            return TaskStatus(TaskState.RUNNING, devices=self._devices(task, job, start))
        # Ended, or forgotten: the supervisor may have written its record since the first look.
        start = read_record(task.start_path, task.job_id)
        ended = read_record(task.exit_path, task.job_id)
        if ended is not None:
            return exited(ended, start)
        if job is not None:
            code, sig = parse.end_from_job(job)
            finished_at = float(job.get("end_time") or 0) or time.time()
            record = {"exit_code": code, "signal": sig, "finished_at": finished_at, "slurm_state": state}
            if state in parse.LOST_JOB_STATES:
                record = {**record, "exit_code": None, "signal": None, "lost": True}
            return exited(persist_inferred(task, record), start)
        stop = read_json(task.stop_path) or {}
        if stop.get("killed_at") is not None:
            record = {"exit_code": None, "signal": _SIGKILL, "finished_at": time.time()}
            return exited(persist_inferred(task, record), start)
        return TaskStatus(TaskState.UNKNOWN)

    def _stranded(self, job: dict[str, Any]) -> bool:
        """Slurm holds the job for a node of its that cannot run work now (its own inventory
        leaves such a node out): it will not start before someone resumes the node."""
        if str(job.get("state_reason") or "") not in parse.NODE_UNAVAILABLE_REASONS:
            return False
        required = {n for n in str(job.get("required_nodes") or "").split(",") if n}
        usable = {str(raw.get("name")) for raw in self.cli.nodes() if parse.node_is_usable(raw)}
        return bool(required - usable)

    def _give_up_stranded(self, task: Task, job: dict[str, Any]) -> TaskStatus:
        """Cancel a job stranded on its node, then record the task lost (in that order: a job
        left in the queue would start, and run twice, once the node is back)."""
        if not self.cli.cancel([task.job_id]):
            return TaskStatus(TaskState.RUNNING)  # it ended meanwhile: the next look says how
        why = str(job.get("state_description") or job.get("state_reason"))
        record = {"exit_code": None, "signal": None, "finished_at": time.time(), "lost": True}
        return exited(persist_inferred(task, {**record, "slurm_state": f"PENDING ({why})"}), None)

    def _devices(
        self, task: Task, job: dict[str, Any], start: dict[str, Any] | None
    ) -> tuple[int, ...] | None:
        """The GPU indices Slurm gave the job: the supervisor's record, else Slurm's own."""
        from_start = devices_of(start)
        if from_start is not None:
            return from_start
        if str(job.get("job_state", "")).upper() != "RUNNING":
            return None
        details = [str(d) for d in job.get("gres_detail") or ()]
        indices = parse.gpu_indices(details)
        if indices or not parse.wants_gpus(job):
            return indices
        return parse.gpu_indices(parse.scontrol_gres_details(self.cli.show_job(task.job_id))) or None

    def acknowledge_ends(self, handles: Sequence[Handle]) -> None:
        """The control plane has recorded these tasks' ends and queued what takes their room:
        their jobs may end now (see :meth:`jobscript.Supervisor.await_ack`)."""
        for handle in handles:
            ack = handle.get("ack_path")
            if not ack:
                continue  # launched before acknowledgements existed: its job does not wait
            with contextlib.suppress(OSError):  # the run's folder is gone: nobody waits either
                Path(ack).touch()

    # -- stop -------------------------------------------------------------------------------

    def stop(self, handle: Handle, grace_seconds: float) -> None:
        task = Task.of(handle)
        if task.exit_path.exists():
            return  # it ended, and its supervisor already swept the group
        deadline = record_stop(task, handle, grace_seconds)
        with self._lock:
            self._deadlines[task.stop_path] = (task, deadline)
        job = self.jobs.lookup(task.job_id)
        if job is None or str(job.get("job_state", "")).upper() not in parse.LIVE_JOB_STATES:
            return
        self._end(task, kill=grace_seconds <= 0)

    def _end(self, task: Task, *, kill: bool) -> None:
        """SIGTERM (or SIGKILL) the command through its supervisor; cancel the job outright
        while the supervisor is not running yet to catch the signal."""
        # The start record, not Slurm's state (perhaps half a second old), says whether the
        # supervisor runs: it writes the record once its signal handlers are in place.
        supervised = read_record(task.start_path, task.job_id) is not None
        if not supervised:
            self.cli.cancel([task.job_id])
        elif not self.cli.cancel([task.job_id], signal_name=_KILL_NOW if kill else "TERM", batch=True):
            self.cli.cancel([task.job_id])  # the batch step cannot be signalled: Slurm ends it
        if kill:
            mark_stop(task, killed_at=time.time())

    def kill_overdue(self) -> None:
        """SIGKILL the tasks whose grace period is over. Never raises for an unreachable
        controller: the reconcile loop calls this every pass and tries again on the next."""
        self._load_deadlines_once()
        now = time.time()
        with self._lock:
            pending = list(self._deadlines.items())
        for stop_path, (task, deadline) in pending:
            if now < deadline:
                continue
            try:
                done = self._enforce(task, now)
            except EngineUnavailable:
                return  # nothing can be done about any of them now
            except BackendError:
                continue  # a damaged record: the others still get their SIGKILL
            if done:
                with self._lock:
                    self._deadlines.pop(stop_path, None)

    def _enforce(self, task: Task, now: float) -> bool:
        """SIGKILL an overdue task (Slurm's own cancel if that has not ended it after a while);
        True once there is nothing left to do."""
        job = None if task.exit_path.exists() else self.jobs.lookup(task.job_id)
        if job is None or str(job.get("job_state", "")).upper() not in parse.LIVE_JOB_STATES:
            return True
        stop = read_json(task.stop_path) or {}
        killed_at = stop.get("killed_at")
        if killed_at is None:
            self._end(task, kill=True)
        elif now - float(killed_at) > _ESCALATE_AFTER_S and stop.get("cancelled_at") is None:
            self.cli.cancel([task.job_id])
            mark_stop(task, cancelled_at=now)
        return False

    def _load_deadlines_once(self) -> None:
        """A restarted control plane enforces the deadlines its predecessor set."""
        with self._lock:
            if self._deadlines_loaded:
                return
            self._deadlines_loaded = True
            for stop_path in self.state_dir.glob("runs/*/*/task-*.stop.json"):
                loaded = load_stop(stop_path)
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
        except FileNotFoundError:
            # Slurm creates the log when the job starts: a pending job has none yet.
            return b"", offset
        return data, offset + len(data)


# -- helpers -----------------------------------------------------------------------------------

_SUPERVISOR_SOURCE = Path(jobscript.__file__).read_text()


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) else None
