"""One full scheduling cycle under this tree against a baseline git revision, side by side.

    .venv/bin/python bench/cycle_speedup.py --baseline REV [--runs 7] [--rounds 3]

The cases of bench/cycle_speed.py with the default placement. In each round the baseline
(checked out into a temporary git worktree) and this tree time the case at the same time, one
process each, on the same snapshot (built by this tree's bench/_snapshots.py); each process
reports the median of ``--runs`` cycles after a warm-up. The ratio of the two is what holds on
a machine whose speed varies between sessions (up to 3x here), and both must take the same
decisions (a digest of their binds, evictions and pending reasons). Writes
bench/results/cycle_speedup.{json,md}.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._timing import machine
from bench._worktree import checked_out, child_result, dirty_src, revision, start_child, write_results

ROOT = Path(__file__).resolve().parents[1]

CASES = {
    "1,000 nodes x 8 GPUs, 8,000 running + 10,000 pending": "build_snapshot(SnapshotSize(1000, 8000, 10000))",
    "4,000 nodes x 8 GPUs, 30,000 running + 110,000 pending": "build_snapshot(SnapshotSize(4000, 30000, 110000))",
    "reclaim: one 4,000-GPU gang (500 x 8) on 1,000 full nodes": "build_reclaim_snapshot(1000, 500)",
}

# Run in a child process with the revision's src/ first on PYTHONPATH: the case's median cycle
# time and a digest of its decisions, as JSON on stdout.
CHILD = """
import hashlib, json, statistics, sys, time
from aifab.scheduler import SchedulerConfig, run_cycle
from bench._snapshots import SnapshotSize, build_reclaim_snapshot, build_snapshot
snapshot = eval(sys.argv[1])
runs = int(sys.argv[2])
config = SchedulerConfig()
result = run_cycle(snapshot, config)  # warm-up, and the decisions compared
samples = []
for _ in range(runs):
    started = time.perf_counter()
    run_cycle(snapshot, config)
    samples.append(time.perf_counter() - started)
pending = sorted((p.workload_id, p.code.value, p.message) for p in result.pending.values())
decisions = repr((result.binds, result.evictions, pending))
print(json.dumps({
    "median_s": statistics.median(samples),
    "digest": hashlib.sha256(decisions.encode()).hexdigest()[:16],
    "binds": len(result.binds),
    "evictions": len(result.evictions),
}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", required=True, help="git revision to compare with")
    ap.add_argument("--runs", type=int, default=7, help="timed cycles per process")
    ap.add_argument("--rounds", type=int, default=3, help="side-by-side rounds per case")
    args = ap.parse_args()
    base_rev, head = revision(args.baseline), revision("HEAD")
    this_tree = head + (" + uncommitted changes" if dirty_src() else "")
    rows = []
    with checked_out(base_rev) as tree:
        for case, build in CASES.items():
            base_s: list[float] = []
            this_s: list[float] = []
            same = True
            for _ in range(args.rounds):
                b_proc, t_proc = (
                    start_child(CHILD, [tree / "src", ROOT], build, str(args.runs)),
                    start_child(CHILD, [ROOT / "src", ROOT], build, str(args.runs)),
                )
                b, t = child_result(b_proc, f"{case} at {base_rev}"), child_result(t_proc, f"{case} here")
                base_s.append(float(b["median_s"]))  # type: ignore[arg-type]
                this_s.append(float(t["median_s"]))  # type: ignore[arg-type]
                same = same and b["digest"] == t["digest"]
            ratios = [t / b for b, t in zip(base_s, this_s, strict=True)]
            row = {
                "case": case,
                "baseline_ms": [round(x * 1000, 1) for x in base_s],
                "this_ms": [round(x * 1000, 1) for x in this_s],
                "ratio": round(statistics.median(ratios), 2),
                "binds": t["binds"],
                "evictions": t["evictions"],
                "same_decisions": same,
            }
            rows.append(row)
            print(
                f"{case}: baseline {row['baseline_ms']} ms, this {row['this_ms']} ms, "
                f"x{row['ratio']}, decisions {'same' if same else 'DIFFER'}",
                flush=True,
            )
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    meta = {"command": command, "machine": machine(), "baseline": base_rev, "this": this_tree}
    md = [
        f"Command: `{command}` — {meta['machine']['cores']} cores, Python {meta['machine']['python']}, "
        f"{meta['machine']['date']}. Baseline `{base_rev}`; this tree `{this_tree}`; default placement; "
        f"{args.rounds} rounds, each the median of {args.runs} cycles per process, the two processes "
        "at the same time.",
        "",
        "| case | baseline ms (per round) | this ms (per round) | this / baseline (median) | binds | "
        "evictions | same decisions |",
        "|---|---|---|---:|---:|---:|---|",
        *(
            f"| {r['case']} | {', '.join(map(str, r['baseline_ms']))} | {', '.join(map(str, r['this_ms']))} | "
            f"{r['ratio']:.2f} | {r['binds']} | {r['evictions']} | {'yes' if r['same_decisions'] else 'NO'} |"
            for r in rows
        ),
        "",
    ]
    print(f"wrote {write_results('cycle_speedup', {**meta, 'rows': rows}, md)}")
    return 0 if all(r["same_decisions"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
