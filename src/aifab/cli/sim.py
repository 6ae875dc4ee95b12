"""``aifab sim``: replay a trace under several policies and compare them side by side."""

from __future__ import annotations

import datetime as dt
import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from aifab.core.errors import AifabError
from aifab.sim.engine import SimulationError
from aifab.sim.policies import POLICIES
from aifab.sim.report import rich_table, write_results
from aifab.sim.runner import RunSpec, horizon, run_policies


def _console(stderr: bool = False) -> Console:
    """A console at the time of the call; wide when not a terminal, so the table never wraps."""
    stream = sys.stderr if stderr else sys.stdout
    return Console(file=stream, width=None if stream.isatty() else 250)


def _fail(message: str, code: int = 2) -> typer.Exit:
    _console(stderr=True).print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def sim_command(
    trace: Annotated[
        str, typer.Option("--trace", help="Named trace (philly, synthetic[:SEED]) or a CSV path.")
    ],
    policy: Annotated[
        list[str] | None,
        typer.Option("--policy", help=f"Policy to run (repeatable): {', '.join(POLICIES)}. Default: all."),
    ] = None,
    nodes: Annotated[int, typer.Option(min=1, help="Nodes in the cluster.")] = 56,
    gpus_per_node: Annotated[int, typer.Option(min=1, help="GPUs per node.")] = 8,
    limit_jobs: Annotated[int | None, typer.Option(min=1, help="Only the first N jobs of the trace.")] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder (default ./out/sim-<trace>).")] = None,
    seed: Annotated[int, typer.Option(help="Seed (synthetic traces, node failures).")] = 0,
    jobs: Annotated[int, typer.Option("--jobs", min=1, help="Policies run in this many processes.")] = 1,
    failures_mtbf: Annotated[
        float | None, typer.Option(help="Mean seconds between failures of one node (off by default).")
    ] = None,
    cycle_interval: Annotated[
        float, typer.Option(min=0.0, help="Minimum simulated seconds between scheduling cycles.")
    ] = 0.0,
    cycle_period: Annotated[
        float, typer.Option(min=1.0, help="Cycle period (s) for clock-dependent policies while jobs wait.")
    ] = 60.0,
) -> None:
    """Replay a trace under each policy; print one table, write results.csv/json and plots."""
    console, err_console = _console(), _console(stderr=True)
    policies = list(policy or POLICIES)
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        raise _fail(f"unknown policy {unknown[0]!r}; known: {', '.join(POLICIES)}")
    spec = RunSpec(trace, nodes, gpus_per_node, limit_jobs, seed, failures_mtbf, cycle_interval, cycle_period)
    trace_label = Path(trace).stem if os.sep in trace or trace.endswith(".csv") else trace.replace(":", "-")
    out_dir = out or Path("out") / f"sim-{trace_label}"
    try:
        total = horizon(spec)
        started = time.perf_counter()
        with Progress(
            TextColumn("{task.description:>14}"),
            BarColumn(),
            TextColumn("{task.fields[sim]}"),
            TimeElapsedColumn(),
            console=err_console,
            transient=False,
        ) as bar:
            tasks = {p: bar.add_task(p, total=total, sim="queued") for p in policies}

            def progress(p: str, t: float, done: bool) -> None:
                if done:
                    bar.update(tasks[p], completed=total, sim="done")
                else:
                    bar.update(tasks[p], completed=min(t, total), sim=f"day {t / 86400:.1f}")

            results = run_policies(spec, policies, jobs=jobs, progress=progress)
        wall = time.perf_counter() - started
    except AifabError as exc:
        raise _fail(str(exc)) from None
    except SimulationError as exc:
        raise _fail(f"simulation failed (a scheduler bug, please report): {exc}", 1) from None
    console.print(rich_table(results, f"aifab sim: {trace_label} ({nodes}x{gpus_per_node} GPUs)"))
    meta = {
        "trace": trace,
        "nodes": nodes,
        "gpus_per_node": gpus_per_node,
        "limit_jobs": limit_jobs,
        "seed": seed,
        "failures_mtbf": failures_mtbf,
        "cycle_interval": cycle_interval,
        "cycle_period": cycle_period,
        "wall_seconds": wall,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    try:
        paths = write_results(results, out_dir, meta)
    except OSError as exc:
        raise _fail(f"cannot write results to {out_dir}: {exc.strerror or exc}") from None
    console.print(f"wrote {', '.join(str(p) for p in paths)}")
