"""Control-plane benchmarks (issue #3, section 7) against a real `aifab server` process.

    .venv/bin/python bench/control_plane.py [--latency-jobs 40] [--submissions 3000] [--queued 10000]

* submit-to-running latency of trivial jobs on the local executor (server-side event times:
  the ``pending`` event at submission to the ``launched`` event), p50 and p99;
* sustained submissions per second through the API (several client threads; jobs that cannot
  fit, so nothing runs and the store and API are what is measured);
* ``aifab ps`` with 10,000 queued workloads: the API call's p99, and the whole CLI command;
* the schedule loop with 10,000 queued workloads: one pass (snapshot from the store, run_cycle,
  decisions written), p50 of several passes, in process against the same store.

Writes bench/results/control_plane.{json,md}; a calibration workload is timed in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._timing import calibration_seconds, machine

RESULTS = Path(__file__).resolve().parent / "results"
AIFAB = str(Path(sys.executable).parent / "aifab")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


class Server:
    def __init__(self, home: Path) -> None:
        self.home, self.port = home, _port()
        self.env = {**os.environ, "AIFAB_HOME": str(home), "AIFAB_URL": f"http://127.0.0.1:{self.port}"}
        log = open(home / "server.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [AIFAB, "server", "--gpus", "4", "--port", str(self.port)],
            env=self.env,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        deadline = time.time() + 60
        while True:
            try:
                if httpx.get(f"{self.url}/v1/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                if time.time() > deadline:
                    raise
                time.sleep(0.2)
        self.token = (home / "admin.token").read_text().strip()
        self.env["AIFAB_TOKEN"] = self.token
        self.http = httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {self.token}"}, timeout=60
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(timeout=30)


def _job(name: str, gpus: float, code: str = "pass") -> dict[str, Any]:
    return {
        "kind": "job",
        "name": name,
        "project": "bench",
        "command": [sys.executable, "-c", code],
        "resources": {"gpus": gpus, "cpu": 0.1},
    }


def latency(srv: Server, n: int) -> dict[str, float]:
    ids = []
    for i in range(n):
        ids.append(srv.http.post("/v1/workloads", json=_job(f"lat-{i}", 0.25)).json()["id"])
        time.sleep(0.05)
    deadline = time.time() + 120
    lat = []
    for wid in ids:
        while True:
            d = srv.http.get(f"/v1/workloads/{wid}").json()
            if d["phase"] in ("succeeded", "failed"):
                break
            if time.time() > deadline:
                raise RuntimeError(f"{wid} did not finish: {d['phase']}")
            time.sleep(0.1)
        ev = {e["kind"]: e["time"] for e in reversed(d["events"])}
        lat.append(ev["launched"] - ev["pending"])
    return {"jobs": n, "p50_ms": _pct(lat, 0.5) * 1000, "p99_ms": _pct(lat, 0.99) * 1000}


def throughput(srv: Server, total: int, threads: int = 8) -> dict[str, float]:
    done = [0]
    lock = threading.Lock()

    def worker(k: int) -> None:
        with httpx.Client(
            base_url=srv.url, headers={"Authorization": f"Bearer {srv.token}"}, timeout=60
        ) as c:
            for i in range(k, total, threads):
                r = c.post("/v1/workloads", json=_job(f"q-{i}", 64))  # never fits: stays queued
                r.raise_for_status()
                with lock:
                    done[0] += 1

    start = time.perf_counter()
    ts = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    wall = time.perf_counter() - start
    return {"submissions": done[0], "threads": threads, "wall_s": wall, "per_s": done[0] / wall}


def fill(srv: Server, queued: int) -> None:
    have = len(srv.http.get("/v1/workloads", params={"phase": "pending", "limit": 100000}).json())
    if have < queued:
        throughput(srv, queued - have)


def ps(srv: Server, runs: int = 30) -> dict[str, float]:
    api = []
    for _ in range(runs):
        t = time.perf_counter()
        rows = srv.http.get(
            "/v1/workloads",
            params={"phase": ["pending", "scheduled", "running", "preempted"], "limit": 100000},
        ).json()
        api.append(time.perf_counter() - t)
    cli = []
    for _ in range(3):
        t = time.perf_counter()
        subprocess.run([AIFAB, "ps", "-o", "json"], env=srv.env, capture_output=True, check=True)
        cli.append(time.perf_counter() - t)
    return {
        "rows": len(rows),
        "api_p50_ms": _pct(api, 0.5) * 1000,
        "api_p99_ms": _pct(api, 0.99) * 1000,
        "cli_median_ms": statistics.median(cli) * 1000,
    }


def schedule_pass(home: Path, runs: int = 5) -> dict[str, float]:
    """One schedule pass over the server's own store (the server is stopped first)."""
    from aifab.backends.local import LocalBackend, detect_inventory
    from aifab.control.db import Database
    from aifab.control.loops import Controller
    from aifab.control.settings import Settings

    settings = Settings.load(env={}, home=home, gpus=4)
    db = Database(settings.database_url)
    ctl = Controller(db, LocalBackend(home, detect_inventory(gpus=4)), settings)
    times = []
    pending = 0
    for _ in range(runs):
        ctl._last_mark = None  # time full passes: nothing changes between these, so one would be skipped
        t = time.perf_counter()
        result = ctl.schedule_once()
        times.append(time.perf_counter() - t)
        pending = len(result.pending) if result else 0
    db.dispose()
    return {"pending": pending, "p50_ms": statistics.median(times) * 1000, "max_ms": max(times) * 1000}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--latency-jobs", type=int, default=40)
    ap.add_argument("--submissions", type=int, default=3000)
    ap.add_argument("--queued", type=int, default=10000)
    args = ap.parse_args()
    calib = calibration_seconds()
    home = Path(tempfile.mkdtemp(prefix="aifab-bench-"))
    srv = Server(home)
    try:
        srv.http.post("/v1/projects", json={"name": "bench", "deserved_gpus": 4}).raise_for_status()
        lat = latency(srv, args.latency_jobs)
        print("latency", lat, flush=True)
        thr = throughput(srv, args.submissions)
        print("throughput", thr, flush=True)
        fill(srv, args.queued)
        listing = ps(srv)
        print("ps", listing, flush=True)
    finally:
        srv.stop()
    sched = schedule_pass(home)
    print("schedule", sched, flush=True)
    out = {
        "machine": machine(),
        "calibration_ms": calib * 1000,
        "latency": lat,
        "throughput": thr,
        "ps": listing,
        "schedule": sched,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "control_plane.json").write_text(json.dumps(out, indent=2))
    (RESULTS / "control_plane.md").write_text(_markdown(out, args))
    print(f"wrote {RESULTS / 'control_plane.md'}")
    return 0


def _markdown(o: dict[str, Any], args: argparse.Namespace) -> str:
    m = o["machine"]
    lat, thr, ps_, sc = o["latency"], o["throughput"], o["ps"], o["schedule"]
    rows = [
        ("submit-to-running latency, p50", f"{lat['p50_ms']:.0f} ms", "<= 100 ms", lat["p50_ms"] <= 100),
        ("submit-to-running latency, p99", f"{lat['p99_ms']:.0f} ms", "-", None),
        (
            f"sustained submissions through the API ({thr['threads']} clients)",
            f"{thr['per_s']:.0f} /s",
            ">= 500 /s",
            thr["per_s"] >= 500,
        ),
        (
            f"`GET /v1/workloads` (what `aifab ps` calls) with {ps_['rows']:,} queued, p99",
            f"{ps_['api_p99_ms']:.0f} ms",
            "<= 200 ms",
            ps_["api_p99_ms"] <= 200,
        ),
        (
            f"`aifab ps -o json` whole command with {ps_['rows']:,} queued, median",
            f"{ps_['cli_median_ms']:.0f} ms",
            "-",
            None,
        ),
        (
            f"one schedule pass with {sc['pending']:,} queued, p50",
            f"{sc['p50_ms']:.0f} ms",
            "keeps up (< 1 s loop period)",
            sc["p50_ms"] < 1000,
        ),
    ]
    lines = [
        "# Control plane on one machine",
        "",
        f"- command: `.venv/bin/python bench/control_plane.py --latency-jobs {args.latency_jobs} --submissions {args.submissions} --queued {args.queued}`",
        f"- date: {m['date']}, nproc: {m['cores']}, Python {m['python']}; store: SQLite (WAL) under a fresh AIFAB_HOME; "
        f"calibration workload {o['calibration_ms']:.1f} ms",
        "",
        "| measure | result | target | verdict |",
        "|---|---:|---|---|",
    ]
    for name, value, target, ok in rows:
        verdict = "-" if ok is None else ("meets" if ok else "misses")
        lines.append(f"| {name} | {value} | {target} | {verdict} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
