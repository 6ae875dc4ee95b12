"""The reconcile loop: asks the engines what became of every live task and finishes attempts.

A pass has three steps, and only the last one writes:

1. read the live runs and what the store knows of running workloads (checkpoints, runtime
   limits), in a read-only transaction;
2. ask the engines, outside any transaction: an engine's round trip (``squeue``, a GCS read)
   must never hold SQLite's single write lock, which every submission waits for;
3. write what changed (exits, checkpoint times, runtime stops) and finish the attempts whose
   tasks ended: succeeded, failed (or retried), cancelled, or preempted and requeued. A pass in
   which nothing changed writes nothing.

Only the control loop's thread changes task runs, so what step 1 read is still true in step 3.
Engines forget finished tasks (``release``) after the commit, on a thread of their own.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Select, select
from sqlalchemy.orm import Session, defer

from aifab.backends.base import BackendError, EngineUnavailable, TaskState, TaskStatus
from aifab.backends.router import PoolRouter
from aifab.control import spec as specs
from aifab.control.db import Database
from aifab.control.db.models import TaskRunRow, WorkloadRow
from aifab.control.services.projects import Policies
from aifab.control.services.projects import policies as project_policies
from aifab.control.services.workloads import event, transition
from aifab.control.settings import Settings

LIVE_RUNS = ("running", "stopping")  # a process may exist
ENDED_RUNS = ("exited", "lost")
PREEMPTING = "preempting"  # reason_code while an evicted workload's tasks stop
NODE_LOST = "node_lost"  # reason_code while the rest of a gang with a lost task stops
STOPPING_REASONS = (PREEMPTING, "gang_failed", "max_runtime", NODE_LOST)
_CHUNK = 5000  # values per IN (...) list
_Row = TypeVar("_Row")


@dataclass(frozen=True, slots=True)
class _Live:
    id: int
    workload_id: str
    task_index: int
    handle: dict[str, Any]
    devices: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class _Seen:
    """What the store and the engines said in steps 1 and 2 of a pass."""

    answers: dict[int, TaskStatus | BackendError]  # run id → the engine's answer
    checkpoints: dict[str, float]  # workload id → a checkpoint newer than the store's
    overdue: dict[str, str]  # workload id → why it must stop now (its runtime cap)
    finishing: set[str]  # workloads with an ended task in their current attempt

    def quiet(self) -> bool:
        return not (self.answers or self.checkpoints or self.overdue or self.finishing)


class Reconciler:
    """The reconcile half of the :class:`~aifab.control.loops.Controller`."""

    db: Database
    backend: PoolRouter
    settings: Settings
    _spec: Callable[[WorkloadRow], specs.JobSpec]
    _policies: dict[str, Policies]
    _live_runs: int
    _releaser: ThreadPoolExecutor | None = None
    # Handles of tasks whose end a pass recorded, until a schedule pass has acted on the room
    # they freed (see Dispatcher.acknowledge_after_launches).
    _ended_handles: list[dict[str, Any]]
    # A task was found lost: its node may be gone, so the next schedule pass should not place
    # anything there before the inventory is taken again.
    _lost_since_inventory = False

    def reconcile_once(self) -> None:
        self.backend.kill_overdue()
        live, checkpoints, overdue, finishing = self._read()
        self._live_runs = len(live)
        seen = _Seen(self._ask(live), checkpoints, overdue, finishing)
        if seen.quiet():
            return
        released: list[dict[str, Any]] = []
        with self.db.session() as s:
            touched = self._record_answers(s, seen.answers)
            self._apply_checkpoints_and_limits(s, seen)
            wids = sorted(seen.finishing | touched)
            attempts = current_attempts(s, wids)
            for w in in_chunks(s, select(WorkloadRow).options(defer(WorkloadRow.spec)), WorkloadRow.id, wids):
                if w.phase in ("scheduled", "running"):
                    self._finish_if_done(s, w, attempts.get(w.id, []), released)
        if released:
            self._release_later(released)

    # ----- step 1: read ---------------------------------------------------------------------
    def _read(self) -> tuple[list[_Live], dict[str, float], dict[str, str], set[str]]:
        with self.db.read_session() as s:
            live = [
                _Live(r.id, r.workload_id, r.task_index, dict(r.handle or {}), tuple(r.devices))
                for r in s.scalars(select(TaskRunRow).where(TaskRunRow.state.in_(LIVE_RUNS)))
            ]
            checkpoints, overdue = self._checkpoints_and_limits(s)
            finishing = set(
                s.scalars(
                    select(WorkloadRow.id)
                    .join(
                        TaskRunRow,
                        (TaskRunRow.workload_id == WorkloadRow.id)
                        & (TaskRunRow.attempt == WorkloadRow.attempt),
                    )
                    .where(WorkloadRow.phase.in_(("scheduled", "running")), TaskRunRow.state.in_(ENDED_RUNS))
                    .distinct()
                )
            )
        return live, checkpoints, overdue, finishing

    def _checkpoints_and_limits(self, s: Session) -> tuple[dict[str, float], dict[str, str]]:
        now = time.time()
        checkpoints: dict[str, float] = {}
        overdue: dict[str, str] = {}
        running = select(WorkloadRow).options(defer(WorkloadRow.spec)).where(WorkloadRow.phase == "running")
        for w in s.scalars(running):
            saved = _checkpoint_time(Path(w.checkpoint_dir))
            if saved is not None and (w.last_checkpoint_time or 0) < saved:
                checkpoints[w.id] = saved
            limit = self._policy(s, w.project).runtime_cap(self._spec(w).max_runtime)
            if limit and w.start_time and now - w.start_time > limit and w.reason_code != "max_runtime":
                overdue[w.id] = f"ran longer than its max runtime of {limit:.0f} s"
        return checkpoints, overdue

    # ----- step 2: ask the engines -----------------------------------------------------------
    def _ask(self, live: Sequence[_Live]) -> dict[int, TaskStatus | BackendError]:
        """The answers that change something: an end, devices the engine picked, or an error
        that means nobody will ever say more. An engine that is away is asked again later."""
        out: dict[int, TaskStatus | BackendError] = {}
        for r in live:
            try:
                st = self.backend.status(r.handle)
            except EngineUnavailable:
                continue  # its engine is away: the task may well still run
            except BackendError as exc:
                out[r.id] = exc
                continue
            moved = st.devices is not None and tuple(st.devices) != r.devices
            if st.state is not TaskState.RUNNING or moved:
                out[r.id] = st
        return out

    # ----- step 3: write ---------------------------------------------------------------------
    def _record_answers(self, s: Session, answers: dict[int, TaskStatus | BackendError]) -> set[str]:
        touched: set[str] = set()
        for r in in_chunks(s, select(TaskRunRow), TaskRunRow.id, list(answers)):
            if r.state not in LIVE_RUNS:
                continue
            st = answers[r.id]
            if isinstance(st, BackendError):
                # The engine cannot tell (a handle it does not understand): the task counts as
                # lost and its workload runs again.
                event(s, r.workload_id, "error", f"task {r.task_index}: {st}")
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
            self._ended_handles.append(dict(r.handle or {}))
            if r.state == "lost":
                self._lost_since_inventory = True
                what = (
                    f"task {r.task_index} lost: its engine no longer has it (node {r.node} gone or drained?)"
                )
            elif st.exit_code is not None:
                what = f"task {r.task_index} ended: exit code {st.exit_code}"
            else:
                what = f"task {r.task_index} ended: signal {st.signal}"
            event(s, r.workload_id, "exit", what)
            touched.add(r.workload_id)
        return touched

    def _apply_checkpoints_and_limits(self, s: Session, seen: _Seen) -> None:
        for wid, saved in seen.checkpoints.items():
            w = s.get(WorkloadRow, wid)
            if w is not None and (w.last_checkpoint_time or 0) < saved:
                w.last_checkpoint_time = saved
        for wid, why in seen.overdue.items():
            w = s.get(WorkloadRow, wid)
            if w is None or w.phase != "running" or w.reason_code == "max_runtime":
                continue
            w.reason_code, w.reason = "max_runtime", why
            self._stop_attempt(s, w)
            event(s, w.id, "stop", w.reason)

    def _stop_attempt(self, s: Session, w: WorkloadRow) -> None:
        for r in s.scalars(
            select(TaskRunRow).where(TaskRunRow.workload_id == w.id, TaskRunRow.attempt == w.attempt)
        ):
            if r.state in ("bound", "launching", "running"):
                r.state = "evicting"  # dispatch stops it with the grace period

    def _finish_if_done(
        self, s: Session, w: WorkloadRow, runs: Sequence[TaskRunRow], released: list[dict[str, Any]]
    ) -> None:
        """``runs``: the tasks of the workload's current attempt."""
        if not runs:
            return
        ended = [r for r in runs if r.state in ENDED_RUNS]
        if len(ended) < len(runs):
            self._stop_rest_of_gang(s, w, ended)
            return
        now = time.time()
        gpus = sum(r.gpu_milli * len(r.devices) for r in runs) / 1000
        released.extend(r.handle for r in runs if r.handle)
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
            self._failed(s, w, runs, now)

    def _stop_rest_of_gang(self, s: Session, w: WorkloadRow, ended: Sequence[TaskRunRow]) -> None:
        if w.cancel_requested or w.reason_code in STOPPING_REASONS:
            return  # already being stopped
        lost = [r for r in ended if r.state == "lost"]
        failed = [r for r in ended if r.state == "exited" and r.exit_code != 0]
        if lost:
            # Not the workload's fault: stop the rest of the gang and run it again whole.
            w.reason_code = NODE_LOST
            w.reason = f"task {lost[0].task_index} was lost with node {lost[0].node}; stopping the gang"
        elif failed:
            # One member of a gang died: tear the rest down, then retry or fail it as a whole.
            w.reason_code, w.reason = "gang_failed", f"task {failed[0].task_index} failed; stopping the gang"
        else:
            return
        self._stop_attempt(s, w)
        event(s, w.id, "stop", w.reason)

    def _failed(self, s: Session, w: WorkloadRow, runs: Sequence[TaskRunRow], now: float) -> None:
        w.failures += 1
        why = w.reason or ", ".join(
            f"task {r.task_index} exit {r.exit_code}" for r in runs if r.exit_code != 0
        )
        retries = max(int(self._spec(w).retries), self._policy(s, w.project).retries)
        if w.failures <= retries and w.reason_code != "max_runtime":
            self._requeue(s, w, now, f"failed ({why}); retry {w.failures} of {retries}")
        else:
            w.end_time = now
            transition(s, w, "failed", why or "failed", now)

    def _release_later(self, handles: list[dict[str, Any]]) -> None:
        """The attempts are over: engines that keep per-task state (Ray's records and placement
        groups) may forget it. Logs stay readable; a failed release is retried by nobody, so it
        must not fail anything, and it must not delay the loop."""
        if self._releaser is None:
            self._releaser = ThreadPoolExecutor(max_workers=1, thread_name_prefix="aifab-release")
        self._releaser.submit(_release_all, self.backend, handles)

    def drain_releases(self) -> None:
        """Wait for releases handed over so far (at shutdown, and in tests)."""
        if self._releaser is not None:
            self._releaser.shutdown(wait=True)
            self._releaser = None

    def _policy(self, s: Session, project: str) -> Policies:
        got = self._policies.get(project)
        if got is None:
            self._policies = project_policies(s)
            got = self._policies.get(project, Policies())
        return got

    def _requeue(self, s: Session, w: WorkloadRow, now: float, message: str) -> None:
        w.queued_at, w.start_time, w.reason_code, w.reason = now, None, None, None
        transition(s, w, "pending", message, now)


def in_chunks(s: Session, query: Select[_Row], key: Any, values: Sequence[Any]) -> list[_Row]:
    """``query`` restricted to ``key IN values``, a few thousand values per statement."""
    out: list[_Row] = []
    for i in range(0, len(values), _CHUNK):
        out.extend(s.scalars(query.where(key.in_(values[i : i + _CHUNK]))))
    return out


def current_attempts(s: Session, workload_ids: Sequence[str]) -> dict[str, list[TaskRunRow]]:
    """The task runs of each workload's current attempt (two statements, not one per workload)."""
    runs = in_chunks(
        s,
        select(TaskRunRow)
        .join(WorkloadRow, WorkloadRow.id == TaskRunRow.workload_id)
        .where(TaskRunRow.attempt == WorkloadRow.attempt),
        TaskRunRow.workload_id,
        workload_ids,
    )
    out: dict[str, list[TaskRunRow]] = defaultdict(list)
    for r in sorted(runs, key=lambda r: (r.workload_id, r.task_index)):
        out[r.workload_id].append(r)
    return out


def _release_all(backend: PoolRouter, handles: list[dict[str, Any]]) -> None:
    for handle in handles:
        try:
            backend.release(handle)
        except BackendError:
            continue


def _checkpoint_time(checkpoint_dir: Path) -> float | None:
    """When the task last said "checkpoint saved" (``aifab.runtime``), if it ever did."""
    marker = checkpoint_dir / ".aifab" / "checkpoint.json"
    try:
        return float(json.loads(marker.read_text())["time"])
    except (OSError, ValueError, KeyError, TypeError):  # none yet, or being written
        return None
