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

A cycle is **skipped** (not run) when it cannot change anything:

1. no workload is pending: nothing can be bound, and reclaim, preempt and consolidate only
   ever act on behalf of a pending workload; or
2. the previous cycle evicted nothing, nothing happened since it (no arrival, completion,
   node change), and the policy does not depend on the clock (:func:`is_time_dependent`):
   the scheduler is deterministic and its own binds were its answer to exactly this state
   (it had already considered every pending job), so it would decide nothing new; or
3. the cycle cannot evict (the config has no ``reclaim`` action nor preemption by job order,
   and ``preempt`` is absent or no pending workload outranks a running preemptible one) and the free GPUs of all up nodes
   together are fewer than the smallest pending gang needs: nothing can be bound, and
   consolidation cannot create room that does not exist. This is what makes non-evicting
   policies cheap on a saturated cluster: arrivals into a full cluster cost no cycle; or
4. the cycle cannot evict (as in 3), only arrivals happened since the last cycle that ran
   (no completion, eviction or node change released anything) and either none of the new
   jobs fits in the free GPUs, or the policy is strict FIFO (no fairness, ``fifo`` order, no
   backfill) and some job was already waiting: jobs that waited then did not fit in at least
   the room there is now (arrivals add demand, never room, and with quotas fixed or absent
   they cannot raise anyone's share), so only a new job could start, and under strict FIFO
   a new job queues behind the old ones.

5. the policy may evict (reclaim), but the previous cycle decided nothing at all, only
   arrivals happened since (no completion, eviction or node change), and every new job is
   *inert*: it needs more GPUs than are free (it cannot start and consolidation cannot help
   it), it would not be within its project's fair share (so it cannot reclaim), it outranks no
   running preemptible job (so it cannot preempt), and each queue on its path already asked for
   more of every resource the job requests than its fair share: water-filling caps such a
   queue by the level, not by its demand, so the new demand moves no fair share (a property
   test checks this) and no other queue can reclaim anything new. The quiet cycle before was
   the scheduler's answer to the same state without these jobs. On a saturated cluster with a
   backlog this skips most arrival-triggered cycles of the quota-aware policies.

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

import heapq
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import replace

import numpy as np

from aifab.core.decisions import Bind, CycleResult, EvictionCause
from aifab.core.nodes import Node, NodeState
from aifab.core.resources import GPU_MILLI, Resources
from aifab.core.snapshot import ClusterSnapshot
from aifab.core.workloads import GpuRequestKind, TaskPlacement, Workload, WorkloadPhase
from aifab.scheduler.config import SchedulerConfig
from aifab.sim.model import Scenario, SimJob
from aifab.sim.outcome import JobRecord, SimOutcome, Timeline

SchedulerFn = Callable[[ClusterSnapshot, SchedulerConfig], CycleResult]
ProgressFn = Callable[[float], None]  # called with the simulated time now and then

ARRIVAL, COMPLETION, NODE_DOWN, NODE_UP, CYCLE = 0, 1, 2, 3, 4
FAILURE_CAUSE = "node_failure"


class SimulationError(RuntimeError):
    """The scheduler decided something impossible (a bug), or the simulation cannot end."""


def default_scheduler() -> SchedulerFn:
    """The production scheduling cycle, imported late so the simulator loads without it."""
    from aifab.scheduler import run_cycle

    fn: SchedulerFn = run_cycle
    return fn


def is_time_dependent(config: SchedulerConfig) -> bool:
    """Whether a cycle's decisions can change with nothing but the clock moving on.

    LAS orders by attained service and SRTF by remaining time, both of which move while jobs
    run; time-based fairness decays usage with the clock.
    """
    return config.job_order in ("las", "srtf") or config.time_fairness_half_life is not None


class _Job:
    """Mutable per-job state; ``wl`` is the immutable Workload the scheduler sees."""

    __slots__ = (
        "epoch",
        "gpus",
        "idx",
        "milli",
        "needs_restore",
        "pidx",
        "queued_at",
        "rec",
        "remaining",
        "resume",
        "run_start",
        "spec",
        "wl",
    )

    def __init__(self, idx: int, spec: SimJob, pidx: int, rec: JobRecord) -> None:
        self.idx = idx
        self.spec = spec
        self.wl = spec.workload
        self.pidx = pidx
        self.rec = rec
        self.milli = spec.workload.gpu_milli_requested
        self.gpus = self.milli / GPU_MILLI
        self.remaining = spec.work
        self.run_start = 0.0
        self.resume = 0.0
        self.epoch = 0
        self.needs_restore = False
        self.queued_at = spec.submit_time


class Simulator:
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
        self.active: dict[str, _Job] = {}  # arrival order: pending and running
        self.pending: set[str] = set()
        # For skip rule 3: free GPU milli on up nodes, pending gang sizes and priorities.
        self.free_milli = sum(n.gpu_count for n in self.nodes) * GPU_MILLI
        self.pending_milli: dict[int, int] = {}
        self.pending_prio: dict[int, int] = {}
        self.running_prio: dict[int, int] = {}  # preemptible running workloads only
        self.can_reclaim = "reclaim" in config.actions
        # For skip rule 5: the last cycle's fair shares and demands, whether it decided nothing,
        # and whether every arrival since is inert. Each project's path to the root.
        self.last_fair: Mapping[str, Resources] = {}
        self.last_demand: Mapping[str, Resources] = {}
        self.last_quiet = False
        self.inert = True
        self.paths = {p: [p, *scenario.queues.ancestors(p)] for p in scenario.queues.leaves()}
        self.can_preempt = "preempt" in config.actions
        self.strict_fifo = (
            config.fairness.value == "none" and config.job_order == "fifo" and not config.backfill
        )
        # For skip rule 4: what happened since the last cycle that ran.
        self.released = True
        self.new_min_need = math.inf
        self.waited = False
        self.running_on: list[set[str]] = [set() for _ in self.nodes]
        self.heap: list[tuple[float, int, int, int, int]] = []
        self.seq = 0
        self.now = 0.0
        self.dirty = True  # something changed since the last cycle
        self.cycle_at: float | None = None  # time of the one scheduled CYCLE event
        self.last_cycle = -math.inf
        self.time_dependent = is_time_dependent(config) or any(
            j.workload.min_runtime > 0 for j in scenario.jobs
        )
        self.usage: dict[str, float] = {}  # decayed GPU usage per project (time fairness)
        self.alloc_now = [0.0] * len(self.projects)
        self.usage_t = 0.0
        self.timeline = Timeline()
        self.records: list[JobRecord] = []
        self.jobs: list[_Job] = []
        self.intervals: list[tuple[int, float, float]] = []
        self.counters: dict[str, float] = {
            "events": 0,
            "cycles": 0,
            "cycles_skipped": 0,
            "cycles_skipped_inert": 0,  # by rule 5 (a subset of cycles_skipped)
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
            self.jobs.append(_Job(i, spec, self.pindex[spec.workload.queue], rec))
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

    @staticmethod
    def _count(counts: dict[int, int], key: int, delta: int) -> None:
        n = counts.get(key, 0) + delta
        if n:
            counts[key] = n
        else:
            del counts[key]

    def _set_pending(self, job: _Job, pending: bool) -> None:
        d = 1 if pending else -1
        wid = job.wl.id
        if pending:
            self.pending.add(wid)
        else:
            self.pending.discard(wid)
        self._count(self.pending_milli, job.milli, d)
        self._count(self.pending_prio, job.wl.priority, d)

    def _set_running(self, job: _Job, running: bool) -> None:
        if job.wl.preemptible:
            self._count(self.running_prio, job.wl.priority, 1 if running else -1)

    def _nothing_can_change(self) -> bool:
        """Skip rules 3, 4 and 5 (see the module docstring)."""
        if self.can_preempt and self.config.preempt_by_job_order:
            # Preemption by job order (LAS, SRTF) can evict between equal priorities.
            return False
        if self.can_reclaim:
            skip = self.last_quiet and not self.released and self.inert and not self.time_dependent
            self.counters["cycles_skipped_inert"] += skip
            return skip
        if self.can_preempt and self.running_prio and max(self.pending_prio) > min(self.running_prio):
            return False
        if self.free_milli < min(self.pending_milli):
            return True
        if self.released:
            return False
        return self.new_min_need > self.free_milli or (self.strict_fifo and self.waited)

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
        started = time.perf_counter()
        done = 0
        total = len(self.jobs)
        progress_every = 2000
        heap = self.heap
        while done < total:
            if not heap:
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
            self.counters["events"] += 1
            if kind == ARRIVAL:
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
                self._cycle()
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

    # -- events ---------------------------------------------------------------------------

    def _is_inert(self, job: _Job) -> bool:
        """Rule 5: this new job can change nothing the last (quiet) cycle decided."""
        wl = job.wl
        gang = wl.tasks[: wl.gang_size]
        if not self.last_fair or any(t.gpu.kind is GpuRequestKind.MEMORY for t in gang):
            return False
        need = (
            sum(t.gpu.milli_nominal() for t in gang),
            sum(t.cpu_milli for t in gang),
            sum(t.memory_mib for t in gang),
        )
        if need[0] <= 0 or need[0] <= self.free_milli:
            return False  # it might start now
        project = wl.queue
        fair = self.last_fair.get(project)
        if fair is None or round(self.alloc_now[job.pidx] * GPU_MILLI) + need[0] <= fair.gpu:
            return False  # within its fair share: it might reclaim
        if self.can_preempt and self.running_prio and wl.priority > min(self.running_prio):
            return False  # it might preempt
        for q in self.paths[project]:
            f, d = self.last_fair.get(q), self.last_demand.get(q)
            if f is None or d is None:
                return False
            for k, (fk, dk) in enumerate(((f.gpu, d.gpu), (f.cpu, d.cpu), (f.memory, d.memory))):
                if need[k] > 0 and dk <= fk:
                    return False  # more demand here could raise a fair share
        return True

    def _arrive(self, job: _Job) -> None:
        if self.inert and self.can_reclaim:
            self.inert = self._is_inert(job)
        self.active[job.wl.id] = job
        self._set_pending(job, True)
        self.new_min_need = min(self.new_min_need, job.milli)
        job.queued_at = self.now
        self._record(job.pidx, 0.0, job.gpus)
        self.dirty = True

    def _complete(self, job: _Job) -> None:
        self._release(job)
        self._set_running(job, False)
        del self.active[job.wl.id]
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
        if not self.pending or not (self.dirty or self.time_dependent) or self._nothing_can_change():
            self.counters["cycles_skipped"] += 1
            return
        self.counters["cycles"] += 1
        self.last_cycle = now
        self.dirty = False
        self.released = False
        self.new_min_need = math.inf
        snapshot = ClusterSnapshot(
            nodes=self.nodes_tuple,
            queues=self.scenario.queues,
            workloads=self._workloads(now),
            now=now,
            usage_history=self._usage_history(now),
        )
        result = self.scheduler(snapshot, self.config)
        self.last_fair, self.last_demand = result.fair_shares, result.demands
        self.last_quiet = not result.binds and not result.evictions
        self.inert = True
        evicted = self._apply(result)
        self.waited = bool(self.pending)
        if evicted and self.pending:
            # Evictions free room that the scheduler may only use in a later cycle.
            self.dirty = True
            self._request_cycle(now + self.sim.follow_up)
        elif self.time_dependent and self.pending:
            self._request_cycle(now + self.sim.cycle_period)

    def _workloads(self, now: float) -> tuple[Workload, ...]:
        """The active workloads; running ones refreshed only where the policy reads the clock."""
        if not self.time_dependent:
            return tuple(j.wl for j in self.active.values())
        out = []
        for j in self.active.values():
            wl = j.wl
            if wl.phase is WorkloadPhase.RUNNING:
                ran = now - j.run_start
                # Attained service grows while running; the stored value is as of run start.
                wl = replace(wl, attained_gpu_seconds=wl.attained_gpu_seconds + ran * j.gpus)
            out.append(wl)
        return tuple(out)

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
        job.wl = replace(
            wl,
            phase=WorkloadPhase.RUNNING,
            placements=tuple(placements),
            start_time=now,
            last_checkpoint_time=job.resume,
        )
        self._set_pending(job, False)
        self._set_running(job, True)
        if job.rec.first_start is None:
            job.rec.first_start = now
        self.intervals.append((job.idx, job.queued_at, now))
        self.counters["binds"] += 1
        self._record(job.pidx, job.gpus, -job.gpus)
        self._push(job.resume + job.remaining, COMPLETION, job.idx, job.epoch)

    def _release(self, job: _Job) -> None:
        wid = job.wl.id
        for pl in job.wl.placements:
            ni = self.node_index[pl.node]
            task = job.wl.tasks[pl.task_index]
            self.states[ni].release(
                pl.devices, pl.gpu_milli, pl.gpu_memory_mib, task.cpu_milli, task.memory_mib
            )
            self.free_milli += pl.gpu_milli * len(pl.devices)
            self.running_on[ni].discard(wid)

    def _evict(self, job: _Job, cause: str) -> None:
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
        job.wl = replace(
            job.wl,
            phase=WorkloadPhase.PENDING,
            placements=(),
            start_time=None,
            last_checkpoint_time=None,
            attained_gpu_seconds=attained,
            expected_duration=expected,
        )
        self._set_pending(job, True)
        self._record(job.pidx, -job.gpus, job.gpus)
        self.dirty = True
        self.released = True
        if cause == FAILURE_CAUSE:
            self.counters["failure_evictions"] += 1
        elif cause == EvictionCause.CONSOLIDATE:
            self.counters["moves"] += 1
        elif cause == EvictionCause.RECLAIM:
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
