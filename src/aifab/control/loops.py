"""The control loops: schedule (decide), dispatch (act), reconcile (observe and repair).

Each pass is small, restartable and reads its inputs from the database, so a server killed at
any point and started again carries on from what the database says:

* **schedule** builds a :class:`ClusterSnapshot` from the store, calls the pure ``run_cycle``,
  and writes its decisions as intent: ``task_runs`` rows in state ``bound`` for binds, state
  ``evicting`` for evictions, a pending reason on every waiting workload.
* **dispatch** acts on intent idempotently: a ``bound`` run becomes ``launching`` (written
  first), is launched, then ``running`` with the backend's handle; an ``evicting`` run (or one
  whose workload is being cancelled) is stopped with the workload's grace period.
* **reconcile** asks the backend what became of every running task, records exits, and
  finishes attempts: succeeded, failed (or retried), cancelled, or preempted and requeued.

A task bound into room that an evicted one still occupies waits until that one has exited, so
a node is never oversubscribed during a grace period.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, defer

from aifab.backends.base import Backend, BackendError, LaunchRequest, TaskState
from aifab.control import spec as specs
from aifab.control.db import Database
from aifab.control.db.models import ACTIVE_RUN_STATES, NodeRow, QueueRow, TaskRunRow, WorkloadRow
from aifab.control.services import nodes as node_service
from aifab.control.services.projects import put_state, queue_tree
from aifab.control.services.workloads import event, transition
from aifab.control.settings import Settings
from aifab.core.decisions import CycleResult
from aifab.core.snapshot import ClusterSnapshot
from aifab.core.workloads import TaskPlacement, Workload, WorkloadPhase
from aifab.scheduler import run_cycle

FULL_PASS_EVERY = 10.0  # seconds: a pass runs at least this often (clock-driven changes: min runtime)
LIVE_RUNS = ("running", "stopping")  # a process may exist
PREEMPTING = "preempting"  # reason_code while an evicted workload's tasks stop
# Specs are loaded (and validated) once per workload and cached: decoding 10,000 JSON specs on
# every pass was most of a pass.
_NO_SPEC = defer(WorkloadRow.spec)


class Controller:
    def __init__(self, db: Database, backend: Backend, settings: Settings) -> None:
        self.db = db
        self.backend = backend
        self.settings = settings
        self.wake = threading.Event()
        self.last_result: CycleResult | None = None
        self._spec_cache: dict[str, tuple[dict[str, Any], specs.JobSpec]] = {}
        self._base: dict[str, Workload] = {}
        # What the store looked like at the last schedule pass (see _fingerprint).
        self._last_mark: tuple[Any, ...] | None = None
        self._last_pass = 0.0

    # ----- inventory -----------------------------------------------------------------------
    def sync_inventory(self) -> None:
        with self.db.session() as s:
            node_service.sync_inventory(s, self.backend.name, self.backend.inventory())

    # ----- one pass of everything ----------------------------------------------------------
    def tick(self, now: float | None = None) -> None:
        self.reconcile_once()
        self.schedule_once(now)
        self.dispatch_once()

    def run(self, stop: threading.Event) -> None:
        """Loop until ``stop``: at least every ``schedule_interval`` and whenever woken."""
        while not stop.is_set():
            try:
                self.tick()
            except Exception as exc:  # a loop must survive one bad pass; the next one retries
                print(f"aifab: control loop pass failed: {exc!r}", flush=True)
            self.wake.wait(self.settings.schedule_interval)
            self.wake.clear()

    # ----- schedule ------------------------------------------------------------------------
    def _spec(self, row: WorkloadRow) -> specs.JobSpec:
        # A workload's spec never changes after submission: validate it once, not every pass.
        hit = self._spec_cache.get(row.id)
        if hit is None:
            hit = (row.spec, specs.spec_from_dict(row.spec, source=f"workload {row.id}"))
            if len(self._spec_cache) > 200_000:
                self._spec_cache.clear()
            self._spec_cache[row.id] = hit
        return hit[1]

    def schedule_once(self, now: float | None = None) -> CycleResult | None:
        """Snapshot (one short transaction), decide (no transaction: SQLite has one writer and
        submissions must not wait for the scheduler), persist (a second transaction that drops
        the whole cycle if any workload it decided about changed meanwhile)."""
        now = time.time() if now is None else now
        with self.db.read_session() as s:
            mark = _fingerprint(s)
            if mark == self._last_mark and now - self._last_pass < FULL_PASS_EVERY:
                return None  # nothing changed since a pass that saw this very state
            rows = list(
                s.scalars(
                    select(WorkloadRow)
                    .options(_NO_SPEC)
                    .where(WorkloadRow.phase.in_(("pending", "scheduled", "running")))
                )
            )
            if not any(r.phase == "pending" and not r.cancel_requested for r in rows):
                return None
            runs = _active_runs(s, [r.id for r in rows])
            workloads = [w for r in rows if (w := self._workload(r, runs.get(r.id, []), now)) is not None]
            snapshot = ClusterSnapshot(node_service.core_nodes(s), queue_tree(s), tuple(workloads), now)
            seen = {r.id: (r.phase, r.attempt, r.cancel_requested) for r in rows}
            said = {r.id: r.reason for r in rows if r.phase == "pending"}
        result = run_cycle(snapshot, self.settings.scheduler)
        self._last_mark, self._last_pass = mark, now
        with self.db.session() as s:
            decided = {e.workload_id for e in result.evictions} | {b.workload_id for b in result.binds}
            fresh = {
                r.id: r
                for r in s.scalars(select(WorkloadRow).options(_NO_SPEC).where(WorkloadRow.id.in_(decided)))
            }
            if any(
                wid not in fresh
                or seen.get(wid) != (fresh[wid].phase, fresh[wid].attempt, fresh[wid].cancel_requested)
                for wid in decided
            ):
                self.wake.set()  # decide again on what is there now
                result = replace(result, binds=(), evictions=())
            # Only the waiting workloads whose reason changed are loaded and written.
            changed = [wid for wid, why in result.pending.items() if wid in said and said[wid] != why.message]
            pending: dict[str, WorkloadRow] = {}
            for i in range(0, len(changed), 5000):
                q = select(WorkloadRow).options(_NO_SPEC).where(WorkloadRow.id.in_(changed[i : i + 5000]))
                pending.update((r.id, r) for r in s.scalars(q))
            runs = _active_runs(s, list(fresh))
            self._persist(s, result, {**pending, **fresh}, runs, now)
        self.last_result = result
        return result

    def _workload(self, row: WorkloadRow, runs: list[TaskRunRow], now: float) -> Workload | None:
        base = self._base.get(row.id)
        if base is None:  # immutable like the spec it comes from: built once per workload
            base = self._base[row.id] = self._spec(row).to_workload(row.id, row.submit_time)
            if len(self._base) > 200_000:
                self._base.clear()
        if row.phase == "pending":
            return None if row.cancel_requested else base
        current = [r for r in runs if r.attempt == row.attempt]
        placements = tuple(
            TaskPlacement(r.task_index, r.node, tuple(r.devices), r.gpu_milli, r.gpu_memory_mib)
            for r in current
        )
        if not placements:
            return None
        return replace(
            base,
            phase=WorkloadPhase.RUNNING,
            placements=placements,
            start_time=row.start_time or now,
            last_checkpoint_time=row.last_checkpoint_time,
        )

    def _persist(
        self,
        s: Session,
        result: CycleResult,
        rows: dict[str, WorkloadRow],
        runs: dict[str, list[TaskRunRow]],
        now: float,
    ) -> None:
        for ev in result.evictions:
            row = rows[ev.workload_id]
            if row.reason_code == PREEMPTING:
                continue  # already stopping
            row.reason_code, row.reason = PREEMPTING, f"{ev.cause.value}: {ev.reason}"
            for r in runs.get(row.id, []):
                if r.attempt == row.attempt and r.state in ("bound", "launching", "running"):
                    r.state = "evicting"
            event(
                s,
                row.id,
                "evict",
                f"{ev.cause.value}: {ev.reason} (would lose {ev.lost_gpu_seconds:.0f} GPU-s)",
                now,
            )
        by_workload: dict[str, list[Any]] = defaultdict(list)
        for b in result.binds:
            by_workload[b.workload_id].append(b)
        for wid, binds in by_workload.items():
            row = rows[wid]
            spec = self._spec(row)
            tasks = spec.to_workload(wid, row.submit_time).tasks
            row.attempt += 1
            for b in binds:
                t = tasks[b.task_index]
                s.add(
                    TaskRunRow(
                        workload_id=wid,
                        attempt=row.attempt,
                        task_index=b.task_index,
                        node=b.node,
                        devices=list(b.devices),
                        gpu_milli=b.gpu_milli,
                        gpu_memory_mib=b.gpu_memory_mib,
                        cpu_milli=t.cpu_milli,
                        memory_mib=t.memory_mib,
                        state="bound",
                    )
                )
            row.reason_code = row.reason = None
            where = ", ".join(f"task {b.task_index} on {b.node} GPUs {list(b.devices)}" for b in binds)
            transition(s, row, "scheduled", f"attempt {row.attempt}: {where}", now)
        for wid, reason in result.pending.items():
            waiting = rows.get(wid)
            if waiting is not None and waiting.phase == "pending" and waiting.reason != reason.message:
                waiting.reason_code, waiting.reason = reason.code.value, reason.message
        put_state(s, "fair_shares", {n: r.gpu for n, r in result.fair_shares.items()})

    # ----- dispatch ------------------------------------------------------------------------
    def dispatch_once(self) -> None:
        self._stop_requested()
        for run_id in self._claim_launches():
            self._launch(run_id)

    def _stop_requested(self) -> None:
        with self.db.session() as s:
            cancelling = select(WorkloadRow.id).where(WorkloadRow.cancel_requested.is_(True))
            rows = s.scalars(
                select(TaskRunRow).where(
                    (TaskRunRow.state == "evicting")
                    | (TaskRunRow.state.in_(("bound", "running")) & TaskRunRow.workload_id.in_(cancelling))
                )
            ).all()
            for r in rows:
                w = s.get(WorkloadRow, r.workload_id)
                grace = (
                    float(self._spec(w).checkpoint_grace) if w is not None else self.settings.default_grace
                )
                if r.handle:
                    try:
                        self.backend.stop(r.handle, grace)
                    except BackendError as exc:
                        event(s, r.workload_id, "error", f"stop task {r.task_index}: {exc}")
                    r.state, r.stop_deadline = "stopping", time.time() + grace
                else:  # never launched: nothing to stop
                    r.state, r.finished_at = "exited", time.time()

    def _claim_launches(self) -> list[int]:
        """Bound runs whose room is free, marked ``launching`` (intent written before acting)."""
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

    def _launch(self, run_id: int) -> None:
        with self.db.session() as s:
            r = s.get(TaskRunRow, run_id)
            if r is None or r.state != "launching":
                return
            w = s.get(WorkloadRow, r.workload_id)
            assert w is not None
            spec = self._spec(w)
            req = self._request(s, w, r, spec)
        try:
            handle = self.backend.launch(req)
        except BackendError as exc:
            handle, error = None, str(exc)
        with self.db.session() as s:
            r = s.get(TaskRunRow, run_id)
            w = s.get(WorkloadRow, r.workload_id) if r is not None else None
            if r is None or w is None:
                return
            now = time.time()
            if handle is None:
                r.state, r.exit_code, r.finished_at = "exited", 127, now
                event(s, w.id, "error", f"task {r.task_index} could not start: {error}", now)
                return
            kept = {k: v for k, v in (r.handle or {}).items() if k == "master_port"}  # the gang's rendezvous
            r.handle, r.state, r.started_at, r.log_path = {**handle, **kept}, "running", now, req.log_path
            event(s, w.id, "launched", f"task {r.task_index} started on {r.node}", now)
            siblings = s.scalars(
                select(TaskRunRow).where(TaskRunRow.workload_id == w.id, TaskRunRow.attempt == w.attempt)
            ).all()
            if w.phase == "scheduled" and all(x.state == "running" for x in siblings):
                w.start_time = now
                transition(s, w, "running", f"attempt {w.attempt}: all {len(siblings)} task(s) running", now)

    def _request(self, s: Session, w: WorkloadRow, r: TaskRunRow, spec: specs.JobSpec) -> LaunchRequest:
        from aifab.backends.local.executor import task_env

        siblings = s.scalars(
            select(TaskRunRow).where(TaskRunRow.workload_id == w.id, TaskRunRow.attempt == w.attempt)
        ).all()
        world: dict[str, str | int] | None = None
        if len(siblings) > 1:
            port = _gang_port(s, w, siblings)
            ranks = sorted(x.task_index for x in siblings)
            on_node = [x.task_index for x in siblings if x.node == r.node]
            world = {
                "master_addr": "127.0.0.1",
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
        )

    # ----- reconcile -----------------------------------------------------------------------
    def reconcile_once(self) -> None:
        self.backend.kill_overdue()
        with self.db.session() as s:
            live = s.scalars(select(TaskRunRow).where(TaskRunRow.state.in_(LIVE_RUNS))).all()
            touched: set[str] = set()
            for r in live:
                st = self.backend.status(r.handle)
                if st.state is TaskState.RUNNING:
                    continue
                r.exit_code = st.exit_code if st.state is TaskState.EXITED else None
                r.finished_at = st.finished_at or time.time()
                r.state = "exited" if st.state is TaskState.EXITED else "lost"
                how = f"exit code {st.exit_code}" if st.exit_code is not None else f"signal {st.signal}"
                event(s, r.workload_id, "exit", f"task {r.task_index} ended: {how}")
                touched.add(r.workload_id)
            self._checkpoints_and_limits(s)
            active = s.scalars(
                select(WorkloadRow).where(WorkloadRow.phase.in_(("scheduled", "running")))
            ).all()
            for w in active:
                self._finish_if_done(s, w)

    def _checkpoints_and_limits(self, s: Session) -> None:
        now = time.time()
        for w in s.scalars(select(WorkloadRow).where(WorkloadRow.phase == "running")):
            marker = Path(w.checkpoint_dir) / ".aifab" / "checkpoint.json"
            if marker.exists():
                try:
                    saved = float(json.loads(marker.read_text())["time"])
                except (ValueError, KeyError, OSError):
                    saved = None
                if saved is not None and (w.last_checkpoint_time or 0) < saved:
                    w.last_checkpoint_time = saved
            limit = self._spec(w).max_runtime
            if limit and w.start_time and now - w.start_time > limit and w.reason_code != "max_runtime":
                w.reason_code, w.reason = "max_runtime", f"ran longer than its max runtime of {limit:.0f} s"
                self._stop_attempt(s, w)
                event(s, w.id, "stop", w.reason, now)

    def _stop_attempt(self, s: Session, w: WorkloadRow) -> None:
        for r in s.scalars(
            select(TaskRunRow).where(TaskRunRow.workload_id == w.id, TaskRunRow.attempt == w.attempt)
        ):
            if r.state in ("bound", "launching", "running"):
                r.state = "evicting"  # dispatch stops it with the grace period

    def _finish_if_done(self, s: Session, w: WorkloadRow) -> None:
        runs = s.scalars(
            select(TaskRunRow).where(TaskRunRow.workload_id == w.id, TaskRunRow.attempt == w.attempt)
        ).all()
        if not runs:
            return
        ended = [r for r in runs if r.state in ("exited", "lost")]
        if len(ended) < len(runs):
            failed = [r for r in ended if r.exit_code != 0]
            if (
                failed
                and w.reason_code not in (PREEMPTING, "gang_failed", "max_runtime")
                and not w.cancel_requested
            ):
                # One member of a gang died: tear the rest down, then retry or fail it as a whole.
                w.reason_code, w.reason = (
                    "gang_failed",
                    f"task {failed[0].task_index} failed; stopping the gang",
                )
                self._stop_attempt(s, w)
                event(s, w.id, "stop", w.reason)
            return
        now = time.time()
        spec = self._spec(w)
        gpus = sum(r.gpu_milli * len(r.devices) for r in runs) / 1000
        if w.cancel_requested:
            w.end_time = now
            transition(s, w, "cancelled", "cancelled; all tasks stopped", now)
        elif w.reason_code == PREEMPTING:
            since = max(w.start_time or now, w.last_checkpoint_time or 0)
            w.lost_gpu_seconds += max(0.0, now - since) * gpus
            transition(s, w, "preempted", w.reason or "preempted", now)
            self._requeue(s, w, now, "requeued after preemption; resumes from its checkpoint directory")
        elif all(r.exit_code == 0 for r in runs) and w.reason_code != "max_runtime":
            w.end_time, w.reason_code, w.reason = now, None, None
            transition(s, w, "succeeded", "all tasks exited with code 0", now)
        else:
            w.failures += 1
            why = w.reason or ", ".join(
                f"task {r.task_index} exit {r.exit_code}" for r in runs if r.exit_code != 0
            )
            if w.failures <= int(spec.retries) and w.reason_code != "max_runtime":
                self._requeue(s, w, now, f"failed ({why}); retry {w.failures} of {spec.retries}")
            else:
                w.end_time = now
                transition(s, w, "failed", why or "failed", now)

    def _requeue(self, s: Session, w: WorkloadRow, now: float, message: str) -> None:
        w.queued_at, w.start_time, w.reason_code, w.reason = now, None, None, None
        transition(s, w, "pending", message, now)


def _fingerprint(s: Session) -> tuple[Any, ...]:
    """Changes whenever anything a cycle reads changes: every submission, phase change and cancel
    stamps ``updated_at``; queues and nodes likewise. An unchanged fingerprint means the last
    pass already answered this state (its binds and evictions change it), so a pass is skipped:
    with 10,000 queued, repeating the same pass every second only slowed the API."""
    w = s.execute(select(func.count(), func.max(WorkloadRow.updated_at))).one()
    q = s.execute(select(func.count(), func.max(QueueRow.created_at))).one()
    n = s.execute(select(func.count(), func.max(NodeRow.updated_at))).one()
    return (*w, *q, *n)


def _active_runs(s: Session, ids: Iterable[str]) -> dict[str, list[TaskRunRow]]:
    out: dict[str, list[TaskRunRow]] = defaultdict(list)
    wanted = set(ids)
    for r in s.scalars(select(TaskRunRow).where(TaskRunRow.state.in_(ACTIVE_RUN_STATES))):
        if r.workload_id in wanted:
            out[r.workload_id].append(r)
    return out


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
