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
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, defer

from aifab.backends.base import BackendError, EngineUnavailable, TaskState
from aifab.backends.router import PoolRouter
from aifab.control import spec as specs
from aifab.control.db import Database
from aifab.control.db.models import ACTIVE_RUN_STATES, NodeRow, QueueRow, TaskRunRow, WorkloadRow
from aifab.control.dispatch import Dispatcher
from aifab.control.services import nodes as node_service
from aifab.control.services.projects import Policies, put_state, queue_tree
from aifab.control.services.projects import policies as project_policies
from aifab.control.services.workloads import event, transition
from aifab.control.settings import Settings
from aifab.core.decisions import CycleResult
from aifab.core.snapshot import ClusterSnapshot
from aifab.core.workloads import (
    TaskPlacement,
    TopologyConstraint,
    TopologyMode,
    Workload,
    WorkloadPhase,
)
from aifab.scheduler import run_cycle

FULL_PASS_EVERY = 10.0  # seconds: a pass runs at least this often (clock-driven changes: min runtime)
LIVE_RUNS = ("running", "stopping")  # a process may exist
PREEMPTING = "preempting"  # reason_code while an evicted workload's tasks stop
NODE_LOST = "node_lost"  # reason_code while the rest of a gang with a lost task stops
# Specs are loaded (and validated) once per workload and cached: decoding 10,000 JSON specs on
# every pass was most of a pass.
_NO_SPEC = defer(WorkloadRow.spec)


class Controller(Dispatcher):
    def __init__(self, db: Database, backend: PoolRouter, settings: Settings) -> None:
        self.db = db
        self.backend = backend
        self._last_inventory = 0.0
        self._live_runs = 0
        self.pool_errors: dict[str, str] = {}
        self._policies: dict[str, Policies] = {}
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
        """Ask every pool for its nodes. A pool that cannot answer keeps its rows (its tasks may
        still run) but takes no new work until it answers again; the error is kept for
        ``aifab nodes`` and printed once per change."""
        with self.db.session() as s:
            for row in s.scalars(select(NodeRow)):
                self.backend.remember_node(row.name, row.pool)
        inventories = self.backend.inventories()
        with self.db.session() as s:
            errors = {}
            for inv in inventories:
                node_service.sync_inventory(s, inv)
                if inv.error:
                    errors[inv.pool] = inv.error
            if errors != self.pool_errors:
                for pool, why in errors.items():
                    if self.pool_errors.get(pool) != why:
                        print(f"aifab: pool {pool}: {why}", flush=True)
                for pool in set(self.pool_errors) - set(errors):
                    print(f"aifab: pool {pool} answers again", flush=True)
                put_state(s, "pool_errors", errors)
                self.pool_errors = errors
        self._last_inventory = time.time()

    # ----- one pass of everything ----------------------------------------------------------
    def tick(self, now: float | None = None) -> None:
        if time.time() - self._last_inventory >= self.settings.inventory_interval:
            self.sync_inventory()
        self.reconcile_once()
        self.schedule_once(now)
        self.dispatch_once()

    def run(self, stop: threading.Event) -> None:
        """Loop until ``stop``: whenever woken, every ``busy_interval`` while tasks run (an exit
        is noticed, and its room reused, that much sooner), else every ``schedule_interval``."""
        while not stop.is_set():
            try:
                self.tick()
            except Exception as exc:  # a loop must survive one bad pass; the next one retries
                print(f"aifab: control loop pass failed: {exc!r}", flush=True)
            busy = self._live_runs > 0
            self.wake.wait(self.settings.busy_interval if busy else self.settings.schedule_interval)
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
            self._policies = project_policies(s)
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
            base = self._for_pools(self._spec(row).to_workload(row.id, row.submit_time))
            self._base[row.id] = base
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

    def _for_pools(self, w: Workload) -> Workload:
        """What pools and project policies add to a workload: the project's pool when the spec
        names none, and its guaranteed runtime; a shared GPU only where the pool's engine can
        share one; a gang inside one pool (its tasks must reach each other through one engine)."""
        policy = self._policies.get(w.queue, Policies())
        if w.node_pool is None and policy.node_pool is not None:
            w = replace(w, node_pool=policy.node_pool)
        if policy.min_runtime > w.min_runtime:
            w = replace(w, min_runtime=policy.min_runtime)
        if any(t.gpu.is_shared for t in w.tasks):
            w = replace(w, node_selector={**w.node_selector, node_service.SHARING_LABEL: "true"})
        loose = w.topology is None or w.topology.mode is TopologyMode.PREFERRED
        if len(w.tasks) > 1 and len(self.backend.pools) > 1 and w.node_pool is None and loose:
            w = replace(w, topology=TopologyConstraint("pool", TopologyMode.REQUIRED))
        return w

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

    # ----- reconcile -----------------------------------------------------------------------
    def reconcile_once(self) -> None:
        self.backend.kill_overdue()
        with self.db.session() as s:
            live = s.scalars(select(TaskRunRow).where(TaskRunRow.state.in_(LIVE_RUNS))).all()
            self._live_runs = len(live)
            touched: set[str] = set()
            for r in live:
                try:
                    st = self.backend.status(r.handle)
                except EngineUnavailable:
                    continue  # its engine is away: the task may well still run; ask again later
                except BackendError as exc:
                    # The engine cannot tell (a handle it does not understand): nothing will
                    # ever say more, so the task counts as lost and its workload runs again.
                    event(s, r.workload_id, "error", f"task {r.task_index}: {exc}")
                    r.state, r.finished_at = "lost", time.time()
                    touched.add(r.workload_id)
                    continue
                if st.devices is not None and list(st.devices) != list(r.devices):
                    r.devices = list(st.devices)  # the engine picked them (Slurm's GRES)
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
            limit = self._policy(s, w.project).runtime_cap(self._spec(w).max_runtime)
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
            if w.cancel_requested or w.reason_code in (PREEMPTING, "gang_failed", "max_runtime", NODE_LOST):
                return  # already being stopped
            lost = [r for r in ended if r.state == "lost"]
            failed = [r for r in ended if r.state == "exited" and r.exit_code != 0]
            if lost:
                # Not the workload's fault: stop the rest of the gang and run it again whole.
                w.reason_code, w.reason = (
                    NODE_LOST,
                    f"task {lost[0].task_index} was lost with node {lost[0].node}; stopping the gang",
                )
            elif failed:
                # One member of a gang died: tear the rest down, then retry or fail it as a whole.
                w.reason_code, w.reason = (
                    "gang_failed",
                    f"task {failed[0].task_index} failed; stopping the gang",
                )
            else:
                return
            self._stop_attempt(s, w)
            event(s, w.id, "stop", w.reason)
            return
        now = time.time()
        spec = self._spec(w)
        gpus = sum(r.gpu_milli * len(r.devices) for r in runs) / 1000
        self._release(runs)
        if w.cancel_requested:
            w.end_time = now
            transition(s, w, "cancelled", "cancelled; all tasks stopped", now)
        elif w.reason_code == PREEMPTING:
            since = max(w.start_time or now, w.last_checkpoint_time or 0)
            w.lost_gpu_seconds += max(0.0, now - since) * gpus
            transition(s, w, "preempted", w.reason or "preempted", now)
            self._requeue(s, w, now, "requeued after preemption; resumes from its checkpoint directory")
        elif w.reason_code == NODE_LOST or (
            any(r.state == "lost" for r in runs) and w.reason_code not in ("gang_failed", "max_runtime")
        ):
            gone = next((r for r in runs if r.state == "lost"), runs[0])
            since = max(w.start_time or now, w.last_checkpoint_time or 0)
            w.lost_gpu_seconds += max(0.0, now - since) * gpus
            self._requeue(
                s,
                w,
                now,
                f"requeued: task {gone.task_index} was lost with node {gone.node} (its node or engine "
                "went away); resumes from its checkpoint directory",
            )
        elif all(r.exit_code == 0 for r in runs) and w.reason_code != "max_runtime":
            w.end_time, w.reason_code, w.reason = now, None, None
            transition(s, w, "succeeded", "all tasks exited with code 0", now)
        else:
            w.failures += 1
            why = w.reason or ", ".join(
                f"task {r.task_index} exit {r.exit_code}" for r in runs if r.exit_code != 0
            )
            retries = max(int(spec.retries), self._policy(s, w.project).retries)
            if w.failures <= retries and w.reason_code != "max_runtime":
                self._requeue(s, w, now, f"failed ({why}); retry {w.failures} of {retries}")
            else:
                w.end_time = now
                transition(s, w, "failed", why or "failed", now)

    def _release(self, runs: Sequence[TaskRunRow]) -> None:
        """The attempt is over: engines that keep per-task state (Ray's actors and placement
        groups) may forget it. Logs stay readable; a failed release is retried by nobody, so
        it must not fail the attempt."""
        for r in runs:
            if r.handle:
                try:
                    self.backend.release(r.handle)
                except BackendError:
                    continue

    def _policy(self, s: Session, project: str) -> Policies:
        got = self._policies.get(project)
        if got is None:
            self._policies = project_policies(s)
            got = self._policies.get(project, Policies())
        return got

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
