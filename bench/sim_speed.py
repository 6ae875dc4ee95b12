"""Simulator speed: events per second on a synthetic workload (median of several runs).

    .venv/bin/python bench/sim_speed.py [--jobs 3000] [--runs 5] [--policy aifab]

An event is anything popped off the simulator's event heap: arrivals, completions, node
failures/repairs and scheduled cycles (skipped ones included). The wall time includes the
scheduler's own cycles, so this measures the whole replay, not the event loop alone.
"""

from __future__ import annotations

import argparse
import statistics
import time

from aifab.sim.engine import simulate
from aifab.sim.policies import get_policy
from aifab.sim.traces.synthetic import synthetic_scenario


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=3000)
    ap.add_argument("--nodes", type=int, default=16)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--policy", default="aifab")
    ap.add_argument("--load", type=float, default=0.9)
    args = ap.parse_args()
    sc = synthetic_scenario(seed=1, jobs=args.jobs, nodes=args.nodes, projects=4, load=args.load)
    config = get_policy(args.policy)
    rates, walls, cycles = [], [], []
    for _ in range(args.runs):
        started = time.perf_counter()
        out = simulate(sc, config, policy=args.policy)
        wall = time.perf_counter() - started
        walls.append(wall)
        rates.append(out.counters["events"] / wall)
        cycles.append(out.counters["cycles"])
    print(
        f"policy={args.policy} jobs={args.jobs} nodes={args.nodes}x8 runs={args.runs}: "
        f"events={out.counters['events']:.0f} cycles={cycles[-1]:.0f} "
        f"median wall={statistics.median(walls):.3f}s "
        f"median events/s={statistics.median(rates):,.0f} (min {min(rates):,.0f}, max {max(rates):,.0f}) "
        f"cycles/s={cycles[-1] / statistics.median(walls):,.0f}"
    )


if __name__ == "__main__":
    main()
