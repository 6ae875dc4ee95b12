"""Discrete-event simulator: a virtual clock, a cluster model, and the real scheduling cycle.

Events (a heap ordered by time, then by insertion):

* ``ARRIVAL``: the job's pending workload joins the active set.
* ``COMPLETION``: a running job has done all its work; its GPUs are released. Completion
  events carry the run's epoch, so one made stale by an eviction is ignored.
* ``NODE_DOWN`` / ``NODE_UP`` (only with a :class:`~aifab.sim.model.FailureModel`): a down
  node is marked unschedulable and every job with a task on it is evicted and requeued.
* ``CYCLE``: a scheduling cycle, see below.

All events at one time are applied first, then at most one cycle runs (coalescing). A cycle
calls the very ``run_cycle(snapshot, config)`` that production uses, then applies its
evictions and then its binds exactly as decided; a bind that does not fit the simulator's own
:class:`~aifab.core.nodes.NodeState` book-keeping (or lands on a down node, or binds a task
twice) raises :class:`SimulationError`: that is a scheduler bug, never an outcome.

A cycle is **skipped** (not run) when it provably cannot change anything: the rules and
their book-keeping are in :mod:`aifab.sim.skip`.

Clock-dependent policies (LAS, SRTF, time-based fairness) additionally get a cycle every
``cycle_period`` seconds while jobs wait. After a cycle that evicted something, another one
runs ``follow_up`` seconds later, because the room it freed may only be used by a later
cycle.

Evictions: the victim loses the progress since its last checkpoint (checkpoints are taken
every ``checkpoint_interval`` seconds of progress after each (re)start; none means it restarts
from scratch) and, when it starts again, first spends ``restart_overhead`` seconds restoring
before it progresses. Lost GPU-seconds = (rolled-back progress + restore time spent) x GPUs,
so allocated GPU-time = useful work + lost, exactly.
"""

from __future__ import annotations

import gc
import heapq
import math
import time
from collections.abc import Callable
from dataclasses import replace

import numpy as np

from aifab.core.decisions import Bind, CycleResult, EvictionCause
from aifab.core.nodes import Node, NodeState
from aifab.core.resources import GPU_MILLI, Resources
from aifab.core.snapshot import ClusterSnapshot
from aifab.core.workloads import GpuRequestKind, TaskPlacement, WorkloadPhase
from aifab.scheduler.config import SchedulerConfig
from aifab.sim.model import Scenario
from aifab.sim.outcome import JobRecord, SimOutcome, Timeline
from aifab.sim.skip import SkipRules
from aifab.sim.state import ActiveWorkloads, Clock, JobState, changed, running_view

SchedulerFn = Callable[[ClusterSnapshot, SchedulerConfig], CycleResult]
ProgressFn = Callable[[float], None]  # called with the simulated time now and then

ARRIVAL, COMPLETION, NODE_DOWN, NODE_UP, CYCLE = 0, 1, 2, 3, 4
FAILURE_CAUSE = "node_failure"


class SimulationError(RuntimeError):
    """The scheduler decided something impossible (a bug), or the simulation cannot end."""


def default_scheduler() -> SchedulerFn:
    """The production scheduling cycle, imported late so the simulator loads without it.

    Each call gives a function with its own :class:`~aifab.scheduler.memo.CycleMemo`: the
    cycle updates what it derived from the last snapshot instead of deriving it again (the
    decisions are the same; see that module). One replay, one memo.
    """
    from aifab.scheduler import run_cycle
    from aifab.scheduler.memo import CycleMemo

    memo = CycleMemo()

    def fn(snapshot: ClusterSnapshot, config: SchedulerConfig) -> CycleResult:
        return run_cycle(snapshot, config, memo=memo)

    return fn


def is_time_dependent(config: SchedulerConfig) -> bool:
    """Whether a cycle's decisions can change with nothing but the clock moving on.

    LAS orders by attained service and SRTF by remaining time, both of which move while jobs
    run: that matters when a pending job may preempt a running one by job order (a pending
    job's own key does not move while it waits). Time-based fairness decays usage with the
    clock.
    """
    from aifab.scheduler.plugins.orders import KEYS_MOVE_WHILE_RUNNING

    moving = config.preempt_by_job_order and config.job_order in KEYS_MOVE_WHILE_RUNNING
    return moving or config.time_fairness_half_life is not None


class Simulator(SkipRules):
    """One replay of a scenario under one scheduler configuration."""

    def __init__(
        self,
        scenario: Scenario,
        config: SchedulerConfig,
        *,
        policy: str = "custom",
        scheduler: SchedulerFn | None = None,
        progress: ProgressFn | None = None,
        strict: bool = False,
    ) -> None:
        self.scenario = scenario
        self.strict = strict  # raise, rather than stop, when jobs can never start
        self.config = config
        self.policy = policy
        self.scheduler = scheduler or default_scheduler()
        self.progress = progress
        self.sim = scenario.sim
        self.nodes: list[Node] = list(scenario.nodes)
        self.node_index = {n.name: i for i, n in enumerate(self.nodes)}
        self.states = [NodeState(n, i) for i, n in enumerate(self.nodes)]
        self.nodes_tuple = tuple(self.nodes)
        self.projects = scenario.queues.leaves()
        self.pindex = {p: i for i, p in enumerate(self.projects)}
        self.active: dict[str, JobState] = {}  # arrival order: pending and running
        self.live = ActiveWorkloads()  # the same, each job's current workload
        self.pending: set[str] = set()
        self.running_on: list[set[str]] = [set() for _ in self.nodes]
        self.heap: list[tuple[float, int, int, int, int]] = []
        self.arrivals_left = len(scenario.jobs)
        self.nodes_down = 0
        self.cycled_idle = False  # see _stalled
        self.seq = 0
        self.now = 0.0
        self.clock = Clock()  # what RunningViews read: the time of the cycle being run
        self.dirty = True  # something changed since the last cycle
        self.cycle_at: float | None = None  # time of the one scheduled CYCLE event
        self.last_cycle = -math.inf
        self.time_dependent = is_time_dependent(config) or any(
            j.workload.min_runtime > 0 for j in scenario.jobs
        )
        self._init_skip(config, scenario)
        self.usage: dict[str, float] = {}  # decayed GPU usage per project (time fairness)
        self.alloc_now = [0.0] * len(self.projects)
        self.usage_t = 0.0
        self.timeline = Timeline()
        self.records: list[JobRecord] = []
        self.jobs: list[JobState] = []
        self.intervals: list[tuple[int, float, float]] = []
        self.counters: dict[str, float] = {
            "events": 0,
            "cycles": 0,
            "cycles_skipped": 0,
            "cycles_skipped_inert": 0,  # by rule 5 (a subset of cycles_skipped)
            "cycles_skipped_blocked": 0,  # by rule 9 (a subset of cycles_skipped)
            "binds": 0,
            "preemptions": 0,
            "reclaims": 0,
            "moves": 0,
            "failure_evictions": 0,
            "node_failures": 0,
        }
        self.rng = np.random.default_rng(self.sim.failures.seed) if self.sim.failures else None
        for i, spec in enumerate(scenario.jobs):
            if spec.workload.queue not in self.pindex:
                raise SimulationError(f"job {spec.id}: unknown project {spec.workload.queue!r}")
            rec = JobRecord(spec.id, spec.workload.queue, spec.gpus, spec.submit_time, spec.work)
            self.records.append(rec)
            self.jobs.append(JobState(i, spec, self.pindex[spec.workload.queue], rec))
            self._push(spec.submit_time, ARRIVAL, i)
        if self.sim.failures is not None:
            for i in range(len(self.nodes)):
                self._push(self._next_failure(0.0), NODE_DOWN, i)

    # -- event plumbing -------------------------------------------------------------------

    def _push(self, t: float, kind: int, a: int, b: int = 0) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, kind, a, b))

    def _next_failure(self, after: float) -> float:
        assert self.rng is not None and self.sim.failures is not None
        return after + float(self.rng.exponential(self.sim.failures.mtbf))

    def _request_cycle(self, t: float) -> None:
        """Schedule one cycle at ``t`` or later (never closer than min_cycle_interval)."""
        t = max(t, self.last_cycle + self.sim.min_cycle_interval)
        if self.cycle_at is not None and self.cycle_at <= t:
            return
        self.cycle_at = t
        self._push(t, CYCLE, 0)

    def _decay_usage(self, now: float) -> None:
        """Fold the allocation held since the last update into the decayed averages."""
        hl = self.config.time_fairness_half_life
        dt = now - self.usage_t
        if hl is None or dt <= 0:
            return
        decay = 2.0 ** (-dt / hl)
        for i, p in enumerate(self.projects):
            self.usage[p] = self.usage.get(p, 0.0) * decay + self.alloc_now[i] * (1.0 - decay)
        self.usage_t = now

    def _record(self, pidx: int, alloc: float, pend: float) -> None:
        if alloc:
            self._decay_usage(self.now)
            self.alloc_now[pidx] += alloc
        tl = self.timeline
        tl.t.append(self.now)
        tl.p.append(pidx)
        tl.alloc.append(alloc)
        tl.pend.append(pend)

    # -- main loop ------------------------------------------------------------------------

    def run(self) -> SimOutcome:
        """Replay to the end. The cyclic garbage collector is paused meanwhile (and switched
        back on if it was on): a replay allocates millions of short-lived objects, all freed
        by reference counting (neither the event loop nor a cycle makes reference cycles; a
        test keeps it so), and the collections their churn triggers cost about 5%."""
        was_on = gc.isenabled()
        gc.disable()
        try:
            return self._run()
        finally:
            if was_on:
                gc.enable()

    def _run(self) -> SimOutcome:
        started = time.perf_counter()
        done = 0
        total = len(self.jobs)
        progress_every = 2000
        heap = self.heap
        while done < total:
            if not heap or self._stalled():
                # Nothing will ever change again: what still waits can never start (e.g. a
                # job bigger than its project's quota under static quotas).
                if self.strict:
                    raise SimulationError(
                        f"{len(self.pending)} job(s) can never start (t={self.now:.0f}s): "
                        f"e.g. {sorted(self.pending)[:3]}"
                    )
                break
            t, _seq, kind, a, b = heapq.heappop(heap)
            self.now = t
            self.cycled_idle = False
            self.counters["events"] += 1
            if kind == ARRIVAL:
                self.arrivals_left -= 1
                self._arrive(self.jobs[a])
            elif kind == COMPLETION:
                job = self.jobs[a]
                if job.epoch == b and job.wl.phase is WorkloadPhase.RUNNING:
                    self._complete(job)
                    done += 1
            elif kind == NODE_DOWN:
                self._node_down(a)
            elif kind == NODE_UP:
                self._node_up(a)
            elif kind == CYCLE and self.cycle_at == t:
                self.cycle_at = None
                idle = not self._any_running() and not self.nodes_down
                self._cycle()
                self.cycled_idle = idle and not self._any_running()
            if kind != CYCLE and self.dirty and self.pending and (not heap or heap[0][0] > t):
                # Last event at this time changed something: a cycle is due. (A cycle never
                # asks for itself here, so a skipped one cannot loop; it asks in _cycle.)
                self._request_cycle(t)
            if self.progress is not None and self.counters["events"] % progress_every == 0:
                self.progress(t)
        if self.progress is not None:
            self.progress(self.now)
        wall = time.perf_counter() - started
        open_intervals = [
            (self.active[w].idx, self.active[w].queued_at, self.now) for w in sorted(self.pending)
        ]
        self.counters["unfinished"] = total - done
        self.counters["wall_seconds"] = wall
        self.counters["sim_seconds"] = self.now
        return SimOutcome(
            scenario=self.scenario.name,
            policy=self.policy,
            projects=list(self.projects),
            deserved=[self.scenario.queues.get(p).deserved.gpu / GPU_MILLI for p in self.projects],
            capacity=float(self.scenario.capacity_gpus),
            jobs=self.records,
            pending_intervals=self.intervals,
            timeline=self.timeline,
            counters=self.counters,
            wall_seconds=wall,
            open_intervals=open_intervals,
        )

    def _any_running(self) -> bool:
        return len(self.active) > len(self.pending)  # active jobs are pending or running

    def _stalled(self) -> bool:
        """With node failures the events never run out, so a replay whose waiting jobs can
        never start would not end. It ends here when no job will arrive and the last cycle
        (run or skipped) saw every node up and no job running, and started nothing: a later
        cycle sees the same cluster or less of it (failures only take room away), and with
        nothing running the clock-dependent inputs of job order and preemption (attained
        service, minimum runtimes of running jobs) cannot make room, so it would not start
        anything either. Not with time-based fairness: decaying usage moves fair shares.
        ``cycled_idle`` is cleared by every event, so it only holds right after such a cycle.
        """
        return (
            self.cycled_idle
            and self.arrivals_left == 0
            and self.sim.failures is not None
            and self.config.time_fairness_half_life is None
        )

    # -- events ---------------------------------------------------------------------------

    def _arrive(self, job: JobState) -> None:
        self._note_arrival(job)
        self.active[job.wl.id] = job
        self.live.put(job.wl)
        self._set_pending(job, True)
        job.queued_at = self.now
        self._record(job.pidx, 0.0, job.gpus)
        self.dirty = True

    def _complete(self, job: JobState) -> None:
        self._release(job)
        self._set_running(job, False)
        del self.active[job.wl.id]
        self.live.remove(job.wl.id)
        job.rec.end = self.now
        job.remaining = 0.0
        self._record(job.pidx, -job.gpus, 0.0)
        self.dirty = True
        self.released = True

    def _node_down(self, i: int) -> None:
        assert self.sim.failures is not None
        node = self.nodes[i]
        self.counters["node_failures"] += 1
        for wid in sorted(self.running_on[i]):
            self._evict(self.active[wid], FAILURE_CAUSE)
        self.nodes[i] = replace(node, schedulable=False)
        self.nodes_down += 1
        self.free_milli -= node.gpu_count * GPU_MILLI  # empty now: every job was evicted
        self.nodes_tuple = tuple(self.nodes)
        self.timeline.cap_t.append(self.now)
        self.timeline.cap.append(-float(node.gpu_count))
        self._push(self.now + self.sim.failures.repair, NODE_UP, i)
        self.dirty = True
        self.released = True

    def _node_up(self, i: int) -> None:
        node = self.nodes[i]
        self.nodes[i] = replace(node, schedulable=True)
        self.nodes_down -= 1
        self.free_milli += node.gpu_count * GPU_MILLI
        self.nodes_tuple = tuple(self.nodes)
        self.timeline.cap_t.append(self.now)
        self.timeline.cap.append(float(node.gpu_count))
        self._push(self._next_failure(self.now), NODE_DOWN, i)
        self.dirty = True
        self.released = True

    # -- the scheduling cycle -------------------------------------------------------------

    def _cycle(self) -> None:
        now = self.now
        self.as_quiet = False
        if not self.pending or not (self.dirty or self.time_dependent) or self._nothing_can_change():
            self.counters["cycles_skipped"] += 1
            if self.as_quiet:
                # Rule 8: the cycle would have decided nothing; carry on as after one that did.
                self._start_cycle()
                self.last_quiet = self.inert = True
                self._end_cycle(False)
            return
        self.counters["cycles"] += 1
        self._start_cycle()
        self.clock.now = now  # what RunningViews read (see _bind)
        workloads, changes = self.live.snapshot()
        snapshot = ClusterSnapshot(
            nodes=self.nodes_tuple,
            queues=self.scenario.queues,
            workloads=workloads,
            now=now,
            usage_history=self._usage_history(now),
            changes=changes,
        )
        try:
            result = self.scheduler(snapshot, self.config)
        finally:
            workloads.close()
        self.last_fair, self.last_demand = result.fair_shares, result.demands
        self.last_quiet = not result.binds and not result.evictions
        self._note_result(self.last_quiet, result.stats)
        self.inert = True
        evicted = self._apply(result)
        self._end_cycle(evicted)

    def _start_cycle(self) -> None:
        self.last_cycle = self.now
        self.dirty = False
        self._note_cycle()

    def _end_cycle(self, evicted: bool) -> None:
        self.waited = bool(self.pending)
        if evicted and self.pending:
            # Evictions free room that the scheduler may only use in a later cycle.
            self.dirty = True
            self._request_cycle(self.now + self.sim.follow_up)
        elif self.time_dependent and self.pending:
            self._request_cycle(self.now + self.sim.cycle_period)

    def _usage_history(self, now: float) -> dict[str, Resources]:
        """Per-project GPU usage decayed with the configured half-life (empty when disabled).

        The scheduler compares it with the cluster's capacity, so it is an exponentially
        weighted *average* allocation in GPUs (weight 2^(-age/half_life)), not GPU-seconds.
        It is brought up to date at every change of allocation, so each update is exact.
        """
        if self.config.time_fairness_half_life is None:
            return {}
        self._decay_usage(now)
        return {p: Resources(gpu=round(v * GPU_MILLI)) for p, v in self.usage.items()}

    def _apply(self, result: CycleResult) -> bool:
        """Apply evictions, then binds, exactly as decided. Returns whether it evicted."""
        evicted = False
        for ev in result.evictions:
            job = self.active.get(ev.workload_id)
            if job is None or job.wl.phase is not WorkloadPhase.RUNNING:
                raise SimulationError(
                    f"cycle at t={self.now}: evicts {ev.workload_id!r}, which is not running"
                )
            self._evict(job, ev.cause)
            evicted = True
        by_workload: dict[str, list[Bind]] = {}
        for bind in result.binds:
            by_workload.setdefault(bind.workload_id, []).append(bind)
        for wid, binds in by_workload.items():
            self._bind(wid, binds)
        # Binds alone leave nothing a re-run would decide differently (the scheduler already
        # saw every pending job), so they do not mark the state dirty.
        self.dirty = False
        return evicted

    def _bind(self, wid: str, binds: list[Bind]) -> None:
        job = self.active.get(wid)
        where = f"cycle at t={self.now}: bind of {wid!r}"
        if job is None or wid not in self.pending:
            raise SimulationError(f"{where}: the workload is not pending")
        wl = job.wl
        seen: set[int] = set()
        placements: list[TaskPlacement] = []
        for b in binds:
            if not 0 <= b.task_index < len(wl.tasks) or b.task_index in seen:
                raise SimulationError(f"{where}: bad or repeated task index {b.task_index}")
            seen.add(b.task_index)
            ni = self.node_index.get(b.node)
            if ni is None or not self.nodes[ni].schedulable:
                raise SimulationError(f"{where}: node {b.node!r} is unknown or down")
            task = wl.tasks[b.task_index]
            req = task.gpu
            ok = (
                (
                    req.kind is GpuRequestKind.WHOLE
                    and len(b.devices) == req.count
                    and b.gpu_milli == GPU_MILLI
                )
                or (req.kind is GpuRequestKind.FRACTION and len(b.devices) == 1 and b.gpu_milli >= req.milli)
                or (
                    req.kind is GpuRequestKind.MEMORY
                    and len(b.devices) == 1
                    and b.gpu_memory_mib >= req.memory_mib
                )
                or (req.kind is GpuRequestKind.NONE and not b.devices)
            )
            if not ok:
                raise SimulationError(f"{where}: devices {b.devices} x {b.gpu_milli} do not match {req}")
            try:
                self.states[ni].allocate(
                    b.devices, b.gpu_milli, b.gpu_memory_mib, task.cpu_milli, task.memory_mib
                )
            except (ValueError, IndexError) as exc:
                raise SimulationError(f"{where}: {exc}") from exc
            placements.append(TaskPlacement(b.task_index, b.node, b.devices, b.gpu_milli, b.gpu_memory_mib))
            self.free_milli -= b.gpu_milli * len(b.devices)
            self.running_on[ni].add(wid)
        if len(placements) < wl.gang_size:
            raise SimulationError(f"{where}: binds {len(placements)} of a gang of {wl.gang_size}")
        now = self.now
        overhead = self.sim.restart_overhead if job.needs_restore else 0.0
        job.run_start = now
        job.resume = now + overhead
        job.epoch += 1
        job.wl = changed(
            wl,
            phase=WorkloadPhase.RUNNING,
            placements=tuple(placements),
            start_time=now,
            last_checkpoint_time=job.resume,
        )
        # Where the policy reads the clock, a running workload is a RunningView: its attained
        # service grows while it runs.
        self.live.put(running_view(job.wl, self.clock, now, job.gpus) if self.time_dependent else job.wl)
        self._set_pending(job, False)
        self._set_running(job, True)
        if job.rec.first_start is None:
            job.rec.first_start = now
        self.intervals.append((job.idx, job.queued_at, now))
        self.counters["binds"] += 1
        self._record(job.pidx, job.gpus, -job.gpus)
        self._push(job.resume + job.remaining, COMPLETION, job.idx, job.epoch)

    def _release(self, job: JobState) -> None:
        wid = job.wl.id
        for pl in job.wl.placements:
            ni = self.node_index[pl.node]
            task = job.wl.tasks[pl.task_index]
            self.states[ni].release(
                pl.devices, pl.gpu_milli, pl.gpu_memory_mib, task.cpu_milli, task.memory_mib
            )
            self.free_milli += pl.gpu_milli * len(pl.devices)
            self.running_on[ni].discard(wid)

    def _evict(self, job: JobState, cause: str) -> None:
        now = self.now
        self._release(job)
        self._set_running(job, False)
        interval = job.wl.checkpoint_interval
        progressed = max(0.0, min(now - job.resume, job.remaining))
        saved = math.floor(progressed / interval) * interval if interval and interval > 0 else 0.0
        ran = now - job.run_start
        job.remaining -= saved
        lost = (ran - saved) * job.gpus
        job.rec.lost_gpu_seconds += lost
        job.rec.evictions += 1
        job.epoch += 1  # the scheduled completion is now stale
        job.needs_restore = True
        job.queued_at = now
        attained = job.wl.attained_gpu_seconds + ran * job.gpus
        expected = job.wl.expected_duration
        if expected is not None:
            # Keep the SRTF oracle (expected - attained / GPUs) equal to the true remaining
            # time, now that part of the attained service was lost.
            expected = attained / max(1.0, job.gpus) + job.remaining + self.sim.restart_overhead
        job.wl = changed(
            job.wl,
            phase=WorkloadPhase.PENDING,
            placements=(),
            start_time=None,
            last_checkpoint_time=None,
            attained_gpu_seconds=attained,
            expected_duration=expected,
        )
        self.live.put(job.wl)
        self._set_pending(job, True)
        self._record(job.pidx, -job.gpus, job.gpus)
        self.dirty = True
        self.released = True
        if cause == FAILURE_CAUSE:
            self.counters["failure_evictions"] += 1
        elif cause == EvictionCause.CONSOLIDATE:
            self.counters["moves"] += 1
        elif cause in (EvictionCause.RECLAIM, EvictionCause.GUARANTEE):
            self.counters["reclaims"] += 1
            self.counters["preemptions"] += 1
        else:
            self.counters["preemptions"] += 1


def simulate(
    scenario: Scenario,
    config: SchedulerConfig,
    *,
    policy: str = "custom",
    scheduler: SchedulerFn | None = None,
    progress: ProgressFn | None = None,
    strict: bool = False,
) -> SimOutcome:
    """Replay ``scenario`` under ``config`` until every job has finished.

    If nothing can change any more while jobs still wait (they can never start under this
    policy), the replay stops there and reports them as ``unfinished``; ``strict`` raises
    :class:`SimulationError` instead.
    """
    sim = Simulator(scenario, config, policy=policy, scheduler=scheduler, progress=progress, strict=strict)
    return sim.run()
