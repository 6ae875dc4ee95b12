"""Where the time goes in the two speed targets of issue #2 that are missed: the Philly replay
of the policies that preempt by job order, and one 1,000-node cycle.

    .venv/bin/python bench/time_split.py [--policy tiresias --policy srtf] [--limit-jobs N] [--runs 7]

Times each part of the scheduling cycle (the memo's refresh, the session, fair shares, each
action, the explanations) by wrapping those functions for the run and putting them back after;
the decisions are the same as without the wrappers (a test checks it). For a replay it also
sorts the cycles that ran by what they decided, and works out the most that a part could give:
if it cost nothing, the replay would be ``wall / (wall - part)`` times faster. Writes
bench/results/time_split.{json,md}.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aifab.core import ClusterSnapshot
from aifab.core.decisions import CycleResult
from aifab.scheduler import SchedulerConfig, run_cycle
from aifab.scheduler.actions import ACTIONS
from aifab.scheduler.memo import CycleMemo
from aifab.scheduler.session import Session
from aifab.sim.engine import Simulator
from aifab.sim.policies import get_policy
from aifab.sim.scenarios import load_scenario
from bench._timing import calibration_seconds, machine

RESULTS = Path(__file__).resolve().parent / "results"
REPLAY_TARGET_S = 30.0  # issue #2, 5c: the full replay, per policy
CYCLE_TARGET_MS = 100.0  # issue #2, 5c: the 1,000-node cycle
CYCLE = importlib.import_module("aifab.scheduler.cycle")
# The parts of a cycle, in the order they run (actions in between, by name).
FIRST = ("memo refresh", "session")
LAST = ("fair shares", "explain")


class Split:
    """Seconds per part, in total and for the cycle being run."""

    def __init__(self) -> None:
        self.total: dict[str, float] = {}
        self.cycle: dict[str, float] = {}

    def add(self, part: str, seconds: float) -> None:
        self.total[part] = self.total.get(part, 0.0) + seconds
        self.cycle[part] = self.cycle.get(part, 0.0) + seconds


def _timed(fn: Callable[..., Any], part: str, split: Split) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            split.add(part, time.perf_counter() - started)

    return wrapper


@contextmanager
def timing_parts(split: Split) -> Iterator[None]:
    """Wrap the parts of a cycle so that ``split`` gets their seconds; restore them after."""
    saved_actions = dict(ACTIONS)
    saved = [
        (CycleMemo, "refresh", CycleMemo.refresh, "memo refresh"),
        (Session, "__init__", Session.__init__, "session"),
        (CYCLE, "_fair_shares", CYCLE._fair_shares, "fair shares"),
        (CYCLE, "explain", CYCLE.explain, "explain"),
    ]
    try:
        for owner, name, fn, part in saved:
            setattr(owner, name, _timed(fn, part, split))
        for name, fn in saved_actions.items():
            ACTIONS[name] = _timed(fn, name, split)
        yield
    finally:
        for owner, name, fn, _ in saved:
            setattr(owner, name, fn)
        ACTIONS.update(saved_actions)


def _outcome(result: CycleResult) -> str:
    if result.evictions:
        return "evicted and bound" if result.binds else "evicted only"
    if result.binds:
        return "bound only"
    if result.stats.get("preempt_blocked") == 1.0:
        return "nothing, preemption blocked"
    return "nothing"


def replay_split(policy: str, limit_jobs: int | None) -> dict[str, Any]:
    """One replay of the Philly scenario with its cycle's parts timed (see the module doc)."""
    scenario = load_scenario("philly", limit_jobs=limit_jobs)
    split = Split()
    memo = CycleMemo()
    classes: dict[str, dict[str, float]] = {}

    def scheduler(snapshot: ClusterSnapshot, config: SchedulerConfig) -> CycleResult:
        split.cycle = {}
        started = time.perf_counter()
        result = run_cycle(snapshot, config, memo=memo)
        took = time.perf_counter() - started
        split.add("cycle", took)
        got = classes.setdefault(_outcome(result), {"cycles": 0, "seconds": 0.0, "preempt": 0.0})
        got["cycles"] += 1
        got["seconds"] += took
        got["preempt"] += split.cycle.get("preempt", 0.0)
        return result

    with timing_parts(split):
        started = time.perf_counter()
        out = Simulator(scenario, get_policy(policy), policy=policy, scheduler=scheduler).run()
        wall = time.perf_counter() - started
    parts = dict(split.total)
    cycle = parts.pop("cycle", 0.0)
    named = sum(parts.values())
    parts["rest of the cycle"] = cycle - named
    parts["simulator"] = wall - cycle
    quiet = [c for name, c in classes.items() if name.startswith("nothing")]
    quiet_s = sum(c["seconds"] for c in quiet)
    quiet_preempt = sum(c["preempt"] for c in quiet)
    preempt = parts.get("preempt", 0.0)
    return {
        "policy": policy,
        "jobs": len(scenario.jobs),
        "wall_s": wall,
        "cycles": int(out.counters["cycles"]),
        "counters": {k: v for k, v in out.counters.items() if k != "wall_seconds"},
        "parts_s": parts,
        "classes": classes,
        # What the target asks of this run: to take REPLAY_TARGET_S at most.
        "needed": wall / REPLAY_TARGET_S,
        # The most each saving could give: the replay without that time.
        "if_free": {
            "preemption": _speedup(wall, preempt),
            "quiet cycles": _speedup(wall, quiet_s),
            "preemption and quiet cycles": _speedup(wall, preempt + quiet_s - quiet_preempt),
            "the whole scheduler": _speedup(wall, cycle),
        },
    }


def _speedup(wall: float, saved: float) -> float:
    return wall / max(wall - saved, 1e-9)


def cycle_split(runs: int) -> dict[str, Any]:
    """Median seconds per part of the 1,000-node cycle of bench/cycle_speed.py."""
    from bench._snapshots import SnapshotSize, build_snapshot

    snapshot = build_snapshot(SnapshotSize(1000, 8000, 10000))
    config = SchedulerConfig()
    result = run_cycle(snapshot, config)  # warm-up, and what it decides
    samples: dict[str, list[float]] = {}
    for _ in range(runs):
        split = Split()
        with timing_parts(split):
            started = time.perf_counter()
            run_cycle(snapshot, config)
            took = time.perf_counter() - started
        named = sum(split.total.values())
        for part, seconds in [*split.total.items(), ("rest of the cycle", took - named), ("cycle", took)]:
            samples.setdefault(part, []).append(seconds)
    return {
        "case": "1,000 nodes x 8 GPUs, 8,000 running + 10,000 pending, default placement",
        "runs": runs,
        "binds": len(result.binds),
        "evictions": len(result.evictions),
        "median_ms": {part: statistics.median(v) * 1000 for part, v in samples.items()},
    }


def _order(parts: dict[str, Any]) -> list[str]:
    actions = [p for p in parts if p not in (*FIRST, *LAST, "rest of the cycle", "simulator", "cycle")]
    return [p for p in (*FIRST, *actions, *LAST, "rest of the cycle", "simulator") if p in parts]


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        f"Command: `{report['command']}` — {m['cores']} cores, Python {m['python']}, {m['date']}. "
        f"Calibration workload: {report['calibration_ms']:.1f} ms. Times are with the parts wrapped "
        "(a few per cent slower than without).",
        "",
        "### The replays: each part's share of the wall time",
        "",
    ]
    reps = report["replays"]
    if reps:
        lines += [
            "| part | " + " | ".join(f"{r['policy']} s | %" for r in reps) + " |",
            "|---|" + "---:|---:|" * len(reps),
        ]
        for part in _order(reps[0]["parts_s"]):
            cells = []
            for r in reps:
                s = r["parts_s"].get(part, 0.0)
                cells += [f"{s:.2f}", f"{100 * s / r['wall_s']:.1f}"]
            lines.append(f"| {part} | " + " | ".join(cells) + " |")
        lines.append("| **wall** | " + " | ".join(f"**{r['wall_s']:.2f}** | 100" for r in reps) + " |")
        lines += ["", "Cycles that ran, by what they decided:", ""]
        lines += [
            "| policy | decided | cycles | seconds | of which preempt s |",
            "|---|---|---:|---:|---:|",
        ]
        for r in reps:
            for name, c in sorted(r["classes"].items(), key=lambda kv: -kv[1]["seconds"]):
                lines.append(
                    f"| {r['policy']} | {name} | {c['cycles']:,} | {c['seconds']:.2f} | {c['preempt']:.2f} |"
                )
        lines += ["", "The most a part could give (the replay with that time gone):", ""]
        keys = list(reps[0]["if_free"])
        lines += [
            f"| policy | needed for {REPLAY_TARGET_S:.0f} s | "
            + " | ".join(f"{k} free" for k in keys)
            + " |",
            "|---|---:|" + "---:|" * len(keys),
        ]
        for r in reps:
            lines.append(
                f"| {r['policy']} | {r['needed']:.2f}x | "
                + " | ".join(f"{r['if_free'][k]:.2f}x" for k in keys)
                + " |"
            )
        lines += ["", _reading(reps)]
    c = report.get("cycle")
    if c:
        lines += [
            "",
            f"### One cycle: {c['case']}",
            "",
            f"Median of {c['runs']} cycles per part ({c['binds']} binds, {c['evictions']} evictions).",
            "",
            "| part | median ms | % of the cycle |",
            "|---|---:|---:|",
        ]
        total = c["median_ms"]["cycle"]
        for part in _order(c["median_ms"]):
            ms = c["median_ms"][part]
            lines.append(f"| {part} | {ms:.1f} | {100 * ms / total:.1f} |")
        lines.append(f"| **cycle** | **{total:.1f}** | 100 |")
        lines += ["", f"Needed for {CYCLE_TARGET_MS:.0f} ms in this run: {total / CYCLE_TARGET_MS:.2f}x."]
    return "\n".join(lines) + "\n"


def _reading(reps: list[dict[str, Any]]) -> str:
    """What the table says, policy by policy, in words."""
    out = []
    for r in reps:
        free = r["if_free"]
        out.append(
            f"{r['policy']} would have to run {r['needed']:.2f} times as fast to take "
            f"{REPLAY_TARGET_S:.0f} s here; if preemption cost nothing it would run "
            f"{free['preemption']:.2f} times as fast, if the cycles that decide nothing cost "
            f"nothing too, {free['preemption and quiet cycles']:.2f} times."
        )
    return " ".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", action="append", help="repeat; default: tiresias, srtf")
    ap.add_argument("--limit-jobs", type=int, default=None, help="default: all 52,849 jobs")
    ap.add_argument("--runs", type=int, default=7, help="1,000-node cycles timed")
    ap.add_argument("--no-write", action="store_true", help="print only (a trial run)")
    args = ap.parse_args()
    calib = calibration_seconds()
    cycle = cycle_split(args.runs)  # first: the replays leave a large, fragmented heap behind
    replays = []
    for policy in args.policy or ["tiresias", "srtf"]:
        replays.append(replay_split(policy, args.limit_jobs))
        print(f"{policy}: {replays[-1]['wall_s']:.1f} s", flush=True)
    report = {
        "command": ("python bench/time_split.py " + " ".join(sys.argv[1:])).strip(),
        "machine": machine(),
        "calibration_ms": calib * 1000,
        "replays": replays,
        "cycle": cycle,
    }
    text = markdown(report)
    print(text)
    if not args.no_write:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "time_split.json").write_text(json.dumps(report, indent=2) + "\n")
        (RESULTS / "time_split.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
