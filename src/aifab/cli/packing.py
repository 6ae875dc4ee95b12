"""``aifab packing``: the FGD paper's packing experiment on the bundled Alibaba GPU trace.

Each policy places the trace's pods one at a time on the 1,213-node GPU cluster (no departures),
with the pod list shuffled and inflated to 130 % of GPU capacity as the paper's artifact does;
the table shows the allocated GPU share at each arrived-demand level, averaged over seeds, next
to the paper's published means where the trace has them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from aifab.core.errors import AifabError
from aifab.scheduler.placement import PAPER_NAMES, POLICY_NAMES, canonical_name
from aifab.sim.packing import THRESHOLDS, PackingResult, load_published, parse_seeds, run_packing
from aifab.sim.traces.alibaba import TraceNode, TracePod, load_nodes, load_pods

DATA = Path(__file__).resolve().parents[3] / "data" / "alibaba-gpu-v2023"
ANCHORS = "fgd_atc23_allocation.csv"  # the paper's published means, shipped with the trace


def packing_command(
    trace: Annotated[
        str, typer.Option(help="Pod list: default, cpu050, ..., multigpu50, or a CSV path.")
    ] = "default",
    policy: Annotated[
        list[str] | None, typer.Option("--policy", "-p", help="Placement policy (repeat). Default: all.")
    ] = None,
    seeds: Annotated[str, typer.Option(help="Seeds, e.g. 42-44 or 42-51 (the paper's).")] = "42-44",
    data: Annotated[Path, typer.Option(help="Folder with the node list and pod lists.")] = DATA,
) -> None:
    """Compare placement policies on the Alibaba GPU trace (FGD paper, ATC'23)."""
    console = Console()
    try:
        names = [canonical_name(p) for p in (policy or list(POLICY_NAMES))]
    except KeyError as exc:
        console.print(f"[red]error:[/] --policy: {exc.args[0]}")
        raise typer.Exit(2) from None
    try:
        seed_list = parse_seeds(seeds)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--seeds") from None
    pod_path = Path(trace) if trace.endswith(".csv") else data / f"openb_pod_list_{trace}.csv"
    trace_name = pod_path.stem.removeprefix("openb_pod_list_")
    try:
        if not pod_path.exists():
            raise AifabError(f"--trace: no pod list at {pod_path}")
        nodes = load_nodes(data / "openb_node_list_gpu_node.csv")
        pods = load_pods(pod_path)
    except AifabError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None
    results = _run_all(console, nodes, pods, names, seed_list, trace_name)
    console.print(_table(results, names, load_published(data / ANCHORS), trace_name, seed_list))


def _run_all(
    console: Console,
    nodes: Sequence[TraceNode],
    pods: Sequence[TracePod],
    names: list[str],
    seeds: list[int],
    trace: str,
) -> dict[str, list[PackingResult]]:
    results: dict[str, list[PackingResult]] = {n: [] for n in names}
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(f"packing {trace}", total=len(names) * len(seeds))
        for name in names:
            for seed in seeds:
                progress.update(task, description=f"{PAPER_NAMES.get(name, name)} seed {seed}")
                results[name].append(run_packing(nodes, pods, name, seed, trace=trace))
                progress.advance(task)
    return results


def _table(
    results: dict[str, list[PackingResult]],
    names: list[str],
    published: dict[tuple[str, str], dict[int, float]],
    trace: str,
    seeds: list[int],
) -> Table:
    table = Table(
        title=f"Allocated GPU share (%) by arrived GPU demand — trace {trace}, seeds {seeds[0]}..{seeds[-1]}"
        " (paper's published mean in brackets)"
    )
    table.add_column("policy")
    for x in THRESHOLDS:
        table.add_column(f"{x}%", justify="right")
    table.add_column("unallocated @130%", justify="right")
    for name in names:
        runs = results[name]
        paper = published.get((trace, name), {})
        cells = []
        for x in THRESHOLDS:
            vals = [r.alloc_at[x] for r in runs if x in r.alloc_at]
            ours = sum(vals) / len(vals) if vals else float("nan")
            cells.append(f"{ours:.2f}" + (f" [{paper[x]:.2f}]" if x in paper else ""))
        last = [r.alloc_at[130] for r in runs if 130 in r.alloc_at]
        unalloc = 100 - sum(last) / len(last) if last else float("nan")
        table.add_row(PAPER_NAMES.get(name, name), *cells, f"{unalloc:.2f}")
    return table
