"""The full Philly Sep-Oct 2017 replay (52,849 jobs, 56 x 8 GPUs) under every policy.

    .venv/bin/python bench/philly.py [--jobs 2] [--limit-jobs N] [--policy P ...]

Prints the table, writes bench/results/philly.json and bench/results/philly.md, and checks
that aifab beats kai and fifo on average JCT and keeps the quota promise >= 99%.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aifab.sim.policies import POLICIES
from aifab.sim.report import markdown_table, rich_table
from aifab.sim.runner import RunSpec, run_policies
from bench._timing import calibration_seconds

RESULTS = Path(__file__).resolve().parent / "results"


def checks(by: dict[str, dict[str, float]]) -> list[tuple[str, bool | None]]:
    out: list[tuple[str, bool | None]] = []
    a = by.get("aifab")
    for other in ("kai", "fifo"):
        o = by.get(other)
        ok = None if a is None or o is None else a["avg_jct_s"] < o["avg_jct_s"]
        out.append((f"aifab beats {other} on average JCT", ok))
    out.append(
        ("aifab keeps the quota promise >= 99%", None if a is None else a["quota_promise_pct"] >= 99.0)
    )
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=1, help="policies run in this many processes")
    ap.add_argument("--limit-jobs", type=int, default=None)
    ap.add_argument("--policy", action="append", default=None)
    ap.add_argument("--cycle-interval", type=float, default=0.0)
    ap.add_argument("--cycle-period", type=float, default=60.0)
    ap.add_argument("--name", default="philly", help="results file stem")
    args = ap.parse_args()
    policies = args.policy or list(POLICIES)
    spec = RunSpec(
        "philly",
        limit_jobs=args.limit_jobs,
        min_cycle_interval=args.cycle_interval,
        cycle_period=args.cycle_period,
    )
    console = Console()
    calib = calibration_seconds()  # this machine's speed, comparable between sessions
    started = time.perf_counter()

    last: dict[str, float] = {}

    def progress(p: str, t: float, done: bool) -> None:
        now = time.perf_counter() - started
        if done:
            console.print(f"[green]{p} done[/] ({now:.0f}s since start)")
        elif now - last.get(p, -1e9) >= 30:  # a line per policy every 30 s of wall time
            last[p] = now
            console.print(f"{p}: simulated day {t / 86400:.1f} after {now:.0f}s")

    results = run_policies(spec, policies, jobs=args.jobs, progress=progress)
    wall = time.perf_counter() - started
    console.print(rich_table(results, "Philly Sep-Oct 2017 replay, 56 x 8 GPUs"))
    by = {m.policy: m.summary for m in results}
    verdicts = checks(by)
    for what, ok in verdicts:
        mark = "n/a" if ok is None else ("PASS" if ok else "FAIL")
        console.print(f"{mark:4}  {what}")
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    meta = {
        "command": command,
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "total_wall_seconds": wall,
        "calibration_seconds": calib,
        "jobs_parallel": args.jobs,
        "limit_jobs": args.limit_jobs,
        "cycle_interval": args.cycle_interval,
        "cycle_period": args.cycle_period,
        "checks": {what: ok for what, ok in verdicts},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(
        json.dumps({**meta, "results": [m.to_json() for m in results]}, indent=2) + "\n"
    )
    md = [
        "# Philly Sep-Oct 2017 replay"
        + (f" (first {args.limit_jobs} jobs by submit time)" if args.limit_jobs else ""),
        "",
        f"- command: `{command}`",
        f"- date: {meta['date']}, nproc: {meta['nproc']}, Python {meta['python']}",
        f"- total wall time: {wall:.0f} s ({args.jobs} process(es)); wall s and events/s per policy in the table;"
        f" calibration workload (`bench/_timing.py`, timed before the replays): {calib * 1000:.2f} ms",
        "- cluster: 56 nodes x 8 GPUs; one project per virtual cluster, deserved GPUs proportional to mean demand;"
        " jobs preemptible, checkpoint every 30 min, 60 s restart overhead",
        "",
        markdown_table(results),
        "",
        "Checks:",
        "",
        *(f"- {'n/a' if ok is None else ('PASS' if ok else 'FAIL')}: {what}" for what, ok in verdicts),
        "",
    ]
    (RESULTS / f"{args.name}.md").write_text("\n".join(md))
    console.print(f"wrote {RESULTS / (args.name + '.json')} and {RESULTS / (args.name + '.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
