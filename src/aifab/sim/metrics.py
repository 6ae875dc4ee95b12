"""Metrics of one simulation run, computed from its per-job records and step-function timeline.

Definitions (times in seconds of simulated time; "GPUs" are whole-GPU equivalents):

* **JCT** = completion - submit; **queueing delay** = first start - submit. Mean, p50, p99
  (numpy's linear-interpolation percentiles), over finished jobs; **unfinished** counts jobs
  that could never start under the policy (e.g. bigger than their project's static quota).
* **makespan** = last completion - first submit.
* **GPU allocation %** = integral of allocated GPUs / integral of GPUs on up nodes, over
  [first submit, last completion].
* **idle GPUs while pending** (fragmentation / blocking): time-weighted mean of the GPUs on
  up nodes that are unallocated, over the moments when at least one job is pending. It is
  what placement failures, head-of-line blocking and quotas leave unused.
* **reference fair share** (policy independent, so policies can be compared): at every
  moment each project's demand is its allocated + pending GPUs; capacity is water-filled:
  first min(demand, deserved) each, then what is left in equal parts (equal over-quota
  weights) among projects whose demand is not met, repeatedly.
  **share/fair** per project = integral of allocation / integral of reference fair share;
  **Jain's index** over those ratios (projects with a non-zero fair share):
  (sum x)^2 / (n sum x^2), 1 = perfectly fair. **fair-share deviation %** = integral of
  sum_p |alloc_p - fair_p| / 2 over integral of capacity: the part of the cluster that is
  held by someone other than who the reference would give it to.
* **preemptions**: evictions decided by the scheduler (reclaim + preempt); moves
  (consolidation) and node-failure evictions are counted apart. **lost GPU-hours**: rolled
  back progress plus restore time, times GPUs, over all evictions of any cause.
* **quota promise**: one *case* per pending period of a job (from submit or requeue to
  start) that is *covered*: at some moment of it the job fits in its project's unused
  deserved quota (project's allocated GPUs + the job's GPUs <= deserved, evaluated on the
  state after all changes at each instant), or it starts within the quota (allocation
  including itself <= deserved at the start instant). The case is *broken* if, during the
  period, the job stayed continuously eligible for more than 60 s without starting; it is
  kept otherwise, including when eligibility ended within 60 s because the project's own
  other jobs used the quota first (the promise is to the project). One case per period, so
  eligibility flickering on and off between cycles does not inflate the count.
  **quota promise %** = kept / cases x 100 (100 when there are no cases).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from aifab.sim.outcome import SimOutcome

PROMISE_SECONDS = 60.0
_EPS = 1e-9


@dataclass
class Steps:
    """The timeline collapsed to one row per distinct time: values hold from t[k] to t[k+1]."""

    t: np.ndarray  # (K,)
    dt: np.ndarray  # (K,) time until the next row (0 for the last)
    alloc: np.ndarray  # (K, P) allocated GPUs per project
    pend: np.ndarray  # (K, P) pending GPUs per project
    cap: np.ndarray  # (K,) GPUs on up nodes


@dataclass
class RunMetrics:
    policy: str
    scenario: str
    summary: dict[str, float]
    projects: dict[str, dict[str, float]] = field(default_factory=dict)
    jct: np.ndarray = field(default_factory=lambda: np.zeros(0))
    alloc_t: np.ndarray = field(default_factory=lambda: np.zeros(0))
    alloc_v: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def to_json(self) -> dict[str, Any]:
        return {"policy": self.policy, "scenario": self.scenario, **self.summary, "projects": self.projects}


def build_steps(out: SimOutcome, end: float) -> Steps:
    tl = out.timeline
    n_p = len(out.projects)
    if not tl.t:
        z = np.zeros((1, n_p))
        return Steps(np.zeros(1), np.zeros(1), z, z.copy(), np.full(1, out.capacity))
    t = np.asarray(tl.t, dtype=float)
    p = np.asarray(tl.p, dtype=np.int64)
    alloc = np.zeros((len(t), n_p))
    pend = np.zeros((len(t), n_p))
    rows = np.arange(len(t))
    alloc[rows, p] = tl.alloc
    pend[rows, p] = tl.pend
    alloc = np.cumsum(alloc, axis=0)
    pend = np.cumsum(pend, axis=0)
    last = np.r_[t[1:] != t[:-1], True]  # keep the state after the last change at each time
    t, alloc, pend = t[last], alloc[last], pend[last]
    # Float sums of +-g drift by ~1e-12; snap to the GPU grid (requests are multiples of 1e-3).
    alloc = np.round(alloc, 6)
    pend = np.round(pend, 6)
    dt = np.diff(np.r_[t, max(end, t[-1])])
    cap = np.full(len(t), out.capacity)
    if tl.cap_t:
        ct = np.asarray(tl.cap_t)
        cd = np.cumsum(tl.cap)
        k = np.searchsorted(ct, t, side="right")
        cap = cap + np.where(k > 0, cd[np.maximum(k - 1, 0)], 0.0)
    return Steps(t, dt, alloc, pend, cap)


def water_fill(demand: np.ndarray, deserved: np.ndarray, cap: np.ndarray) -> np.ndarray:
    """Reference fair share per row (see the module docstring); demand is (K, P)."""
    fair: np.ndarray = np.asarray(np.minimum(demand, deserved[None, :]), dtype=float)
    left = np.maximum(cap - fair.sum(axis=1), 0.0)
    for _ in range(demand.shape[1]):
        unmet = demand - fair
        hungry = unmet > _EPS
        n = hungry.sum(axis=1)
        if not np.any((n > 0) & (left > _EPS)):
            break
        each = np.where(n > 0, left / np.maximum(n, 1), 0.0)
        give = np.where(hungry, np.minimum(unmet, each[:, None]), 0.0)
        fair += give
        left = left - give.sum(axis=1)
    return fair


def jain_index(xs: list[float] | np.ndarray) -> float:
    x = np.asarray(xs, dtype=float)
    if x.size == 0 or not np.any(x):
        return 1.0
    return float(x.sum() ** 2 / (x.size * (x**2).sum()))


def quota_promise(
    steps: Steps,
    deserved: list[float],
    intervals: list[tuple[int, float, float]],
    job_project: np.ndarray,
    job_gpus: np.ndarray,
    open_intervals: list[tuple[int, float, float]] | None = None,
    limit: float = PROMISE_SECONDS,
) -> tuple[int, int]:
    """(cases, kept) as defined in the module docstring."""
    rows = [(*iv, 1.0) for iv in intervals] + [(*iv, 0.0) for iv in open_intervals or []]
    if not rows:
        return 0, 0
    iv = np.asarray(rows, dtype=float)
    jid = iv[:, 0].astype(np.int64)
    q, s, started = iv[:, 1], iv[:, 2], iv[:, 3] > 0
    proj = job_project[jid]
    g = job_gpus[jid]
    cases = kept = 0
    t = steps.t
    for pi in np.unique(proj):
        d = deserved[int(pi)]
        a = steps.alloc[:, int(pi)]
        sel_p = proj == pi
        for gv in np.unique(g[sel_p]):
            sel = sel_p & (g == gv)
            qs, ss, st = q[sel], s[sel], started[sel]
            # At its start the job's own GPUs are in the state: it started within the quota
            # if the project's allocation, itself included, is within deserved.
            k = np.searchsorted(t, ss, side="right") - 1
            a_s = np.where(k >= 0, a[np.maximum(k, 0)], 0.0)
            case = st & (a_s <= d + _EPS)
            broken = np.zeros(qs.size, dtype=bool)
            elig = a + gv <= d + _EPS
            if np.any(elig):
                prev = np.r_[False, elig[:-1]]
                nxt = np.r_[elig[1:], False]
                rs = t[elig & ~prev]
                re_idx = np.nonzero(elig & ~nxt)[0]
                re = np.where(re_idx + 1 < len(t), t[np.minimum(re_idx + 1, len(t) - 1)], np.inf)
                long_run = (re - rs) > limit
                prefix = np.r_[0, np.cumsum(long_run)]
                # Stretches overlapping [queued, started): k1 <= k < k2.
                k1 = np.searchsorted(re, qs, side="right")
                k2 = np.searchsorted(rs, ss, side="left")
                n = np.maximum(k2 - k1, 0)
                n_long = np.where(n > 0, prefix[np.maximum(k2, k1)] - prefix[k1], 0)
                # The first and last stretches are clipped to [queued, started).
                for kk, pick in ((k1, n > 0), (k2 - 1, n >= 2)):
                    kc = np.clip(kk, 0, len(rs) - 1)
                    clipped = (np.minimum(re[kc], ss) - np.maximum(rs[kc], qs)) > limit
                    n_long = n_long - np.where(pick, long_run[kc].astype(int) - clipped.astype(int), 0)
                case |= n > 0
                broken = n_long > 0
            cases += int(np.count_nonzero(case))
            kept += int(np.count_nonzero(case & ~broken))
    return cases, kept


def compute_metrics(out: SimOutcome) -> RunMetrics:
    jobs = out.jobs
    submit = np.array([j.submit for j in jobs])
    start = np.array([j.first_start if j.first_start is not None else np.nan for j in jobs])
    end = np.array([j.end if j.end is not None else np.nan for j in jobs])
    finished = np.isfinite(end)
    jct = (end - submit)[finished]
    wait = (start - submit)[finished]
    t0 = float(submit.min()) if len(jobs) else 0.0
    t_end = float(np.nanmax(end)) if finished.any() else t0
    steps = build_steps(out, t_end)
    dt = steps.dt
    total_alloc = steps.alloc.sum(axis=1)
    cap_int = float((steps.cap * dt).sum())
    pending_mask = steps.pend.sum(axis=1) > _EPS
    idle = np.maximum(steps.cap - total_alloc, 0.0)
    pend_time = float(dt[pending_mask].sum())
    deserved = np.asarray(out.deserved, dtype=float)
    fair = water_fill(steps.alloc + steps.pend, deserved, steps.cap)
    a_int = (steps.alloc * dt[:, None]).sum(axis=0)
    f_int = (fair * dt[:, None]).sum(axis=0)
    ratios = [float(a / f) for a, f in zip(a_int, f_int, strict=True) if f > _EPS]
    deviation = float((np.abs(steps.alloc - fair).sum(axis=1) / 2 * dt).sum())
    pidx = {p: i for i, p in enumerate(out.projects)}
    job_project = np.array([pidx[j.project] for j in jobs], dtype=np.int64)
    job_gpus = np.array([j.gpus for j in jobs])
    cases, kept = quota_promise(
        steps, out.deserved, out.pending_intervals, job_project, job_gpus, out.open_intervals
    )
    span = t_end - t0
    c = out.counters
    wall = out.wall_seconds

    def pct(x: np.ndarray, q: float) -> float:
        return float(np.percentile(x, q)) if x.size else 0.0

    summary = {
        "jobs": float(len(jobs)),
        "unfinished": float(len(jobs) - int(finished.sum())),
        "avg_jct_s": float(np.mean(jct)) if jct.size else 0.0,
        "p50_jct_s": pct(jct, 50),
        "p99_jct_s": pct(jct, 99),
        "avg_wait_s": float(np.mean(wait)) if wait.size else 0.0,
        "p50_wait_s": pct(wait, 50),
        "p99_wait_s": pct(wait, 99),
        "makespan_s": span,
        "gpu_alloc_pct": 100.0 * float((total_alloc * dt).sum()) / cap_int if cap_int > 0 else 0.0,
        "idle_gpus_while_pending": float((idle * dt)[pending_mask].sum()) / pend_time
        if pend_time > 0
        else 0.0,
        "pending_time_pct": 100.0 * pend_time / span if span > 0 else 0.0,
        "jain": jain_index(ratios),
        "min_share_over_fair": min(ratios) if ratios else 1.0,
        "fair_deviation_pct": 100.0 * deviation / cap_int if cap_int > 0 else 0.0,
        "preemptions": float(c.get("preemptions", 0)),
        "moves": float(c.get("moves", 0)),
        "failure_evictions": float(c.get("failure_evictions", 0)),
        "lost_gpu_hours": float(sum(j.lost_gpu_seconds for j in jobs)) / 3600.0,
        "quota_cases": float(cases),
        "quota_promise_pct": 100.0 * kept / cases if cases else 100.0,
        "wall_s": wall,
        "events": float(c.get("events", 0)),
        "cycles": float(c.get("cycles", 0)),
        "events_per_s": float(c.get("events", 0)) / wall if wall > 0 else 0.0,
    }
    projects = {
        p: {
            "deserved_gpus": float(deserved[i]),
            "avg_alloc_gpus": float(a_int[i] / span) if span > 0 else 0.0,
            "avg_fair_gpus": float(f_int[i] / span) if span > 0 else 0.0,
            "share_over_fair": float(a_int[i] / f_int[i]) if f_int[i] > _EPS else 0.0,
        }
        for i, p in enumerate(out.projects)
    }
    return RunMetrics(
        policy=out.policy,
        scenario=out.scenario,
        summary=summary,
        projects=projects,
        jct=jct,
        alloc_t=steps.t,
        alloc_v=total_alloc,
    )
