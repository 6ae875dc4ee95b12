"""Reproduce the FGD paper's packing experiment and compare with its published numbers.

    .venv/bin/python bench/packing.py                       # full grid: 9 traces x 7 policies x 10 seeds
    .venv/bin/python bench/packing.py --traces default --seeds 42-44 --policies fgd,aifab --jobs 2

Writes bench/results/packing.json and bench/results/packing.md (unless --no-write).
Published means: data/alibaba-gpu-v2023/fgd_atc23_allocation.csv (or --anchors).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from datetime import UTC, datetime
from functools import cache
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from aifab.scheduler.placement import PAPER_NAMES, POLICY_NAMES, canonical_name  # noqa: E402
from aifab.sim.packing import THRESHOLDS, PackingResult, load_published, parse_seeds, run_packing  # noqa: E402
from aifab.sim.traces.alibaba import TraceNode, TracePod, load_nodes, load_pods  # noqa: E402

DATA = ROOT / "data" / "alibaba-gpu-v2023"
ANCHORS = DATA / "fgd_atc23_allocation.csv"  # copied from shared/anchors, see its README
TRACES = (
    "default",
    "cpu050",
    "cpu100",
    "cpu200",
    "cpu250",
    "gpushare40",
    "gpuspec10",
    "multigpu20",
    "multigpu50",
)
TOLERANCE = 1.0  # points of allocated share
AIFAB_UNALLOC_GOAL = 3.6  # % unallocated at 130 % arrived on `default`


@cache
def _trace(data: str, trace: str) -> tuple[tuple[TraceNode, ...], tuple[TracePod, ...]]:
    d = Path(data)
    nodes = tuple(load_nodes(d / "openb_node_list_gpu_node.csv"))
    pods = tuple(load_pods(d / f"openb_pod_list_{trace}.csv"))
    return nodes, pods


def _run(job: tuple[str, str, str, int]) -> PackingResult:
    data, trace, policy, seed = job
    nodes, pods = _trace(data, trace)
    return run_packing(nodes, pods, policy, seed, trace=trace)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def summarise(results: list[PackingResult]) -> dict[tuple[str, str], dict[int, float]]:
    grouped: dict[tuple[str, str], list[PackingResult]] = defaultdict(list)
    for r in results:
        grouped[(r.trace, r.policy)].append(r)
    out: dict[tuple[str, str], dict[int, float]] = {}
    for key, rs in grouped.items():
        out[key] = {x: round(_mean([r.alloc_at[x] for r in rs if x in r.alloc_at]), 2) for x in THRESHOLDS}
    return out


def markdown(
    means: dict[tuple[str, str], dict[int, float]],
    anchors: dict[tuple[str, str], dict[int, float]],
    meta: dict[str, object],
) -> str:
    lines = [
        "## FGD packing experiment (ATC'23) reproduced",
        "",
        f"Command: `{meta['command']}`  ",
        f"Date: {meta['date']}, nproc: {meta['nproc']}, jobs: {meta['jobs']}, wall time: {meta['wall_s']:.0f} s, "
        f"runs: {meta['runs']} (seeds {meta['seeds']})"
        + (
            f"; {meta['runs_total'] - meta['runs']} other runs merged from `{meta['merged_from']}`"  # type: ignore[operator]
            if meta.get("merged_from")
            else ""
        ),
        "",
    ]
    merged_meta = meta.get("merged_meta")
    if isinstance(merged_meta, dict):
        lines += [
            f"The merged runs come from `{merged_meta['command']}` ({merged_meta['date']}, "
            f"{merged_meta['runs']} runs, {merged_meta['wall_s']:.0f} s wall on {merged_meta['nproc']} cores); "
            "only the policies run here replace theirs.",
            "",
        ]
    lines += [
        "Allocated GPU share (%) at arrived GPU demand 100 % and 130 % of capacity, mean over seeds; "
        f"paper = the artifact's published mean over seeds 42-51; pass = |Δ| ≤ {TOLERANCE} point at both.",
        "",
        "| trace | policy | ours@100 | paper@100 | Δ | ours@130 | paper@130 | Δ | pass |",
        "|---|---|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for (trace, policy), m in sorted(
        means.items(),
        key=lambda kv: (TRACES.index(kv[0][0]) if kv[0][0] in TRACES else 99, POLICY_NAMES.index(kv[0][1])),
    ):
        a = anchors.get((trace, policy))
        if a is None:
            lines.append(
                f"| {trace} | {PAPER_NAMES[policy]} | {m[100]:.2f} | – | – | {m[130]:.2f} | – | – | n/a |"
            )
            continue
        d100, d130 = m[100] - a[100], m[130] - a[130]
        ok = abs(d100) <= TOLERANCE and abs(d130) <= TOLERANCE
        lines.append(
            f"| {trace} | {PAPER_NAMES[policy]} | {m[100]:.2f} | {a[100]:.2f} | {d100:+.2f} | "
            f"{m[130]:.2f} | {a[130]:.2f} | {d130:+.2f} | {'pass' if ok else 'FAIL'} |"
        )
    lines += [
        "",
        "### aifab vs FGD (ours, same seeds)",
        "",
        "| trace | FGD@100 | aifab@100 | FGD@130 | aifab@130 | aifab ≥ FGD |",
        "|---|---:|---:|---:|---:|:---:|",
    ]
    for trace in TRACES:
        f, g = means.get((trace, "fgd")), means.get((trace, "aifab"))
        if f is None or g is None:
            continue
        ok = all(g[x] >= f[x] for x in THRESHOLDS)
        lines.append(
            f"| {trace} | {f[100]:.2f} | {g[100]:.2f} | {f[130]:.2f} | {g[130]:.2f} | {'yes' if ok else 'NO'} |"
        )
    g = means.get(("default", "aifab"))
    if g is not None:
        un = 100 - g[130]
        lines += [
            "",
            f"Unallocated GPUs at 130 % arrived on `default`: aifab {un:.2f} % "
            f"(goal < {AIFAB_UNALLOC_GOAL} %; paper's FGD {100 - anchors.get(('default', 'fgd'), {130: float('nan')})[130]:.2f} %).",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--traces", default=",".join(TRACES))
    ap.add_argument("--policies", default=",".join(POLICY_NAMES))
    ap.add_argument("--seeds", default="42-51")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--anchors", default=str(ANCHORS))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument(
        "--merge",
        default=None,
        help="a previous packing.json: its runs for (trace, policy) pairs not run now are kept",
    )
    args = ap.parse_args(argv)
    traces = [t for t in args.traces.split(",") if t]
    policies = [canonical_name(p) for p in args.policies.split(",") if p]
    seeds = parse_seeds(args.seeds)
    jobs = [(args.data, t, p, s) for t in traces for p in policies for s in seeds]
    console = Console()
    started = time.perf_counter()
    results: list[PackingResult] = []
    if args.jobs > 1:
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            for r in pool.map(_run, jobs, chunksize=1):
                results.append(r)
                console.log(
                    f"{r.trace:10s} {r.policy:13s} seed {r.seed}: @130 {r.alloc_at.get(130)} ({r.seconds:.1f}s)"
                )
    else:
        for job in jobs:
            r = _run(job)
            results.append(r)
            console.log(
                f"{r.trace:10s} {r.policy:13s} seed {r.seed}: @130 {r.alloc_at.get(130)} ({r.seconds:.1f}s)"
            )
    wall = time.perf_counter() - started
    ran = len(results)
    merged_meta: object = None
    if args.merge:
        done = {(r.trace, r.policy) for r in results}
        previous = json.loads(Path(args.merge).read_text())
        merged_meta = previous.get("meta")
        kept = [r for r in previous["runs"] if (r["trace"], r["policy"]) not in done]
        for r in kept:
            r["alloc_at"] = {int(k): v for k, v in r["alloc_at"].items()}
            results.append(PackingResult(**r))
        console.print(
            f"merged {len(kept)} runs from {args.merge} (their meta: {previous['meta']['command']})"
        )
    anchors = load_published(Path(args.anchors))
    means = summarise(results)

    table = Table(title="Allocated GPU share (%) at arrived demand: ours (paper) Δ")
    table.add_column("trace")
    table.add_column("policy")
    for x in THRESHOLDS:
        table.add_column(f"@{x}", justify="right")
    for (trace, policy), m in sorted(means.items()):
        a = anchors.get((trace, policy), {})
        cells = []
        for x in THRESHOLDS:
            if x in a:
                d = m[x] - a[x]
                color = "green" if abs(d) <= TOLERANCE else "red"
                cells.append(f"{m[x]:.2f} ({a[x]:.2f}) [{color}]{d:+.2f}[/{color}]")
            else:
                cells.append(f"{m[x]:.2f}")
        table.add_row(trace, PAPER_NAMES[policy], *cells)
    console.print(table)
    console.print(
        f"{len(results)} runs in {wall:.1f} s wall ({sum(r.seconds for r in results):.1f} s CPU in runs)"
    )

    meta: dict[str, object] = {
        "command": "python bench/packing.py "
        + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "jobs": args.jobs,
        "wall_s": wall,
        "runs": ran,
        "runs_total": len(results),
        "seeds": args.seeds,
        "merged_from": args.merge,
        "merged_meta": merged_meta,
    }
    if not args.no_write:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        payload = {
            "meta": meta,
            "means": [
                {"trace": t, "policy": p, "alloc_at": m, "paper": anchors.get((t, p))}
                for (t, p), m in sorted(means.items())
            ],
            "runs": [asdict(r) for r in results],
        }
        (out / "packing.json").write_text(json.dumps(payload, indent=1))
        (out / "packing.md").write_text(markdown(means, anchors, meta))
        console.print(f"wrote {out / 'packing.json'} and {out / 'packing.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
