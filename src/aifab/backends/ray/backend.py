"""The Ray backend: runs each task on an existing Ray cluster, exactly where aifab placed it.

Each task is a plain Ray task (``runner.py``) on one of Ray's pooled worker processes, so no
process starts per task. It is pinned to the chosen node with a hard node-affinity strategy or,
for a gang, to its bundle of the gang's placement group (``gang.py``), and asks Ray for the GPUs
aifab gave it (``num_gpus``). It is submitted by the agent of its node (``agent.py``), a detached
actor, so that it outlives the control plane. Everything else goes through the task's records
in the GCS key-value store (``records.py``): ``launch`` claims the task's handle record and hands
the task to the agent without waiting for an answer; ``stop`` writes a stop record, which the
runner polls; ``status`` reads the records of every live task in one round trip per burst
(``view.py``), and hands a task not started after a few seconds over again (idempotent).

Handles are JSON and name the records only, so any later RayBackend (a restarted control plane)
answers for them. Status semantics:

* an end record exists → EXITED (exit code or signal), or UNKNOWN if it says the task was lost;
* the task's node is gone without a record → UNKNOWN (recorded, so a gang's group is freed);
* its worker died without a record: its agent records it killed (SIGKILL: its command died with
  it); its agent died (the task with it) → EXITED with signal 9, recorded as inferred;
* it has not started: after a stop from this process → EXITED with signal 15; still not after
  ``start_timeout`` → EXITED with code 127 (recorded: it will not start later); else RUNNING;
* otherwise RUNNING.

Logs: the runner writes ``req.log_path``, which the backend reads itself (aifab expects a folder
every node shares); while a task runs, its node's agent serves a file this process cannot see.
``release`` forgets a task: it drops its records (a runner still running then kills its
command) and its gang's placement group.

Ray picks the GPU ids on the node (``engine_assigns_devices``): the task sees Ray's in
``CUDA_VISIBLE_DEVICES`` and ``status`` reports them when they differ from aifab's.
"""

from __future__ import annotations

import contextlib
import json
import math
import threading
import time
import uuid
from dataclasses import dataclass
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
from aifab.backends.ray import cluster, gang
from aifab.backends.ray.agent import Agents
from aifab.backends.ray.records import ENDS_KEY, Records, gang_key, task_key, task_prefix, task_record
from aifab.backends.ray.tasks import (
    HANDLE_VERSION,
    TaskRef,
    check_request,
    describe,
    num_gpus,
    read_file,
    reported_devices,
    same_command,
    task_name,
)
from aifab.backends.ray.view import ClusterView

DEFAULT_LOG_DIR = "/tmp/aifab-ray/logs"  # on the task's node, when the request names no log
# kill_overdue leaves a runner this long past a deadline to enforce it itself.
_OVERDUE_MARGIN_S = 5.0
EXIT_NOT_STARTED = 127  # what the control plane records for a task that could not start
_HAND_OVER_AGAIN_S = 3.0  # a task not started this long after its hand-over is handed over again
_EXIT_MARK_EVERY_S = 0.02  # the ends watcher looks every few ms; Ray's store is asked at most this often


@dataclass(frozen=True, slots=True)
class _Deadline:
    at: float
    node_id: str


class RayBackend:
    """Executes aifab's placements on the Ray cluster at ``address`` (see the module docstring).

    ``call_timeout`` bounds every call to Ray; ``start_timeout`` how long a task may wait for Ray
    to start it (or ``launch`` for its gang's reservation, or for a new agent) before it is
    given up."""

    capabilities = Capabilities(
        gangs_across_nodes=True,
        fractional_gpus=True,
        preemption=True,
        log_streaming=True,
        engine_assigns_devices=True,
    )

    def __init__(
        self,
        name: str,
        pool: str,
        address: str,
        namespace: str = "aifab",
        *,
        call_timeout: float = 5.0,
        start_timeout: float = 30.0,
        log_dir: str = DEFAULT_LOG_DIR,
    ) -> None:
        self.name = name
        self.pool = pool
        self.address = address
        self.namespace = namespace
        self.call_timeout = call_timeout
        self.start_timeout = start_timeout
        self.log_dir = log_dir
        self._records = Records(namespace, call_timeout)
        self._view = ClusterView(self._records, call_timeout)
        self._ends_mark = ""
        self._ends_read_at: float | None = None  # monotonic; when the mark was last read
        self._lock = threading.Lock()
        self._agents = Agents(call_timeout)
        self._deadlines: dict[str, _Deadline] = {}  # task key → SIGKILL deadline of a stop sent here
        self._handed: dict[str, float] = {}  # task key → when this process last handed it over

    def _connect(self) -> None:
        cluster.connect(self.address, self.namespace, self.call_timeout)

    # -- inventory ----------------------------------------------------------------------------

    def exit_mark(self) -> str:
        """Changes whenever one of this backend's tasks ends (see :mod:`aifab.backends.ends`):
        the runners overwrite one record at every end. Each read is a round trip to Ray's
        key-value store, so a mark read less than ``_EXIT_MARK_EVERY_S`` ago stands."""
        now = time.monotonic()
        if self._ends_read_at is not None and now - self._ends_read_at < _EXIT_MARK_EVERY_S:
            return self._ends_mark
        self._connect()
        mark = json.dumps(self._records.get(ENDS_KEY), sort_keys=True)
        self._ends_read_at = now
        if mark != self._ends_mark:
            self._ends_mark = mark
            self._view.refresh()
        return mark

    def inventory(self) -> list[NodeInfo]:
        self._connect()
        nodes = self._view.nodes(fresh=True)
        self._agents.keep({n.node_id for n in nodes.values()})
        for node in nodes.values():
            self._agents.ensure(node.node_id)  # started ahead of the node's first task
        return [cluster.node_info(n, self.pool) for _, n in sorted(nodes.items())]

    # -- launch ---------------------------------------------------------------------------------

    def launch(self, req: LaunchRequest) -> Handle:
        """Hand the task to the agent of ``req.node`` without waiting for an answer. Idempotent
        per (workload, attempt, task): a repeated launch returns the first handle, even once
        that task has ended, and never runs the command twice."""
        check_request(req)
        self._connect()
        nodes = self._view.nodes_with(req.gang_nodes or (req.node,))
        if req.node not in nodes:
            raise BackendError(f"{describe(req)}: no alive Ray node named {req.node!r}")
        gpus = num_gpus(req)
        if gang.is_gang(req) and math.ceil(gpus) > gang.bundle_gpus(req)[req.task_index]:
            raise BackendError(f"{describe(req)} needs more GPUs than its gang bundle holds")
        group = gang.reserve(self._records, req, nodes, self.start_timeout) if gang.is_gang(req) else None
        key = task_key(req.workload_id, req.attempt, req.task_index)
        mine = self._handle(req, nodes[req.node].node_id)
        spec = self._spec(req, mine, gpus, group.id.hex() if group is not None else None)
        # The handle record keeps the spec too: whoever finds the task not started yet can hand
        # it over again (see _hand_over_again).
        stored = self._records.add(task_record(key, "handle"), {**mine, "spec": spec})
        handle = {k: v for k, v in stored.items() if k != "spec"}
        if handle["launch_id"] != mine["launch_id"]:
            same_command(handle, req)
            start, end = self._view.task(key, fresh=True)
            if start is not None or end is not None or "spec" not in stored:
                return handle
            spec = stored["spec"]  # not started: the first launch may not have handed it over
        try:
            self._agents.submit(spec)
        except BaseException:
            self._launch_failed(req, key)
            raise
        with self._lock:
            self._handed[key] = time.monotonic()
        self._view.watch(key)
        return handle

    def _handle(self, req: LaunchRequest, node_id: str) -> Handle:
        log_path = req.log_path or f"{self.log_dir}/{req.workload_id}/{req.attempt}/task-{req.task_index}.log"
        return {
            "backend": "ray",
            "version": HANDLE_VERSION,
            "pool": self.pool,
            "namespace": self.namespace,
            "name": task_name(req),
            "launch_id": uuid.uuid4().hex,
            "node": req.node,
            "node_id": node_id,
            "workload_id": req.workload_id,
            "attempt": req.attempt,
            "task_index": req.task_index,
            "command": list(req.command),
            "log_path": log_path,
            "requested_devices": list(req.devices),
            "gpu_milli": req.gpu_milli,
            "gang": gang_key(req.workload_id, req.attempt) if gang.is_gang(req) else None,
            "launched_at": time.time(),
        }

    def _spec(self, req: LaunchRequest, handle: Handle, gpus: float, group: str | None) -> dict[str, Any]:
        return {
            "namespace": self.namespace,
            "record_timeout": self.call_timeout,
            "key": task_key(req.workload_id, req.attempt, req.task_index),
            "launch_id": handle["launch_id"],
            "name": handle["name"],
            "gang": handle["gang"],
            "node": req.node,
            "node_id": handle["node_id"],
            "num_gpus": gpus,
            "placement_group": group,
            "bundle": req.task_index,
            "command": list(req.command),
            "workdir": req.workdir,
            "env": dict(req.env),
            "log_path": handle["log_path"],
        }

    def _launch_failed(self, req: LaunchRequest, key: str) -> None:
        """Let a retry start afresh (a task handed over meanwhile finds no handle and does not
        run). A gang that cannot fully start is torn down whole: its other tasks could never
        complete."""
        with contextlib.suppress(EngineUnavailable):
            self._records.delete(task_prefix(key), prefix=True)
            if gang.is_gang(req):
                gang.remove(self._records, gang_key(req.workload_id, req.attempt))
        self._forget(key)

    def _forget(self, key: str) -> None:
        self._view.forget(key)
        with self._lock:
            self._handed.pop(key, None)
            self._deadlines.pop(key, None)

    # -- status ---------------------------------------------------------------------------------

    def status(self, handle: Handle) -> TaskStatus:
        task = TaskRef.of(handle, self.namespace)
        self._connect()
        start, end = self._view.task(task.key)
        if start is not None:
            with self._lock:
                self._handed.pop(task.key, None)
        if end is None:
            end = self._settle(task, start)
            if end is None:
                return TaskStatus(TaskState.RUNNING, devices=reported_devices(task, start))
        if task.gang is not None:
            gang.release_if_done(self._records, task.gang)
        if end.get("lost"):
            return TaskStatus(TaskState.UNKNOWN)
        return TaskStatus(
            TaskState.EXITED,
            exit_code=end.get("exit_code"),
            signal=end.get("signal"),
            finished_at=end.get("finished_at"),
            devices=reported_devices(task, end),
        )

    def _settle(self, task: TaskRef, start: dict[str, Any] | None) -> dict[str, Any] | None:
        """The end of a task that can no longer record one itself (see the module docstring),
        recorded so that every later reader gets the same answer; None while it may still run."""
        now = time.time()
        if not self._view.node_alive(task.node_id):
            verdict: dict[str, Any] = {"exit_code": None, "signal": None, "finished_at": now, "lost": True}
        elif start is not None:
            if start.get("agent") is None:
                verdict = dict(start["verdict"])  # settled before it started; the end follows
            else:
                agent = self._view.agent_id(task.node_id)
                self._agents.drop_unless(task.node_id, agent)
                if agent == start["agent"]:
                    return None
                # Its agent is gone, and with it every task it submitted.
                verdict = {"exit_code": None, "signal": 9, "finished_at": now, "inferred": True}
        elif self._stopped(task.key) or now - task.launched_at > self.start_timeout:
            if self._stopped(task.key):  # stopped while still queued in Ray
                why = "stopped before Ray started it"
                verdict = {"exit_code": None, "signal": 15, "finished_at": now, "error": why}
            else:
                why = f"Ray did not start it on {task.node} within {self.start_timeout:g} s"
                verdict = {"exit_code": EXIT_NOT_STARTED, "signal": None, "finished_at": now, "error": why}
            # Whoever writes the start record first decides: the runner, or this verdict.
            if not self._records.claim(task_record(task.key, "start"), {"verdict": verdict}):
                return None
            end = self._record_end(task, verdict)
            # Out of Ray's queue; its agent would record the cancelled task killed, hence after.
            self._agents.cancel(task.node_id, self.namespace, task.key)
            _append_line(task.log_path, f"aifab: {why}")
            return end
        else:
            self._hand_over_again(task)
            return None  # queued in Ray, or on its way
        return self._record_end(task, verdict)

    def _record_end(self, task: TaskRef, verdict: dict[str, Any]) -> dict[str, Any]:
        end = self._records.add(task_record(task.key, "exit"), verdict)
        self._view.note_end(task.key, end)
        return end

    def _stopped(self, key: str) -> bool:
        """Stopped from this process (a task that has not started has nothing to save)."""
        with self._lock:
            return key in self._deadlines

    def _hand_over_again(self, task: TaskRef) -> None:
        """A task not started a while after it was handed over (or one this process did not
        launch: a restarted control plane) is handed over again, from the spec in its handle
        record: the launching process may have died before its submission left, or the node's
        agent since. Its agent ignores a task it already has; the runner's start record keeps
        it from running twice."""
        now = time.monotonic()
        with self._lock:
            last = self._handed.get(task.key)
            if last is not None and now - last < _HAND_OVER_AGAIN_S:
                return
            self._handed[task.key] = now
        record = self._records.get(task_record(task.key, "handle"))
        if record is not None and isinstance(record.get("spec"), dict):
            self._agents.submit(record["spec"])

    # -- stop -----------------------------------------------------------------------------------

    def stop(self, handle: Handle, grace_seconds: float) -> None:
        """Writes the stop record (SIGKILL deadline now + grace); the runner sends SIGTERM when
        it sees it. A later stop can shorten the deadline, never extend it."""
        task = TaskRef.of(handle, self.namespace)
        self._connect()
        deadline = time.time() + max(grace_seconds, 0.0)
        self._note_deadline(task, deadline)
        key = task_record(task.key, "stop")
        if not self._records.claim(key, {"deadline": deadline}):
            current = self._records.get(key)
            if current is None or float(current["deadline"]) > deadline:
                self._records.put(key, {"deadline": deadline})

    def _note_deadline(self, task: TaskRef, at: float) -> None:
        with self._lock:
            known = self._deadlines.get(task.key)
            if known is None or at < known.at:
                self._deadlines[task.key] = _Deadline(at, task.node_id)

    def kill_overdue(self) -> None:
        """A safety net only: runners enforce their own deadlines. A task still there well past
        a deadline this process set has its worker killed by its agent (its command with it)."""
        now = time.time()
        with self._lock:
            overdue = {k: d for k, d in self._deadlines.items() if now >= d.at + _OVERDUE_MARGIN_S}
        if not overdue:
            return
        try:
            self._connect()
            ends = self._records.get_many([task_record(k, "exit") for k in overdue])
        except EngineUnavailable:
            return
        for key, deadline in overdue.items():
            if task_record(key, "exit") not in ends:
                self._agents.cancel(deadline.node_id, self.namespace, key)
            with self._lock:
                self._deadlines.pop(key, None)

    # -- logs -----------------------------------------------------------------------------------

    def read_log(self, handle: Handle, offset: int = 0, limit: int = 1 << 20) -> tuple[bytes, int]:
        task = TaskRef.of(handle, self.namespace)
        if offset < 0 or limit < 0:
            raise BackendError(f"offset and limit must be >= 0, got {offset} and {limit}")
        with contextlib.suppress(FileNotFoundError):
            return read_file(task.log_path, offset, limit)
        self._connect()
        kinds = {kind: task_record(task.key, kind) for kind in ("start", "exit")}
        found = self._records.get_many(list(kinds.values()))
        if not found:
            return b"", offset  # not started yet
        end = found.get(kinds["exit"])
        if end is None:
            # Running on a node whose files this process does not see: its agent reads them.
            served = self._agents.read_log(task.node_id, task.log_path, offset, limit)
            if served is not None:
                return served
        raise BackendError(
            f"log of {task.name} not readable here: {task.log_path} (written on node {task.node}, "
            "whose task has ended; logs need a folder the nodes share with the control plane)"
        )

    # -- cleanup --------------------------------------------------------------------------------

    def release(self, handle: Handle) -> None:
        """Forget a task aifab no longer needs: drop its records (a runner still running kills
        its command when it finds its start record gone) and remove its gang's placement group (which
        ends the gang's other tasks too)."""
        task = TaskRef.of(handle, self.namespace)
        self._connect()
        if task.gang is not None:
            gang.remove(self._records, task.gang)
        self._records.delete(task_prefix(task.key), prefix=True)
        self._forget(task.key)


def _append_line(path: str, line: str) -> None:
    with contextlib.suppress(OSError), open(path, "ab") as log:
        log.write(line.encode() + b"\n")
