"""The dispatch loop: acts on the scheduler's intent, idempotently.

A ``bound`` run becomes ``launching`` (written first), is launched, then ``running`` with the
backend's handle; an ``evicting`` run (or one whose workload is being cancelled) is stopped with
the workload's grace period. A bound task waits until the device room it was given is really
free (an evicted task may still hold it during its grace period).
"""

from __future__ import annotations

import socket
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from aifab.backends.base import BackendError, EngineUnavailable, LaunchRequest
from aifab.backends.router import PoolRouter
from aifab.control import spec as specs
from aifab.control.db import Database
from aifab.control.db.models import NodeRow, TaskRunRow, WorkloadRow
from aifab.control.services import nodes as node_service
from aifab.control.services.workloads import event, transition
from aifab.control.settings import Settings

LAUNCH_WORKERS = 16  # engine calls in flight at once while dispatching
# What one launch came to: run id, request, handle (None: it did not start), error, engine away.
Outcome = tuple[int, LaunchRequest, "dict[str, Any] | None", str, bool]


class Dispatcher:
    """The dispatch half of the :class:`~aifab.control.loops.Controller`."""

    db: Database
    backend: PoolRouter
    settings: Settings
    _spec: Callable[[WorkloadRow], specs.JobSpec]

    def dispatch_once(self) -> None:
        self._stop_requested()
        claimed = self._claim_launches()
        if claimed:
            self._launch_all(claimed)

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
                    except EngineUnavailable:
                        continue  # still asked for: tried again on the next pass
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

    def _launch_all(self, run_ids: list[int]) -> None:
        """Launch claimed runs: requests built in one transaction, engines called concurrently
        (a remote engine's round trip, e.g. one ``sbatch``, would otherwise be paid once per task
        in a row), outcomes written in one transaction. A gang's tasks launch in order, in one
        worker: an engine may reserve the whole gang when its first task launches."""
        with self.db.session() as s:
            requests: dict[str, list[tuple[int, LaunchRequest]]] = defaultdict(list)
            for run_id in run_ids:
                r = s.get(TaskRunRow, run_id)
                if r is None or r.state != "launching":
                    continue
                w = s.get(WorkloadRow, r.workload_id)
                assert w is not None
                requests[w.id].append((run_id, self._request(s, w, r, self._spec(w))))
        groups = list(requests.values())
        if len(groups) == 1:
            outcomes = self._launch_group(groups[0])
        else:
            with ThreadPoolExecutor(max_workers=min(LAUNCH_WORKERS, len(groups))) as pool:
                outcomes = [o for done in pool.map(self._launch_group, groups) for o in done]
        with self.db.session() as s:
            for outcome in outcomes:
                self._record_launch(s, *outcome)

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
        run_id: int,
        req: LaunchRequest,
        handle: dict[str, Any] | None,
        error: str,
        lost: bool,
    ) -> None:
        r = s.get(TaskRunRow, run_id)
        w = s.get(WorkloadRow, r.workload_id) if r is not None else None
        if r is None or w is None:
            return
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
