"""Scheduler speed: one full ``run_cycle`` on large snapshots (issue #2, section 5c).

    .venv/bin/python bench/cycle_speed.py [--runs 5] [--quick]

Prints a table and writes bench/results/cycle_speed.{json,md}. Every figure is the median of
``--runs`` runs, reported in ms and as a ratio to a pure-Python calibration workload timed in the
same run (``calib``), because these machines are noisy.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aifab.core import ClusterSnapshot
from aifab.scheduler import SchedulerConfig, run_cycle
from bench._snapshots import SnapshotSize, build_reclaim_snapshot, build_snapshot
from bench._timing import calibration_seconds, machine, median_seconds

RESULTS = Path(__file__).resolve().parent / "results"

CASES = [
    # name, builder, target seconds, must-meet seconds, published comparison
    (
        "1,000 nodes x 8 GPUs, 8,000 running + 10,000 pending",
        lambda: build_snapshot(SnapshotSize(1000, 8000, 10000)),
        0.100,
        0.250,
        "",
    ),
    (
        "4,000 nodes x 8 GPUs, 30,000 running + 110,000 pending",
        lambda: build_snapshot(SnapshotSize(4000, 30000, 110000)),
        1.0,
        None,
        "KAI-Scheduler: ~2.5 s (its issue #315)",
    ),
    (
        "reclaim: one 4,000-GPU gang (500 x 8) on 1,000 full nodes",
        lambda: build_reclaim_snapshot(1000, 500),
        1.0,
        None,
        "KAI-Scheduler benchmark: 6.08 s",
    ),
]
QUICK_CASES = [
    (
        "100 nodes x 8 GPUs, 800 running + 1,000 pending",
        lambda: build_snapshot(SnapshotSize(100, 800, 1000)),
        None,
        None,
        "",
    ),
    ("reclaim: one 400-GPU gang on 100 full nodes", lambda: build_reclaim_snapshot(100, 50), None, None, ""),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument(
        "--placement",
        action="append",
        help="placement plugin(s) to time (repeat); default: the default config's and binpack",
    )
    args = parser.parse_args()
    console = Console()
    placements = args.placement or [SchedulerConfig().placement, "binpack"]
    calib = calibration_seconds()
    rows = []
    for case, build, target, must, published in QUICK_CASES if args.quick else CASES:
        snapshot = build()
        for placement in placements:
            config = SchedulerConfig(placement=placement)
            name = f"{case} — placement {placement}"
            rows.append(_measure(snapshot, config, name, target, must, published, args.runs, calib))
            console.print(f"{name}: median {rows[-1]['median_ms']} ms  ({rows[-1]['verdict']})")
    report = {
        "machine": machine(),
        "calibration_ms": round(calib * 1000, 2),
        "runs": args.runs,
        "cases": rows,
    }
    _print(console, report)
    if not args.quick:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "cycle_speed.json").write_text(json.dumps(report, indent=2) + "\n")
        (RESULTS / "cycle_speed.md").write_text(_markdown(report))
    return 0


def _measure(
    snapshot: ClusterSnapshot,
    config: SchedulerConfig,
    name: str,
    target: float | None,
    must: float | None,
    published: str,
    runs: int,
    calib: float,
) -> dict[str, Any]:
    result = run_cycle(snapshot, config)  # warm-up, and the decisions we report
    med, samples = median_seconds(lambda: run_cycle(snapshot, config), runs)
    calib_after = calibration_seconds(3)
    return {
        "case": name,
        "median_ms": round(med * 1000, 1),
        "samples_ms": [round(s * 1000, 1) for s in samples],
        "ratio_to_calibration": round(med / ((calib + calib_after) / 2), 2),
        "target_ms": None if target is None else target * 1000,
        "must_ms": None if must is None else must * 1000,
        "binds": len(result.binds),
        "evictions": len(result.evictions),
        "pending": len(result.pending),
        "published": published,
        "verdict": _verdict(med, target, must),
    }


def _verdict(seconds: float, target: float | None, must: float | None) -> str:
    if target is not None and seconds <= target:
        return "meets target"
    if must is not None and seconds <= must:
        return "within limit, misses target"
    if must is not None:
        return "FAILS limit"
    if target is not None:
        return "misses target"
    return "-"


def _print(console: Console, report: dict) -> None:
    table = Table(
        title=f"run_cycle speed (median of {report['runs']}; calibration {report['calibration_ms']} ms)"
    )
    for col in ("case", "median ms", "x calib", "target ms", "binds", "evictions", "pending", "verdict"):
        table.add_column(col)
    for r in report["cases"]:
        table.add_row(
            r["case"],
            str(r["median_ms"]),
            str(r["ratio_to_calibration"]),
            str(r["target_ms"] or "-"),
            str(r["binds"]),
            str(r["evictions"]),
            str(r["pending"]),
            r["verdict"],
        )
    console.print(table)


def _markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"Command: `.venv/bin/python bench/cycle_speed.py --runs {report['runs']}` — {m['cores']} cores, "
        f"Python {m['python']}, {m['date']}. Calibration workload: {report['calibration_ms']} ms.",
        "",
        "| case | median ms | x calibration | target | limit | binds | evictions | pending | published | verdict |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in report["cases"]:
        lines.append(
            f"| {r['case']} | {r['median_ms']} | {r['ratio_to_calibration']} | {r['target_ms'] or '-'} | "
            f"{r['must_ms'] or '-'} | {r['binds']} | {r['evictions']} | {r['pending']} | {r['published'] or '-'} | "
            f"{r['verdict']} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
