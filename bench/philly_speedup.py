"""The full Philly replay under this tree against a baseline git revision, side by side.

    .venv/bin/python bench/philly_speedup.py --baseline REV [--policy P ...] [--limit-jobs N]

For each policy the baseline (checked out into a temporary git worktree) and this tree replay
the trace at the same time, one process each, so both see the same machine at the same moment
(these machines' speed varies up to 3x between sessions). Reports both wall times, their ratio,
whether every metric came out the same, and the scheduling cycles each replay ran: the
simulator skips a cycle only when it provably changes nothing, so a better skip rule runs fewer
cycles with every metric the same (the count of cycles and events is work done, not a metric
compared). Writes bench/results/philly_speedup.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._worktree import checked_out, child_result, dirty_src, revision, start_child, write_results

ROOT = Path(__file__).resolve().parents[1]
WORK = ("cycles", "events")  # how much the replay did, not what it decided: not compared

POLICIES = ["fifo", "fifo-backfill", "static", "kai", "tiresias", "srtf", "aifab"]

# Run in a child process against the source tree on PYTHONPATH: one replay, its wall time and
# every summary metric (wall-clock ones aside) as JSON on stdout.
CHILD = """
import json, sys, time
from aifab.sim.engine import simulate
from aifab.sim.metrics import compute_metrics
from aifab.sim.policies import get_policy
from aifab.sim.scenarios import load_scenario
policy, limit = sys.argv[1], (int(sys.argv[2]) or None)
scenario = load_scenario("philly", limit_jobs=limit)
started = time.perf_counter()
out = simulate(scenario, get_policy(policy), policy=policy)
wall = time.perf_counter() - started
summary = compute_metrics(out).summary
skip = {"wall_s", "events_per_s"}
print(json.dumps({"wall_s": wall, "metrics": {k: v for k, v in summary.items() if k not in skip}}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", required=True, help="git revision to compare with")
    ap.add_argument("--policy", action="append", default=None, choices=POLICIES)
    ap.add_argument("--limit-jobs", type=int, default=0, help="0: all 52,849 jobs")
    args = ap.parse_args()
    policies = args.policy or POLICIES
    base_rev = revision(args.baseline)
    head = revision("HEAD")
    dirty = dirty_src()
    rows = []
    with checked_out(base_rev) as tree:
        for policy in policies:
            limit = str(args.limit_jobs)
            base = start_child(CHILD, [tree / "src"], policy, limit)
            this = start_child(CHILD, [ROOT / "src"], policy, limit)
            b, t = child_result(base, f"{policy} at {base_rev}"), child_result(this, f"{policy} here")
            bm, tm = b["metrics"], t["metrics"]
            assert isinstance(bm, dict) and isinstance(tm, dict)
            differ = sorted(k for k in bm.keys() | tm.keys() if k not in WORK and bm.get(k) != tm.get(k))
            same = not differ
            bw, tw = float(b["wall_s"]), float(t["wall_s"])  # type: ignore[arg-type]
            rows.append(
                {
                    "policy": policy,
                    "baseline_s": bw,
                    "this_s": tw,
                    "ratio": tw / bw,
                    "same_metrics": same,
                    "differing": differ,
                    "cycles": [bm.get("cycles"), tm.get("cycles")],
                }
            )
            print(
                f"{policy:14} baseline {bw:7.1f} s   this {tw:7.1f} s   x{tw / bw:.2f}   "
                f"metrics {'same' if same else 'DIFFER: ' + ', '.join(differ)}",
                flush=True,
            )
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    meta = {
        "command": command,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "baseline": base_rev,
        "this": head + (" + uncommitted changes" if dirty else ""),
        "limit_jobs": args.limit_jobs or None,
    }
    md = [
        "# Philly replay: this tree against a baseline, side by side",
        "",
        f"- command: `{command}`",
        f"- date: {meta['date']}, nproc: {meta['nproc']}, Python {meta['python']}",
        f"- baseline: `{base_rev}`; this tree: `{meta['this']}`"
        + (f"; first {args.limit_jobs} jobs" if args.limit_jobs else "; all 52,849 jobs"),
        "- each policy: the two replays at the same time, one process each on the 2 cores",
        "",
        "| policy | baseline wall s | this wall s | this / baseline | cycles run: baseline / this "
        "| every metric the same |",
        "|---|---:|---:|---:|---:|---|",
        *(
            f"| {r['policy']} | {r['baseline_s']:.1f} | {r['this_s']:.1f} | {r['ratio']:.2f} | "
            f"{_count(r['cycles'][0])} / {_count(r['cycles'][1])} | "
            f"{'yes' if r['same_metrics'] else 'NO: ' + ', '.join(r['differing'])} |"
            for r in rows
        ),
        "",
    ]
    print(f"wrote {write_results('philly_speedup', {**meta, 'rows': rows}, md)}")
    return 0 if all(r["same_metrics"] for r in rows) else 1


def _count(value: object) -> str:
    return f"{value:,.0f}" if isinstance(value, int | float) else "?"


if __name__ == "__main__":
    raise SystemExit(main())
