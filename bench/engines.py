"""aifab in front of an engine against the engine alone (issue #4, section 5), side by side in
one run: N trivial jobs sent straight to Slurm (``sbatch``) and through aifab to the same Slurm
cluster; N trivial Ray tasks and the same N jobs through aifab to the same Ray cluster.

    .venv/bin/python bench/engines.py [--jobs 1000] [--engine slurm --engine ray] [--job-seconds S --name STEM]

Each job runs ``true`` with one CPU (``--job-seconds S``: ``sleep S``, to see how aifab's fixed cost
per job weighs against jobs that last). Reported per engine and path: the submission rate, and the
time from the first submission until every job has finished (the end-to-end time aifab's
overhead is judged on; target: within 10% of the engine alone).

The clusters are the test clusters (``scripts/slurm/cluster.sh``: two nodes with 4 CPUs each;
``tests/backends/ray_cluster.py``: a head with 1 CPU and two workers with 2 CPUs each), started
and stopped here. Through aifab, a real ``aifab server --config`` process serves the pool and jobs are
submitted through its HTTP API, one call per job; direct Ray tasks are submitted from this process, direct ``sbatch`` calls one command per job, as a user's script
would. Writes bench/results/engines.{json,md} (``--name``: another file stem).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._timing import machine

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
CLUSTER_SH = ROOT / "scripts" / "slurm" / "cluster.sh"
POLL_S = 0.1


# ----------------------------------------------------------------------------------- aifab


def _aifab_run(
    home: Path, config: str, jobs: int, memory: str | None, command: list[str]
) -> dict[str, float]:
    """Submit ``jobs`` trivial jobs, one API call each as a user's script would, to a real
    ``aifab server --config`` process; the end is read from its store (SQLite, read-only)."""
    import sqlite3

    from bench._server import Server

    home.mkdir(parents=True)
    (home / "config.yaml").write_text(config)
    srv = Server(home, ("--config", str(home / "config.yaml")))
    store = sqlite3.connect(f"file:{home / 'aifab.db'}?mode=ro", uri=True)
    resources: dict[str, Any] = {"cpu": 1}
    if memory:
        resources["memory"] = memory
    spec = {"kind": "job", "name": "t", "project": "bench", "command": command, "resources": resources}
    try:
        assert srv.http.post("/v1/projects", json={"name": "bench"}).status_code == 201
        t0 = time.perf_counter()
        for _ in range(jobs):
            r = srv.http.post("/v1/workloads", json=spec)
            assert r.status_code == 201, r.text
        submitted = time.perf_counter() - t0
        done = "SELECT count(*) FROM workloads WHERE phase IN ('succeeded', 'failed', 'cancelled')"
        while store.execute(done).fetchone()[0] < jobs:
            time.sleep(POLL_S)
        total = time.perf_counter() - t0
        failed = store.execute("SELECT count(*) FROM workloads WHERE phase != 'succeeded'").fetchone()[0]
    finally:
        store.close()
        srv.stop()
    return {"submit_s": submitted, "total_s": total, "not_succeeded": float(failed)}


# ----------------------------------------------------------------------------------- Slurm


def _script(*args: str) -> str:
    done = subprocess.run(["bash", str(CLUSTER_SH), *args], capture_output=True, text=True, timeout=180)
    if done.returncode != 0:
        raise SystemExit(f"cluster.sh {' '.join(args)} failed:\n{done.stdout}{done.stderr}")
    return done.stdout


def _slurm_env(conf: Path) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "SLURM_CONF": str(conf)}


def _slurm_direct(conf: Path, jobs: int, out_dir: Path, command: list[str]) -> dict[str, float]:
    env = _slurm_env(conf)
    t0 = time.perf_counter()
    for i in range(jobs):
        subprocess.run(
            ["sbatch", "--parsable", "--partition=gpu", "--cpus-per-task=1", "--mem=64M",
             f"--output={out_dir}/direct-{i}.log", "--wrap", " ".join(command)],
            env=env, check=True, capture_output=True, timeout=60,
        )  # fmt: skip
    submitted = time.perf_counter() - t0
    while subprocess.run(
        ["squeue", "-h", "-o", "%i"], env=env, capture_output=True, text=True
    ).stdout.strip():
        time.sleep(POLL_S)
    return {"submit_s": submitted, "total_s": time.perf_counter() - t0, "not_succeeded": 0.0}


def bench_slurm(jobs: int, work: Path, command: list[str]) -> dict[str, Any]:
    _script("install")
    root = Path(tempfile.mkdtemp(prefix="aifab-bslurm-", dir="/tmp"))  # short: slurmstepd sockets
    _script("start", str(root))
    conf = root / "etc" / "slurm.conf"
    try:
        out = work / "slurm-direct"
        out.mkdir(parents=True)
        direct = _slurm_direct(conf, jobs, out, command)
        config = (
            "pools:\n  slurm:\n    backend: slurm\n    partition: gpu\n"
            f"    slurm_conf: {conf}\n    virtual_gpus: true\n    default_memory_mib: 64\n"
        )
        through = _aifab_run(work / "aifab-slurm", config, jobs, "64MiB", command)
    finally:
        _script("stop", str(root))
        shutil.rmtree(root, ignore_errors=True)
    return {"engine": "slurm", "direct": direct, "aifab": through}


# ------------------------------------------------------------------------------------- Ray


def bench_ray(jobs: int, work: Path, command: list[str]) -> dict[str, Any]:
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_tmp = tempfile.mkdtemp(prefix="aifab-bray-", dir="/tmp")
    os.environ["RAY_TMPDIR"] = ray_tmp
    import ray
    import ray._private.ray_constants as ray_constants
    from tests.backends.ray_cluster import LoopbackRay

    ray_constants.ENABLE_RAY_CLUSTER = False
    cluster = LoopbackRay(work / "ray-shared")
    (work / "ray-shared").mkdir(parents=True)
    try:
        cluster.start()
        ray.init(address=cluster.address, namespace="bench-direct")

        @ray.remote(num_cpus=1)
        def trivial() -> int:
            return subprocess.run(command, check=False).returncode

        ray.get([trivial.remote() for _ in range(10)])  # warm the workers, as aifab's runs below are
        t0 = time.perf_counter()
        refs = [trivial.remote() for _ in range(jobs)]
        submitted = time.perf_counter() - t0
        codes = ray.get(refs)
        direct = {
            "submit_s": submitted,
            "total_s": time.perf_counter() - t0,
            "not_succeeded": float(sum(1 for c in codes if c != 0)),
        }
        config = f"pools:\n  ray:\n    backend: ray\n    address: {cluster.address}\n    namespace: bench\n"
        through = _aifab_run(work / "aifab-ray", config, jobs, None, command)
    finally:
        cluster.stop()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    return {"engine": "ray", "direct": direct, "aifab": through}


# ---------------------------------------------------------------------------------- report


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run whose aifab / engine-alone ratio is the median (all its figures come from it)."""
    ordered = sorted(runs, key=ratio)
    return ordered[len(ordered) // 2]


def ratio(run: dict[str, Any]) -> float:
    return float(run["aifab"]["total_s"] / run["direct"]["total_s"])


def _rows(results: list[dict[str, Any]], jobs: int) -> list[str]:
    lines = [
        "| engine | each job | path | submissions/s | time until all done (s) | jobs/s end to end | "
        "aifab / engine alone (each run's) | not succeeded |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        job = f"`sleep {r['job_seconds']:g}`" if r.get("job_seconds") else "`true`"
        m_run = median_run(r["runs"])
        every = ", ".join(f"{ratio(x):.2f}" for x in r["runs"])
        base = m_run["direct"]["total_s"]
        for path in ("direct", "aifab"):
            m = m_run[path]
            label = f"{r['engine']} alone" if path == "direct" else f"aifab → {r['engine']}"
            shown = f"{m['total_s'] / base:.2f}" + (f" ({every})" if path == "aifab" else "")
            lines.append(
                f"| {r['engine']} | {job} | {label} | {jobs / m['submit_s']:.0f} | {m['total_s']:.1f} | "
                f"{jobs / m['total_s']:.1f} | {shown} | {m['not_succeeded']:.0f} |"
            )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=1000)
    ap.add_argument("--engine", action="append", choices=["slurm", "ray"])
    ap.add_argument("--runs", type=int, default=1, help="runs per engine; the median run is reported")
    ap.add_argument(
        "--job-seconds",
        type=float,
        action="append",
        help="each job sleeps this long (0: runs true); repeat for several runs of every engine",
    )
    ap.add_argument("--name", default="engines", help="results file stem")
    args = ap.parse_args()
    lengths = args.job_seconds or [0.0]
    for secs in lengths:
        if not secs >= 0:
            ap.error(f"--job-seconds must be >= 0, got {secs}")
    engines = args.engine or ["slurm", "ray"]
    work = Path(tempfile.mkdtemp(prefix="aifab-bench-engines-"))
    results = []
    try:
        for name in engines:
            for k, secs in enumerate(lengths):
                job_command = ["sleep", f"{secs:g}"] if secs else ["true"]
                runs = []
                for i in range(args.runs):
                    print(
                        f"== {name} run {i + 1}: {args.jobs} x {' '.join(job_command)} alone, then through aifab",
                        flush=True,
                    )
                    load = os.getloadavg()[0]
                    run = (bench_slurm if name == "slurm" else bench_ray)(
                        args.jobs, work / f"{name}-{k}-{i}", job_command
                    )
                    runs.append({**run, "load_average": [round(load, 2), round(os.getloadavg()[0], 2)]})
                    print(json.dumps(runs[-1], indent=1), flush=True)
                results.append({"engine": name, "job_seconds": secs, "runs": runs})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    RESULTS.mkdir(exist_ok=True)
    command = "python bench/engines.py " + " ".join(sys.argv[1:])
    loads = "; ".join(
        f"{r['engine']}"
        + (f" {r['job_seconds']:g} s" if r["job_seconds"] else "")
        + ": "
        + ", ".join(f"{a}-{b}" for a, b in (x["load_average"] for x in r["runs"]))
        for r in results
    )
    payload = {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "command": command.strip(),
        "jobs": args.jobs,
        "results": results,
    }
    (RESULTS / f"{args.name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    md = [
        f"`{payload['command']}` — {payload['machine']}, {payload['date']}",
        "",
        f"Each row is the run with the median ratio of {args.runs}; 1-minute load average before and "
        f"after each run (the machine is shared): {loads}.",
        "",
        *_rows(results, args.jobs),
    ]
    (RESULTS / f"{args.name}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
