"""When the simulator skips a scheduling cycle: only when it provably cannot change anything.

A cycle is **skipped** (not run) when:

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
   a new job queues behind the old ones; or
5. the policy may evict (reclaim), but the previous cycle decided nothing at all, only
   arrivals happened since (no completion, eviction or node change), and every new job is
   *inert*: it needs more GPUs than are free (it cannot start and consolidation cannot help
   it), it would not be within its project's fair share (so it cannot reclaim), it outranks no
   running preemptible job (so it cannot preempt), and each queue on its path already asked for
   more of every resource the job requests than its fair share: water-filling caps such a
   queue by the level, not by its demand, so the new demand moves no fair share (a property
   test checks this) and no other queue can reclaim anything new. The quiet cycle before was
   the scheduler's answer to the same state without these jobs. On a saturated cluster with a
   backlog this skips most arrival-triggered cycles of the quota-aware policies; or
6. the policy has no fairness and no backfill and cannot evict (as in 3), and the first
   pending job in job order (the head of the one global line) needs more GPUs than are free:
   allocate tries the head first, refuses it for capacity before anything else, and makes
   every other job wait behind it; consolidation only serves fragmented jobs that fit in the
   free GPUs. This is what keeps strict FIFO cheap while a big job waits for the cluster to
   drain: completions that free too little cost no cycle; or
7. static quotas, the cycle cannot evict (as in 3), only arrivals happened since the last
   cycle that ran, and every new job either needs more GPUs than are free or would take its
   project beyond its deserved GPUs (the static quota refuses it): as in 4, old jobs cannot
   start in the room there is now and quotas are fixed, so only a new job could start; or
8. the policy preempts by job order (Tiresias-style LAS, SRTF) with no fairness, no reclaim, no
   consolidation and no time-based fairness, no pending job outranks a running preemptible one
   (none has a higher priority than a running one, and every running job's key now is below
   the first pending key: :mod:`aifab.sim.outrank` keeps bounds of the running keys so that
   this is not a walk over them), and nothing can be bound: the free GPUs are fewer than the
   smallest pending job needs, or nothing was released since the last cycle that ran and every
   job that arrived since needs more GPUs than are free (as in 4: the jobs that waited did not
   fit in at least this room, and pending jobs' keys do not move while they wait). Preempt then
   finds no victim and allocate nothing to start, so the cycle would decide nothing; unlike
   rules 3-7 the skipped cycle counts as one that ran and decided nothing (the next periodic
   cycle is scheduled from it), because a clock-dependent policy's cycles are periodic; or
9. in rule 8's configurations, with no job that has a minimum runtime (time would make more
   running jobs evictable): the last cycle that ran decided nothing and its preemption was
   *blocked* (``stats["preempt_blocked"]``: each attempt would have failed even with every
   victim it could take evicted), nothing was released since (no completion, eviction or node
   change), every job that arrived since needs more GPUs than are free and outranks no running
   job, and no running job's key has risen since (no bound of :mod:`aifab.sim.outrank`
   expired): allocate faces what it refused then, and refuses the new jobs for capacity;
   preempt tries jobs it tried then (its choice reads the state, not the clock), each with at
   most the victims it had (keys of running jobs only fall or stay), none enough, or new jobs
   with no victim at all. It counts as a quiet cycle, as in rule 8.

A skipped cycle leaves the book-keeping as it was (what happened since the last cycle that
ran keeps counting), so a later rule only ever sees more happening, never less.

"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping

from aifab.core.resources import GPU_MILLI, Resources
from aifab.core.workloads import GpuRequestKind, Workload
from aifab.scheduler.config import Fairness, SchedulerConfig
from aifab.scheduler.keybounds import JobKey, has_nan
from aifab.sim.model import Scenario
from aifab.sim.outrank import RunningKeys
from aifab.sim.state import JobState


def gang_need(wl: Workload) -> int | None:
    """GPU milli of the gang as the scheduler counts it; None if a task asks for GPU memory
    (its share depends on the device it would land on)."""
    gang = wl.tasks[: wl.gang_size]
    if any(t.gpu.kind is GpuRequestKind.MEMORY for t in gang):
        return None
    return sum(t.gpu.milli_nominal() for t in gang)


class SkipRules:
    """The simulator's part that decides whether a cycle may be skipped (mixed into it)."""

    # Set by the simulator.
    config: SchedulerConfig
    counters: dict[str, float]
    jobs: list[JobState]
    pending: set[str]
    alloc_now: list[float]
    time_dependent: bool
    now: float
    dirty: bool

    def _init_skip(self, config: SchedulerConfig, scenario: Scenario) -> None:
        # For skip rule 3: free GPU milli on up nodes, pending gang sizes and priorities.
        self.free_milli = sum(n.gpu_count for n in scenario.nodes) * GPU_MILLI
        self.pending_milli: dict[int, int] = {}
        self.pending_prio: dict[int, int] = {}
        self.running_prio: dict[int, int] = {}  # preemptible running workloads only
        self.can_reclaim = "reclaim" in config.actions
        self.can_preempt = "preempt" in config.actions
        # For skip rule 5: the last cycle's fair shares and demands, whether it decided nothing,
        # and whether every arrival since is inert. Each project's path to the root.
        self.last_fair: Mapping[str, Resources] = {}
        self.last_demand: Mapping[str, Resources] = {}
        self.last_quiet = False
        self.inert = True
        self.paths = {p: [p, *scenario.queues.ancestors(p)] for p in scenario.queues.leaves()}
        # For skip rule 4 (and 7): what happened since the last cycle that ran.
        self.strict_fifo = (
            config.fairness is Fairness.NONE and config.job_order == "fifo" and not config.backfill
        )
        self.released = True
        self.new_min_need = math.inf
        self.waited = False
        # For skip rule 6: pending jobs by job-order key (entries go stale, checked on use).
        self.head_rule = config.fairness is Fairness.NONE and not config.backfill
        self.head_heap: list[tuple[tuple[object, ...], int, int, Workload]] = []
        self.head_seq = 0
        self.jkey: JobKey | None = None
        # For skip rule 8: bounds of the running jobs' keys (None: the rule does not apply).
        self.running_keys: RunningKeys | None = None
        self.as_quiet = False  # the last skip was by rule 8 or 9: it counts as a quiet cycle
        # For skip rule 9: the last cycle that ran decided nothing and its preemption was
        # blocked (stuck), at this time; whether any job has a minimum runtime.
        self.stuck = False
        self.stuck_at = -math.inf
        self.min_runtimes = any(j.workload.min_runtime > 0 for j in scenario.jobs)
        self.arrivals_inert = True  # every job that arrived since the last cycle waits, outranks nobody
        if self.head_rule or self._order_rule_applies(config):
            from aifab.scheduler.plugins.orders import KEY_STEADY_BELOW, job_order

            self.jkey = job_order(config.job_order)
            steady = KEY_STEADY_BELOW.get(config.job_order)
            if steady is not None and self._order_rule_applies(config):
                self.running_keys = RunningKeys(self.jkey, steady)
        # For skip rule 7: each project's deserved GPUs, and whether every arrival since the
        # last cycle that ran is refused.
        self.static_rule = config.fairness is Fairness.STATIC
        self.deserved_milli = [scenario.queues.get(p).deserved.gpu for p in scenario.queues.leaves()]
        self.new_refused = True

    def _order_rule_applies(self, config: SchedulerConfig) -> bool:
        """Rule 8's configurations: preemption by job order is the only way to evict."""
        return (
            self.can_preempt
            and config.preempt_by_job_order
            and not self.can_reclaim
            and "consolidate" not in config.actions
            and config.fairness is Fairness.NONE
            and config.time_fairness_half_life is None
        )

    @staticmethod
    def _count(counts: dict[int, int], key: int, delta: int) -> None:
        n = counts.get(key, 0) + delta
        if n:
            counts[key] = n
        else:
            del counts[key]

    def _set_pending(self, job: JobState, pending: bool) -> None:
        d = 1 if pending else -1
        wl = job.wl
        if pending:
            self.pending.add(wl.id)
            if self.head_rule or self.running_keys is not None:
                self._push_head(job)
        else:
            self.pending.discard(wl.id)
        self._count(self.pending_milli, job.milli, d)
        self._count(self.pending_prio, wl.priority, d)

    def _set_running(self, job: JobState, running: bool) -> None:
        if job.wl.preemptible:
            self._count(self.running_prio, job.wl.priority, 1 if running else -1)
            keys = self.running_keys
            if keys is not None:
                if running:
                    keys.start(job, self.now)
                else:
                    keys.stop(job)

    def _push_head(self, job: JobState) -> None:
        assert self.jkey is not None
        key = self.jkey(job.wl)
        if has_nan(key):  # keys stop sorting
            self.head_rule = False
            self.running_keys = None
            self.head_heap.clear()
            return
        self.head_seq += 1
        heapq.heappush(self.head_heap, (key, self.head_seq, job.idx, job.wl))

    def _head(self) -> tuple[tuple[object, ...], Workload] | None:
        """The first pending job in job order: its key and workload."""
        heap = self.head_heap
        while heap:
            key, _, idx, wl = heap[0]
            if self.jobs[idx].wl is wl and wl.id in self.pending:
                return key, wl
            heapq.heappop(heap)  # bound, or requeued with another workload since
        return None

    def _head_blocked(self) -> bool:
        """Rule 6: the first pending job in job order needs more GPUs than are free."""
        head = self._head()
        if head is None:
            return False
        need = gang_need(head[1])
        return need is not None and need > self.free_milli

    def _note_result(self, quiet: bool, stats: Mapping[str, float]) -> None:
        """Book-keeping of rule 9 after a cycle that ran."""
        self.stuck = quiet and stats.get("preempt_blocked") == 1.0
        self.stuck_at = self.now

    def _order_rule(self) -> bool:
        """Rules 8 and 9 (see the module docstring)."""
        keys = self.running_keys
        if keys is None:
            return False
        if (
            self.stuck
            and not self.released
            and self.arrivals_inert
            and not self.min_runtimes
            and not keys.rose_since(self.stuck_at, self.now)
        ):
            self.counters["cycles_skipped_blocked"] += 1
            return True
        if self.running_prio and max(self.pending_prio) > min(self.running_prio):
            return False  # a higher priority may preempt
        head = self._head()
        if head is None or keys.any_after(head[0], self.now) or not keys.ok:
            return False
        if self.free_milli < min(self.pending_milli):
            return True
        return not self.released and self.new_min_need > self.free_milli

    def _note_arrival(self, job: JobState) -> None:
        """Book-keeping of rules 4, 5, 7 and 9 for a job that just arrived (before it is pending)."""
        if self.inert and self.can_reclaim:
            self.inert = self._is_inert(job)
        if self.arrivals_inert and self.running_keys is not None:
            self.arrivals_inert = self._waits_outranking_nobody(job)
        self.new_min_need = min(self.new_min_need, job.milli)
        if self.static_rule and self.new_refused:
            need = gang_need(job.wl)
            self.new_refused = need is not None and (
                need > self.free_milli
                or (
                    need > 0
                    and round(self.alloc_now[job.pidx] * GPU_MILLI) + need > self.deserved_milli[job.pidx]
                )
            )

    def _waits_outranking_nobody(self, job: JobState) -> bool:
        """Rule 9: the new job needs more GPUs than are free and no running job yields to it."""
        keys = self.running_keys
        assert keys is not None and self.jkey is not None
        wl = job.wl
        need = gang_need(wl)
        if need is None or need <= self.free_milli:
            return False
        if self.running_prio and wl.priority > min(self.running_prio):
            return False
        key = self.jkey(wl)
        return not has_nan(key) and not keys.any_after(key, self.now) and keys.ok

    def _note_cycle(self) -> None:
        """A cycle runs: what happened since starts counting again."""
        self.arrivals_inert = True
        self.released = False
        self.new_min_need = math.inf
        self.new_refused = True

    def _nothing_can_change(self) -> bool:
        """Skip rules 3 to 8 (see the module docstring)."""
        self.as_quiet = False
        if self.can_preempt and self.config.preempt_by_job_order:
            # Preemption by job order (LAS, SRTF) can evict between equal priorities.
            self.as_quiet = self._order_rule()
            return self.as_quiet
        if self.can_reclaim:
            skip = self.last_quiet and not self.released and self.inert and not self.time_dependent
            self.counters["cycles_skipped_inert"] += skip
            return skip
        if self.can_preempt and self.running_prio and max(self.pending_prio) > min(self.running_prio):
            return False
        if self.free_milli < min(self.pending_milli):
            return True
        if self.head_rule and self._head_blocked():
            return True
        if self.released:
            return False
        if self.static_rule and self.new_refused:
            return True
        return self.new_min_need > self.free_milli or (self.strict_fifo and self.waited)

    def _is_inert(self, job: JobState) -> bool:
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
