"""The dispatch loop: acts on the scheduler's intent, idempotently.

A ``bound`` run becomes ``launching`` (written first), is launched, then ``running`` with the
backend's handle; an ``evicting`` run (or one whose workload is being cancelled) is stopped with
the workload's grace period. A bound task waits until the device room it was given is really
free (an evicted task may still hold it during its grace period).
"""

from __future__ import annotations

import socket
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from sqlalchemy import Select, select
from sqlalchemy.orm import Session, defer

from aifab.backends.base import BackendError, EngineUnavailable, LaunchRequest
from aifab.backends.router import PoolRouter
from aifab.control import spec as specs
from aifab.control.db import Database
from aifab.control.db.models import NodeRow, TaskRunRow, WorkloadRow
from aifab.control.reconcile import current_attempts, in_chunks
from aifab.control.services import nodes as node_service
from aifab.control.services.workloads import event, transition
from aifab.control.settings import Settings

LAUNCH_WORKERS = 16  # engine calls in flight at once while dispatching
LAUNCH_PATIENCE_S = 0.05  # how long a pass waits for its launches before moving on
ENDED_LOOK_S = 0.005  # while it waits, how often it looks whether a task ended
# What one launch came to: run id, request, handle (None: it did not start), error, engine away.
Outcome = tuple[int, LaunchRequest, "dict[str, Any] | None", str, bool]


class Dispatcher:
    """The dispatch half of the :class:`~aifab.control.loops.Controller`."""

    db: Database
    backend: PoolRouter
    settings: Settings
    _spec: Callable[[WorkloadRow], specs.JobSpec]
    _live_runs: int

    wake: threading.Event
    ended: threading.Event  # set when a backend notes a task's end, cleared by the next tick
    _launcher: ThreadPoolExecutor | None = None
    _launch_lock: threading.Lock | None = None
    _inflight: set[int] | None = None  # run ids handed to the launcher, outcome not yet written
    _launched: list[Outcome] | None = None  # outcomes the launcher finished, not yet written
    _recovered = False
    _pass_launches: list[futures.Future[None]]  # the launches the last pass handed to the launcher

    def dispatch_once(self, *, wait: bool = True) -> None:
        """Stop what must stop, then launch what is bound. ``wait=False`` (the server's loop)
        hands launches to a pool of threads and writes their outcomes on a later pass, so a slow
        engine round trip (one ``sbatch``) never holds the loop: exits are noticed and rooms
        reused meanwhile."""
        self._pass_launches = []
        self._write_finished_launches()
        self._stop_requested()
        claimed = self._claim_launches()
        if not self._recovered:
            claimed = self._interrupted_launches() + claimed
            self._recovered = True
        if claimed:
            self._launch_all(claimed, wait)

    def _interrupted_launches(self) -> list[int]:
        """Runs a previous process marked ``launching`` and never heard back about: launched
        again (every backend's launch is idempotent per task attempt, so a task that did start
        is found, not started twice)."""
        with self.db.read_session() as s:
            return list(s.scalars(select(TaskRunRow.id).where(TaskRunRow.state == "launching")))

    def drain_launches(self) -> None:
        """Wait for launches in flight and write their outcomes (at shutdown, and in tests)."""
        if self._launcher is not None:
            self._launcher.shutdown(wait=True)
            self._launcher = None
        self._write_finished_launches()

    def _stop_requested(self) -> None:
        """Stop evicted runs and those of cancelled workloads. The engines are called between a
        read and a write transaction, never inside one (SQLite has a single write lock)."""
        with self.db.read_session() as s:
            cancelling = select(WorkloadRow.id).where(WorkloadRow.cancel_requested.is_(True))
            rows = s.scalars(
                select(TaskRunRow).where(
                    (TaskRunRow.state == "evicting")
                    | (TaskRunRow.state.in_(("bound", "running")) & TaskRunRow.workload_id.in_(cancelling))
                )
            ).all()
            inflight = self._inflight or set()  # stopped once their launch's outcome is written
            todo = [
                (r.id, dict(r.handle) if r.handle else None, self._grace(s, r.workload_id))
                for r in rows
                if r.id not in inflight
            ]
        if not todo:
            return
        done: dict[int, tuple[float, str | None]] = {}  # run id → (grace, error); no grace: never launched
        for run_id, handle, grace in todo:
            if handle is None:
                done[run_id] = (-1.0, None)
                continue
            try:
                self.backend.stop(handle, grace)
                done[run_id] = (grace, None)
            except EngineUnavailable:
                continue  # still asked for: tried again on the next pass
            except BackendError as exc:
                done[run_id] = (grace, str(exc))
        with self.db.session() as s:
            now = time.time()
            for run_id, (grace, error) in done.items():
                r = s.get(TaskRunRow, run_id)
                if r is None:
                    continue
                if grace < 0:  # nothing to stop
                    r.state, r.finished_at = "exited", now
                    continue
                if error is not None:
                    event(s, r.workload_id, "error", f"stop task {r.task_index}: {error}")
                r.state, r.stop_deadline = "stopping", now + grace

    def _grace(self, s: Session, workload_id: str) -> float:
        w = s.get(WorkloadRow, workload_id)
        return float(self._spec(w).checkpoint_grace) if w is not None else self.settings.default_grace

    def _claim_launches(self) -> list[int]:
        """Bound runs whose room is free, marked ``launching`` (intent written before acting)."""
        with self.db.read_session() as s:
            if s.scalar(select(TaskRunRow.id).where(TaskRunRow.state == "bound").limit(1)) is None:
                return []  # the usual case: no write transaction for nothing
        with self.db.session() as s:
            bound = s.scalars(
                select(TaskRunRow).where(TaskRunRow.state == "bound").order_by(TaskRunRow.id)
            ).all()
            if not bound:
                return []
            # What each device really holds: tasks launched or still inside a grace period. A
            # bound task waits until its share fits, whatever the scheduler assumed (e.g. that
            # its victims are already gone).
            used: dict[tuple[str, int], int] = defaultdict(int)
            holding = ("launching", "running", "evicting", "stopping")
            for r in s.scalars(select(TaskRunRow).where(TaskRunRow.state.in_(holding))):
                for d in r.devices:
                    used[(r.node, int(d))] += r.gpu_milli
            claimed = []
            for r in bound:
                if any(used[(r.node, int(d))] + r.gpu_milli > 1000 for d in r.devices):
                    continue
                for d in r.devices:
                    used[(r.node, int(d))] += r.gpu_milli
                r.state = "launching"
                claimed.append(r.id)
            return claimed

    def _launch_all(self, run_ids: list[int], wait: bool) -> None:
        """Launch claimed runs: requests built in one transaction, engines called concurrently
        (a remote engine's round trip, e.g. one ``sbatch``, would otherwise be paid once per task
        in a row), outcomes written in one transaction. A gang's tasks launch in order, in one
        worker: an engine may reserve the whole gang when its first task launches."""
        with self.db.session() as s:
            requests: dict[str, list[tuple[int, LaunchRequest]]] = defaultdict(list)
            runs = [
                r for r in in_chunks(s, select(TaskRunRow), TaskRunRow.id, run_ids) if r.state == "launching"
            ]
            wids = sorted({r.workload_id for r in runs})
            workloads = {w.id: w for w in in_chunks(s, _workloads(), WorkloadRow.id, wids)}
            attempts = current_attempts(s, wids)
            for r in sorted(runs, key=lambda r: r.id):
                w = workloads[r.workload_id]
                requests[w.id].append((r.id, self._request(s, w, r, self._spec(w), attempts[w.id])))
        groups = list(requests.values())
        if not wait:
            # Quick launches (a local process) are written in this pass; slow ones (sbatch, a
            # busy engine) on a later one, without holding the loop.
            self._pass_launches = [self._launch_later(g) for g in groups]
            self._await_launches(self._pass_launches)
            self._write_finished_launches()
            return
        if len(groups) == 1:
            outcomes = self._launch_group(groups[0])
        else:
            with ThreadPoolExecutor(max_workers=min(LAUNCH_WORKERS, len(groups))) as pool:
                outcomes = [o for done in pool.map(self._launch_group, groups) for o in done]
        self._write_launches(outcomes)

    def acknowledge_after_launches(self, handles: list[dict[str, Any]]) -> None:
        """Acknowledge the ends of ``handles`` to their engines once the launches of the last
        pass are in (``sbatch`` returned): the tasks that take the freed room are queued in the
        engine by then. Only a hint: an engine that holds a finished task's room lets it go
        after a while anyway, so failures are ignored."""
        if not handles:
            return
        pending = [f for f in self._pass_launches if not f.done()]
        if not pending:
            self._acknowledge(handles)
            return
        left, lock = [len(pending)], threading.Lock()

        def one_done(_: futures.Future[None]) -> None:
            with lock:
                left[0] -= 1
                last = left[0] == 0
            if last:
                self._acknowledge(handles)

        for f in pending:
            f.add_done_callback(one_done)

    def _acknowledge(self, handles: list[dict[str, Any]]) -> None:
        try:
            self.backend.acknowledge_ends(handles)
        except Exception as exc:  # a hint: the engine lets the room go after a while anyway
            print(f"aifab: acknowledging ends failed: {exc!r}", flush=True)

    def _await_launches(self, pending: list[futures.Future[None]]) -> None:
        """Up to LAUNCH_PATIENCE_S for the launches, but not past a task's end (``ended``): the
        room it frees is what the next pass binds, and a slow engine's launch is written on a
        later pass anyway."""
        deadline = time.monotonic() + LAUNCH_PATIENCE_S
        while pending and not self.ended.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            pending = list(futures.wait(pending, timeout=min(left, ENDED_LOOK_S)).not_done)

    def _launch_later(self, group: list[tuple[int, LaunchRequest]]) -> futures.Future[None]:
        if self._launcher is None or self._launch_lock is None:
            self._launch_lock = threading.Lock()
            self._inflight, self._launched = set(), []
            self._launcher = ThreadPoolExecutor(max_workers=LAUNCH_WORKERS, thread_name_prefix="aifab-launch")
        with self._launch_lock:
            assert self._inflight is not None
            self._inflight.update(run_id for run_id, _ in group)

        def launch() -> None:
            outcomes = self._launch_group(group)
            assert self._launch_lock is not None and self._launched is not None
            with self._launch_lock:
                self._launched.extend(outcomes)
            self.wake.set()  # write the outcome now; the loop may be waiting

        return self._launcher.submit(launch)

    def _write_finished_launches(self) -> None:
        if self._launch_lock is None or self._launched is None or self._inflight is None:
            return
        with self._launch_lock:
            outcomes, self._launched = self._launched, []
        if not outcomes:
            return
        self._write_launches(outcomes)
        with self._launch_lock:
            self._inflight.difference_update(o[0] for o in outcomes)

    def _write_launches(self, outcomes: list[Outcome]) -> None:
        with self.db.session() as s:
            launched = {
                r.id: r for r in in_chunks(s, select(TaskRunRow), TaskRunRow.id, [o[0] for o in outcomes])
            }
            wids = sorted({r.workload_id for r in launched.values()})
            workloads = {w.id: w for w in in_chunks(s, _workloads(), WorkloadRow.id, wids)}
            for run_id, req, handle, error, lost in outcomes:
                run = launched.get(run_id)
                owner = workloads.get(run.workload_id) if run is not None else None
                if run is not None and owner is not None:
                    self._record_launch(s, run, owner, req, handle, error, lost)
            # A workload runs once every task of its attempt does.
            for wid, siblings in current_attempts(s, wids).items():
                w = workloads[wid]
                if w.phase == "scheduled" and all(x.state == "running" for x in siblings):
                    w.start_time = now = time.time()
                    transition(
                        s, w, "running", f"attempt {w.attempt}: all {len(siblings)} task(s) running", now
                    )
        self._live_runs += sum(1 for o in outcomes if o[2] is not None)  # watched for their ends

    def _launch_group(self, group: list[tuple[int, LaunchRequest]]) -> list[Outcome]:
        out: list[Outcome] = []
        for run_id, req in group:
            try:
                out.append((run_id, req, self.backend.launch(req), "", False))
            except EngineUnavailable as exc:
                out.append((run_id, req, None, str(exc), True))
            except BackendError as exc:
                out.append((run_id, req, None, str(exc), False))
        return out

    def _record_launch(
        self,
        s: Session,
        r: TaskRunRow,
        w: WorkloadRow,
        req: LaunchRequest,
        handle: dict[str, Any] | None,
        error: str,
        lost: bool,
    ) -> None:
        now = time.time()
        if handle is None and lost:
            # Not the workload's fault: it is requeued whole, without counting a failure.
            r.state, r.finished_at = "lost", now
            event(
                s,
                w.id,
                "error",
                f"task {r.task_index} could not start, its pool is unreachable: {error}",
                now,
            )
            return
        if handle is None:
            r.state, r.exit_code, r.finished_at = "exited", 127, now
            event(s, w.id, "error", f"task {r.task_index} could not start: {error}", now)
            return
        kept = {k: v for k, v in (r.handle or {}).items() if k == "master_port"}  # the gang's rendezvous
        r.handle, r.started_at, r.log_path = {**handle, **kept}, now, req.log_path
        if r.state == "launching":
            r.state = "running"
        # else: evicted or cancelled while its launch was in flight: now that the handle is
        # known, the next dispatch pass stops it like any other.
        event(s, w.id, "launched", f"task {r.task_index} started on {r.node}", now)

    def _request(
        self, s: Session, w: WorkloadRow, r: TaskRunRow, spec: specs.JobSpec, siblings: Sequence[TaskRunRow]
    ) -> LaunchRequest:
        """``siblings``: every task of the attempt, ``r`` among them."""
        from aifab.backends.local.executor import task_env

        world: dict[str, str | int] | None = None
        gang = sorted(siblings, key=lambda x: x.task_index)
        if len(siblings) > 1:
            port = _gang_port(s, w, siblings)
            ranks = sorted(x.task_index for x in siblings)
            on_node = [x.task_index for x in siblings if x.node == r.node]
            master = s.get(NodeRow, gang[0].node)
            world = {
                "master_addr": (master.labels if master else {}).get(node_service.ADDRESS_LABEL, "127.0.0.1"),
                "master_port": port,
                "world_size": len(siblings),
                "rank": ranks.index(r.task_index),
                "local_rank": sorted(on_node).index(r.task_index),
                "local_world_size": len(on_node),
            }
        Path(w.checkpoint_dir).mkdir(parents=True, exist_ok=True)
        env = {
            **{str(k): str(v) for k, v in spec.env.items()},
            **task_env(
                w.id, w.attempt, w.checkpoint_dir, tuple(r.devices), r.gpu_milli, r.gpu_memory_mib, world
            ),
        }
        log = self.settings.runs_dir / w.id / str(w.attempt) / f"task-{r.task_index}.log"
        return LaunchRequest(
            workload_id=w.id,
            attempt=w.attempt,
            task_index=r.task_index,
            node=r.node,
            command=list(spec.command),
            workdir=spec.workdir,
            env=env,
            devices=tuple(int(d) for d in r.devices),
            gpu_milli=r.gpu_milli,
            log_path=str(log),
            cpu_milli=r.cpu_milli,
            memory_mib=r.memory_mib,
            gang_nodes=tuple(x.node for x in gang) if len(gang) > 1 else (),
            gang_gpus=tuple(len(x.devices) for x in gang) if len(gang) > 1 else (),
        )


def _workloads() -> Select[WorkloadRow]:
    return select(WorkloadRow).options(defer(WorkloadRow.spec))  # specs come from the cache


def _gang_port(s: Session, w: WorkloadRow, siblings: Sequence[TaskRunRow]) -> int:
    """One rendezvous port per gang attempt, chosen once and kept on task 0's handle field."""
    first = min(siblings, key=lambda x: x.task_index)
    port = first.handle.get("master_port") if first.handle else None
    if port is None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if first.state == "launching" or first.state == "bound":
            first.handle = {**(first.handle or {}), "master_port": port}
    return int(port)
