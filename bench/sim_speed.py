"""Simulator speed: events per second on a synthetic workload (median of several runs).

    .venv/bin/python bench/sim_speed.py [--jobs 3000] [--runs 3] [--policy aifab --policy fifo-backfill]

An event is anything popped off the simulator's event heap: arrivals, completions, node
failures/repairs and scheduled cycles (skipped ones included). The wall time includes the
scheduler's own cycles, so this measures the whole replay, not the event loop alone. Writes
bench/results/sim_speed.{json,md}, with a pure-Python calibration workload timed in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aifab.sim.engine import simulate
from aifab.sim.policies import get_policy
from aifab.sim.traces.synthetic import synthetic_scenario
from bench._timing import calibration_seconds, machine

RESULTS = Path(__file__).resolve().parent / "results"


def measure(policy: str, jobs: int, nodes: int, runs: int, load: float) -> dict[str, Any]:
    sc = synthetic_scenario(seed=1, jobs=jobs, nodes=nodes, projects=4, load=load)
    config = get_policy(policy)
    rates, walls = [], []
    for _ in range(runs):
        started = time.perf_counter()
        out = simulate(sc, config, policy=policy)
        wall = time.perf_counter() - started
        walls.append(wall)
        rates.append(out.counters["events"] / wall)
    return {
        "policy": policy,
        "events": int(out.counters["events"]),
        "cycles": int(out.counters["cycles"]),
        "median_wall_s": round(statistics.median(walls), 3),
        "median_events_per_s": round(statistics.median(rates)),
        "min_events_per_s": round(min(rates)),
        "max_events_per_s": round(max(rates)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=3000)
    ap.add_argument("--nodes", type=int, default=16)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--policy", action="append", help="repeat; default: fifo-backfill, kai, aifab")
    ap.add_argument("--load", type=float, default=0.9)
    args = ap.parse_args()
    calib = calibration_seconds()
    rows = []
    for policy in args.policy or ["fifo-backfill", "kai", "aifab"]:
        rows.append(measure(policy, args.jobs, args.nodes, args.runs, args.load))
        r = rows[-1]
        print(
            f"{policy}: {r['events']} events, {r['cycles']} cycles, median wall {r['median_wall_s']} s, "
            f"median {r['median_events_per_s']:,} events/s"
        )
    report = {
        "machine": machine(),
        "calibration_ms": round(calib * 1000, 2),
        "args": vars(args),
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "sim_speed.json").write_text(json.dumps(report, indent=2) + "\n")
    m = report["machine"]
    policies = " ".join(f"--policy {r['policy']}" for r in rows)
    lines = [
        f"Command: `.venv/bin/python bench/sim_speed.py --jobs {args.jobs} --nodes {args.nodes} --runs {args.runs} "
        f"{policies}` — {m['cores']} cores, Python {m['python']}, {m['date']}. Synthetic trace (seed 1, "
        f"{args.jobs} jobs, {args.nodes} x 8 GPUs, 4 projects, load {args.load}). "
        f"Calibration workload: {report['calibration_ms']} ms.",
        "",
        "| policy | events | cycles run | median wall s | median events/s | min | max | events/s x calibration s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['policy']} | {r['events']} | {r['cycles']} | {r['median_wall_s']} | {r['median_events_per_s']:,} "
            f"| {r['min_events_per_s']:,} | {r['max_events_per_s']:,} | {r['median_events_per_s'] * calib:,.0f} |"
        )
    (RESULTS / "sim_speed.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
