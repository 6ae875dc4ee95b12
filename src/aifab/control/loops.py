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

import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, defer

from aifab.backends.router import PoolRouter
from aifab.control import spec as specs
from aifab.control.db import Database
from aifab.control.db.models import ACTIVE_RUN_STATES, NodeRow, QueueRow, TaskRunRow, WorkloadRow
from aifab.control.dispatch import Dispatcher
from aifab.control.reconcile import PREEMPTING, Reconciler
from aifab.control.services import nodes as node_service
from aifab.control.services.projects import Policies, put_state, queue_tree
from aifab.control.services.projects import policies as project_policies
from aifab.control.services.workloads import event, transition
from aifab.control.settings import Settings
from aifab.core.decisions import CycleResult, ReasonCode
from aifab.core.snapshot import ClusterSnapshot
from aifab.core.workloads import (
    TaskPlacement,
    TopologyConstraint,
    TopologyMode,
    Workload,
    WorkloadPhase,
)
from aifab.scheduler import run_cycle
from aifab.scheduler.explain import Reasons

ENDS_WATCH_S = 0.005  # seconds between looks at the backends' ends journals while tasks run
FULL_PASS_EVERY = 10.0  # seconds: a pass runs at least this often (clock-driven changes: min runtime)
# Specs are loaded (and validated) once per workload and cached: decoding 10,000 JSON specs on
# every pass was most of a pass.
_NO_SPEC = defer(WorkloadRow.spec)


class Controller(Dispatcher, Reconciler):
    def __init__(self, db: Database, backend: PoolRouter, settings: Settings) -> None:
        self.db = db
        self.backend = backend
        self._last_inventory = 0.0
        self._live_runs = 0
        self.pool_errors: dict[str, str] = {}
        self._policies: dict[str, Policies] = {}
        self.settings = settings
        self.wake = threading.Event()
        self.ended = threading.Event()  # a task ended since the last tick began (see _watch_ends)
        self.last_result: CycleResult | None = None
        self._spec_cache: dict[str, tuple[dict[str, Any], specs.JobSpec]] = {}
        self._base: dict[str, Workload] = {}
        self._requeued: dict[tuple[str, int], Workload] = {}  # with attained service (requeued)
        # What the store looked like at the last schedule pass (see _fingerprint).
        self._last_mark: tuple[Any, ...] | None = None
        self._last_pass = 0.0
        self._next_schedule_at = 0.0  # monotonic; see tick(paced=True)
        self._schedule_deferred = False
        self._ended_handles = []
        self._pass_launches = []
        self._written_shares: dict[str, int] | None = None  # the fair shares last put in the store

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
        self._lost_since_inventory = False

    # ----- one pass of everything ----------------------------------------------------------
    def tick(self, now: float | None = None, *, paced: bool = False) -> None:
        """One pass of every loop. ``paced`` (the server's loop): a schedule pass starts no sooner
        after the previous one than that one took, so a stream of submissions, each of which
        changes what there is to decide, leaves the API at least half of the time; except right
        after tasks ended, whose room would otherwise stay idle (ends come no faster than the
        cluster runs tasks)."""
        if time.time() - self._last_inventory >= self.settings.inventory_interval:
            self.sync_inventory()
        self.ended.clear()  # the reconcile below sees every end noted so far
        self.reconcile_once()
        if self._lost_since_inventory:
            self.sync_inventory()
        self._schedule_deferred = (
            paced and not self._ended_handles and time.monotonic() < self._next_schedule_at
        )
        acted_on: list[dict[str, Any]] = []  # ends whose room this pass gives out
        if not self._schedule_deferred:
            acted_on, self._ended_handles = self._ended_handles, []
            started = time.monotonic()
            self.schedule_once(now)
            ended = time.monotonic()
            self._next_schedule_at = ended + (ended - started)
        self.dispatch_once(wait=not paced)
        self.acknowledge_after_launches(acted_on)

    def run(self, stop: threading.Event) -> None:
        """Loop until ``stop``: whenever woken, every ``busy_interval`` while tasks run (an exit
        is noticed, and its room reused, that much sooner), else every ``schedule_interval``."""
        watcher = threading.Thread(target=self._watch_ends, args=(stop,), name="aifab-ends", daemon=True)
        watcher.start()
        while not stop.is_set():
            try:
                self.tick(paced=True)
            except Exception as exc:  # a loop must survive one bad pass; the next one retries
                print(f"aifab: control loop pass failed: {exc!r}", flush=True)
            wait = self.settings.busy_interval if self._live_runs > 0 else self.settings.schedule_interval
            if self._schedule_deferred or self.wake.is_set():
                # Woken during the pass, or its schedule step was put off: go again as soon as
                # pacing allows (a wake meanwhile would ask for the same).
                self.wake.clear()
                stop.wait(min(wait, max(0.0, self._next_schedule_at - time.monotonic())))
                continue
            self.wake.wait(wait)
            self.wake.clear()
        watcher.join()
        self.drain_launches()
        self.drain_releases()

    def _watch_ends(self, stop: threading.Event) -> None:
        """Wake the loop as soon as a backend notes a task's end in its ends journal (see
        :mod:`aifab.backends.ends`), rather than at the next ``busy_interval``: the freed room is
        given to the next workload that much sooner."""
        last: tuple[object, ...] | None = None
        while not stop.wait(ENDS_WATCH_S):
            if self._live_runs == 0:
                continue
            try:
                mark = self.backend.exit_marks()
            except Exception:  # a hint only: the loop's own passes still find every end
                continue
            if last is not None and mark != last:
                self.ended.set()
                self.wake.set()
            last = mark

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

    def _load_specs(self, s: Session, ids: list[str]) -> None:
        """Validate the specs of workloads new to this process, a few thousand per statement."""
        for i in range(0, len(ids), 5000):
            for wid, spec in s.execute(
                select(WorkloadRow.id, WorkloadRow.spec).where(WorkloadRow.id.in_(ids[i : i + 5000]))
            ):
                if len(self._spec_cache) > 200_000:
                    self._spec_cache.clear()
                self._spec_cache[wid] = (spec, specs.spec_from_dict(spec, source=f"workload {wid}"))

    def _load_attained(self, s: Session, rows: list[Any]) -> None:
        """GPU-seconds each requeued workload ran in its earlier attempts (job orders such as
        priority_las read it), once per (workload, attempt)."""
        todo = [r for r in rows if (r.id, r.attempt) not in self._requeued]
        if len(self._requeued) > 200_000:
            self._requeued.clear()
        ran = TaskRunRow.gpu_milli * (TaskRunRow.finished_at - TaskRunRow.started_at) / 1000.0
        for i in range(0, len(todo), 5000):
            chunk = todo[i : i + 5000]
            q = (
                select(TaskRunRow.workload_id, func.sum(ran))
                .where(TaskRunRow.workload_id.in_([r.id for r in chunk]), TaskRunRow.finished_at.is_not(None))
                .group_by(TaskRunRow.workload_id)
            )
            got = dict(s.execute(q).all())
            for r in chunk:
                attained = max(0.0, float(got.get(r.id) or 0.0))
                self._requeued[(r.id, r.attempt)] = replace(self._base_of(r), attained_gpu_seconds=attained)

    def schedule_once(self, now: float | None = None) -> CycleResult | None:
        """Snapshot (one short transaction), decide (no transaction: SQLite has one writer and
        submissions must not wait for the scheduler), persist (a second transaction that drops
        the whole cycle if any workload it decided about changed meanwhile)."""
        now = time.time() if now is None else now
        with self.db.read_session() as s:
            mark = _fingerprint(s)
            if mark == self._last_mark and now - self._last_pass < FULL_PASS_EVERY:
                return None  # nothing changed since a pass that saw this very state
            # Plain columns, not ORM objects: building 10,000 of those was most of a pass.
            rows: list[Any] = list(
                s.execute(
                    select(*_SNAPSHOT_COLUMNS).where(
                        WorkloadRow.phase.in_(("pending", "scheduled", "running"))
                    )
                )
            )
            if not any(r.phase == "pending" and not r.cancel_requested for r in rows):
                return None
            self._load_specs(s, [r.id for r in rows if r.id not in self._spec_cache])
            runs = _active_runs(s, [r.id for r in rows])
            self._policies = project_policies(s)
            self._load_attained(s, [r for r in rows if r.phase == "pending" and r.attempt > 0])
            workloads = [w for r in rows if (w := self._workload(r, runs.get(r.id, []), now)) is not None]
            snapshot = ClusterSnapshot(node_service.core_nodes(s), queue_tree(s), tuple(workloads), now)
            pool_errors = node_service.pool_errors(s)
            seen = {r.id: (r.phase, r.attempt, r.cancel_requested) for r in rows}
            said = {r.id: r.reason for r in rows if r.phase == "pending"}
        result = run_cycle(snapshot, self.settings.scheduler)
        self._last_mark, self._last_pass = mark, now
        words = _with_pool_notes(_words(result), pool_errors, workloads)
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
            changed = [wid for wid, (_, message) in words.items() if wid in said and said[wid] != message]
            pending: dict[str, WorkloadRow] = {}
            for i in range(0, len(changed), 5000):
                q = select(WorkloadRow).options(_NO_SPEC).where(WorkloadRow.id.in_(changed[i : i + 5000]))
                pending.update((r.id, r) for r in s.scalars(q))
            runs = _active_runs(s, list(fresh))
            shares = self._persist(s, result, words, {**pending, **fresh}, runs, now)
        if shares is not None:  # committed
            self._written_shares = shares
        self.last_result = result
        return result

    def _base_of(self, row: WorkloadRow) -> Workload:
        base = self._base.get(row.id)
        if base is None:  # immutable like the spec it comes from: built once per workload
            base = self._for_pools(self._spec(row).to_workload(row.id, row.submit_time))
            if len(self._base) > 200_000:
                self._base.clear()
            self._base[row.id] = base
        return base

    def _workload(self, row: WorkloadRow, runs: list[TaskRunRow], now: float) -> Workload | None:
        base = self._base_of(row)
        if row.phase == "pending":
            if row.cancel_requested:
                return None
            if row.attempt > 0:  # requeued: its earlier runs count as attained service
                return self._requeued.get((row.id, row.attempt), base)
            return base
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
        words: Mapping[str, tuple[ReasonCode, str]],
        rows: dict[str, WorkloadRow],
        runs: dict[str, list[TaskRunRow]],
        now: float,
    ) -> dict[str, int] | None:
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
        for wid, waiting in rows.items():
            said = words.get(wid)
            if said is not None and waiting.phase == "pending" and waiting.reason != said[1]:
                waiting.reason_code, waiting.reason = said[0].value, said[1]
        shares = {n: r.gpu for n, r in result.fair_shares.items()}
        if shares == self._written_shares:  # most passes change none: skip the row's read and write
            return None
        put_state(s, "fair_shares", shares)
        return shares  # the caller remembers them once the transaction commits


_SNAPSHOT_COLUMNS = (
    WorkloadRow.id,
    WorkloadRow.phase,
    WorkloadRow.attempt,
    WorkloadRow.cancel_requested,
    WorkloadRow.reason,
    WorkloadRow.submit_time,
    WorkloadRow.start_time,
    WorkloadRow.last_checkpoint_time,
)


def _with_pool_notes(
    words: Mapping[str, tuple[ReasonCode, str]], errors: Mapping[str, str], workloads: Iterable[Workload]
) -> Mapping[str, tuple[ReasonCode, str]]:
    """A waiting workload that could use a pool whose engine cannot be asked says so (its own
    pool, or any pool when it names none): the scheduler only sees that the pool has no
    schedulable node; the control plane knows why."""
    if not errors:
        return words
    out = dict(words)
    for w in workloads:
        if w.phase is not WorkloadPhase.PENDING or w.id not in out:
            continue
        pools = sorted(errors) if w.node_pool is None else [w.node_pool] if w.node_pool in errors else []
        if pools:
            code, message = out[w.id]
            down = "; ".join(f"pool {p} is unreachable ({errors[p]})" for p in pools)
            out[w.id] = (code, f"{message}; {down}, its nodes count again once its engine answers")
    return out


def _words(result: CycleResult) -> Mapping[str, tuple[ReasonCode, str]]:
    """Every waiting workload's (code, message), without making a PendingReason for each."""
    if isinstance(result.pending, Reasons):
        return result.pending.load()
    return {wid: (r.code, r.message) for wid, r in result.pending.items()}


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
