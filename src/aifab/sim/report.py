"""Presenting simulation results: one rich table, CSV, JSON, markdown and PNG plots."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from aifab.sim.metrics import RunMetrics

# (summary key, column title, divisor, format)
COLUMNS: tuple[tuple[str, str, float, str], ...] = (
    ("unfinished", "unfinished", 1.0, "{:.0f}"),
    ("avg_jct_s", "avg JCT h", 3600.0, "{:.2f}"),
    ("p50_jct_s", "p50 JCT h", 3600.0, "{:.2f}"),
    ("p99_jct_s", "p99 JCT h", 3600.0, "{:.1f}"),
    ("avg_wait_s", "avg wait h", 3600.0, "{:.2f}"),
    ("p99_wait_s", "p99 wait h", 3600.0, "{:.1f}"),
    ("makespan_s", "makespan d", 86400.0, "{:.2f}"),
    ("gpu_alloc_pct", "GPU alloc %", 1.0, "{:.1f}"),
    ("idle_gpus_while_pending", "idle GPUs w/ pending", 1.0, "{:.1f}"),
    ("jain", "Jain", 1.0, "{:.3f}"),
    ("min_share_over_fair", "min share/fair", 1.0, "{:.2f}"),
    ("fair_deviation_pct", "fair dev %", 1.0, "{:.1f}"),
    ("preemptions", "preempt", 1.0, "{:.0f}"),
    ("lost_gpu_hours", "lost GPU-h", 1.0, "{:.0f}"),
    ("quota_promise_pct", "quota promise %", 1.0, "{:.2f}"),
    ("quota_cases", "promise cases", 1.0, "{:.0f}"),
    ("wall_s", "wall s", 1.0, "{:.1f}"),
    ("events_per_s", "events/s", 1.0, "{:.0f}"),
)


def cells(m: RunMetrics) -> list[str]:
    return [fmt.format(m.summary[key] / div) for key, _, div, fmt in COLUMNS]


def rich_table(results: Sequence[RunMetrics], title: str) -> Table:
    table = Table(title=title)
    table.add_column("policy", style="bold")
    for _, name, _, _ in COLUMNS:
        table.add_column(name, justify="right")
    for m in results:
        table.add_row(m.policy, *cells(m))
    return table


def markdown_table(results: Sequence[RunMetrics]) -> str:
    head = ["policy", *(name for _, name, _, _ in COLUMNS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in results:
        lines.append("| " + " | ".join([m.policy, *cells(m)]) + " |")
    return "\n".join(lines)


def write_results(results: Sequence[RunMetrics], out: Path, meta: dict[str, Any]) -> list[Path]:
    """results.csv, results.json, allocation.png, jct_cdf.png under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    keys = list(results[0].summary) if results else []
    path = out / "results.csv"
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["policy", *keys])
        for m in results:
            w.writerow([m.policy, *(f"{m.summary[k]:.6g}" for k in keys)])
    written.append(path)
    path = out / "results.json"
    path.write_text(json.dumps({**meta, "results": [m.to_json() for m in results]}, indent=2) + "\n")
    written.append(path)
    written.extend(write_plots(results, out))
    return written


def write_plots(results: Sequence[RunMetrics], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for m in results:
        t, v = _downsample(m.alloc_t, m.alloc_v)
        ax.step(t / 86400.0, v, where="post", label=m.policy, linewidth=0.8)
    ax.set_xlabel("simulated time (days)")
    ax.set_ylabel("allocated GPUs")
    ax.set_title("GPU allocation over time")
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    paths.append(out / "allocation.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in results:
        x = np.sort(m.jct[np.isfinite(m.jct)]) / 3600.0
        if x.size:
            ax.plot(x, np.arange(1, x.size + 1) / x.size, label=m.policy, linewidth=1.0)
    ax.set_xscale("log")
    ax.set_xlabel("job completion time (hours, log)")
    ax.set_ylabel("fraction of jobs")
    ax.set_title("JCT CDF")
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    paths.append(out / "jct_cdf.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def _downsample(t: np.ndarray, v: np.ndarray, points: int = 4000) -> tuple[np.ndarray, np.ndarray]:
    """At most ``points`` samples: the mean over each time bucket keeps the shape honest."""
    if t.size <= points:
        return t, v
    edges = np.linspace(t[0], t[-1], points + 1)
    dt = np.diff(np.r_[t, t[-1]])
    idx = np.clip(np.searchsorted(edges, t, side="right") - 1, 0, points - 1)
    w = np.bincount(idx, weights=v * dt, minlength=points)
    d = np.bincount(idx, weights=dt, minlength=points)
    keep = d > 0
    return edges[:-1][keep], w[keep] / d[keep]
