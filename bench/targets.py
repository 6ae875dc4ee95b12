"""Every figure that issues 2 and 4 set a target or a limit for, where it stands, in one table.

``bench/make_docs.py`` puts the table at the top of docs/benchmarks.md. Every measured figure is
read from the files the benchmark scripts wrote to bench/results/; only the goals, quoted from
the issues, are typed here. A goal whose results file is missing reads "not measured".

"Must" is a limit the issue sets ("must be <= 250 ms", "aifab's default must beat ..."); a
"target" is the figure it aims at. An issue is open while any row of it is not met.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from statistics import mean
from typing import Any

from bench.engines import median_run, ratio

MET, MISSED, NOT_MEASURED = "met", "**missed**", "not measured"
REPLAY_TARGET_S, REPLAY_MUST_S = 30.0, 120.0
PACKING_TARGET_PCT = 3.6
BASELINE_TOLERANCE = 1.0
ENGINE_TARGET = 1.10
DEFAULT_PLACEMENT = "aifab"


@dataclass(frozen=True)
class Row:
    issue: str
    goal: str
    kind: str  # "must" or "target"
    measured: str
    verdict: str
    source: str


Results = dict[str, Any]


def rows(results: Path) -> list[Row]:
    """One row per goal; goals whose results file is missing say so."""
    out: list[Row] = []
    for files, make, (issue, goal, kind) in _GOALS:
        loaded = [_load(results / f) for f in files]
        if any(x is None for x in loaded):
            missing = ", ".join(f"`{f}`" for f, x in zip(files, loaded, strict=True) if x is None)
            out.append(Row(issue, goal, kind, f"{missing} missing", NOT_MEASURED, ""))
            continue
        out += make(*loaded)
    return out


def table(results: Path) -> str:
    lines = [
        "| issue | goal | must or target | measured | verdict | from |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows(results):
        lines.append(f"| {r.issue} | {r.goal} | {r.kind} | {r.measured} | {r.verdict} | {r.source} |")
    return "\n".join(lines)


def _load(path: Path) -> Results | None:
    if not path.exists():
        return None
    got: Results = json.loads(path.read_text())
    return got


def _verdict(ok: bool) -> str:
    return MET if ok else MISSED


# ----------------------------------------------------------------------------- 5a packing


def _packing(packing: Results, floor: Results) -> list[Row]:
    src = f"`packing.json` ({packing['meta']['date']})"
    means = packing["means"]
    published = [m for m in means if m.get("paper")]
    worst = max(
        (abs(m["alloc_at"][lvl] - m["paper"][lvl]), m["trace"], m["policy"], lvl)
        for m in published
        for lvl in ("100", "130")
    )
    inside = sum(
        all(abs(m["alloc_at"][lvl] - m["paper"][lvl]) <= BASELINE_TOLERANCE for lvl in ("100", "130"))
        for m in published
    )
    by = {(m["trace"], m["policy"]): m["alloc_at"] for m in means}
    traces = sorted({t for t, _ in by})
    gaps = [
        (by[(t, DEFAULT_PLACEMENT)][lvl] - by[(t, "fgd")][lvl], t, lvl)
        for t in traces
        if (t, DEFAULT_PLACEMENT) in by and (t, "fgd") in by
        for lvl in ("100", "130")
    ]
    least = min(gaps)
    unallocated = 100.0 - by[("default", DEFAULT_PLACEMENT)]["130"]
    fgd_unallocated = 100.0 - by[("default", "fgd")]["130"]
    own = [r for r in floor["rows"] if r["trace"] == "default" and r["policy"] == DEFAULT_PLACEMENT]
    floor_note = ""
    if own:
        floor_note = (
            f"; the least any placement of the same pods could leave: {mean(r['floor_pct'] for r in own):.2f}% "
            f"(`packing_floor.json`, {len(own)} seeds)"
        )
    return [
        Row(
            "2 (5a)",
            f"each baseline within {BASELINE_TOLERANCE:.1f} point of the published mean at 100% and 130%, "
            "every trace",
            "must",
            f"{inside} of {len(published)} (policy, trace) pairs; largest gap {worst[0]:.2f} "
            f"({worst[2]}, {worst[1]}, {worst[3]}%)",
            _verdict(inside == len(published)),
            src,
        ),
        Row(
            "2 (5a)",
            "aifab's default placement at or above FGD at 100% and 130%, every trace",
            "must",
            f"least margin {least[0]:+.2f} points ({least[1]}, {least[2]}%)",
            _verdict(len(gaps) == 2 * len(traces) and least[0] >= 0),
            src,
        ),
        Row(
            "2 (5a)",
            f"unallocated GPUs at 130% on the default trace below {PACKING_TARGET_PCT}% (FGD: 4.61%)",
            "target",
            f"{unallocated:.2f}% (FGD here: {fgd_unallocated:.2f}%){floor_note}",
            _verdict(unallocated < PACKING_TARGET_PCT),
            src,
        ),
    ]


# ----------------------------------------------------------------------------- 5b Philly


def _philly(philly: Results) -> list[Row]:
    src = f"`philly-full.json` ({philly['date'][:16].replace('T', ' ')} UTC)"
    by = {r["policy"]: r for r in philly["results"]}
    out = []
    aifab = by.get("aifab")
    for other, name in (("kai", "KAI-like"), ("fifo", "FIFO")):
        o = by.get(other)
        if aifab is None or o is None:
            continue
        a_h, o_h = aifab["avg_jct_s"] / 3600, o["avg_jct_s"] / 3600
        out.append(
            Row(
                "2 (5b)",
                f"aifab's default beats {name} on average JCT",
                "must",
                f"{a_h:.1f} h against {o_h:.1f} h",
                _verdict(a_h < o_h),
                src,
            )
        )
    if aifab is not None:
        pct = aifab["quota_promise_pct"]
        out.append(
            Row(
                "2 (5b)",
                "the quota promise (a job that fits in unused deserved quota starts within 60 s) "
                "in at least 99% of cases",
                "must",
                f"{pct:.2f}%",
                _verdict(pct >= 99.0),
                src,
            )
        )
    walls = [(r["policy"], r["wall_s"]) for r in philly["results"]]
    slow = [f"{p} {s:.1f} s" for p, s in walls if s > REPLAY_TARGET_S]
    every = ", ".join(f"{p} {s:.1f}" for p, s in walls)
    calib = philly.get("calibration_seconds")
    machine = f"; calibration workload {calib * 1000:.0f} ms" if calib else ""
    src_speed = (
        src + f", {philly.get('jobs_parallel', 1)} policies at a time on {philly['nproc']} cores{machine}"
    )
    out += [
        Row(
            "2 (5c)",
            f"the full replay, per policy, at most {REPLAY_MUST_S:.0f} s",
            "must",
            f"slowest {max(s for _, s in walls):.1f} s",
            _verdict(all(s <= REPLAY_MUST_S for _, s in walls)),
            src_speed,
        ),
        Row(
            "2 (5c)",
            f"the full replay, per policy, at most {REPLAY_TARGET_S:.0f} s",
            "target",
            f"{every} s" + (f" (over: {', '.join(slow)})" if slow else ""),
            _verdict(not slow),
            src_speed,
        ),
    ]
    return out


# ----------------------------------------------------------------------------- 5c cycle


def _cycle(cycle: Results) -> list[Row]:
    src = f"`cycle_speed.json` ({cycle['machine']['date']}; calibration workload {cycle['calibration_ms']:.0f} ms)"
    out = []
    for c in cycle["cases"]:
        if not c["case"].endswith(f"placement {DEFAULT_PLACEMENT}"):
            continue
        what = c["case"].rsplit(" — ", 1)[0]
        for kind, limit in (("must", c.get("must_ms")), ("target", c.get("target_ms"))):
            if limit is None:
                continue
            out.append(
                Row(
                    "2 (5c)",
                    f"one cycle, {what}: at most {limit:.0f} ms",
                    kind,
                    f"{c['median_ms']:.1f} ms (median of {len(c['samples_ms'])})",
                    _verdict(c["median_ms"] <= limit),
                    src,
                )
            )
    return out


# ----------------------------------------------------------------------------- issue 4


def _engines(engines: Results) -> list[Row]:
    src = f"`engines.json` ({engines['machine']['date']})"
    out = []
    for r in engines["results"]:
        if r.get("job_seconds"):
            continue
        runs = r["runs"]
        m = median_run(runs)
        every = ", ".join(f"{ratio(x):.2f}" for x in runs)
        out.append(
            Row(
                "4 (5)",
                f"{engines['jobs']:,} trivial jobs through aifab to {r['engine'].capitalize()}: "
                f"end-to-end time within 10% of {r['engine'].capitalize()} alone",
                "target",
                f"{ratio(m):.2f}x ({m['aifab']['total_s']:.1f} s against {m['direct']['total_s']:.1f} s; "
                f"runs {every})",
                _verdict(ratio(m) <= ENGINE_TARGET),
                src,
            )
        )
    return out


# Each part: its results files, what makes its rows, and what it measures (the one row shown
# when a file is missing).
_GOALS: list[tuple[tuple[str, ...], Callable[..., list[Row]], tuple[str, str, str]]] = [
    (
        ("packing.json", "packing_floor.json"),
        _packing,
        ("2 (5a)", "packing against the FGD paper and the < 3.6% target", "must and target"),
    ),
    (
        ("philly-full.json",),
        _philly,
        ("2 (5b, 5c)", "the Philly replay: JCT, quota promise, wall time per policy", "must and target"),
    ),
    (
        ("cycle_speed.json",),
        _cycle,
        ("2 (5c)", "one cycle at 1,000 and 4,000 nodes, and reclaim", "must and target"),
    ),
    (
        ("engines.json",),
        _engines,
        ("4 (5)", "aifab in front of Slurm and Ray against the engine alone", "target"),
    ),
]
