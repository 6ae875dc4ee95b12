"""docs/benchmarks.md is what bench/make_docs.py makes of bench/results, and its table of goals
judges each figure by the goal it quotes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from bench.make_docs import DOC, build
from bench.targets import MET, MISSED, NOT_MEASURED, rows


def test_benchmarks_doc_is_generated_from_the_results() -> None:
    assert DOC.read_text() == build(), "run .venv/bin/python bench/make_docs.py"


def _engines(ray_runs: list[tuple[float, float]]) -> dict[str, Any]:
    return {
        "machine": {"date": "2026-11-29 08:29 UTC"},
        "jobs": 1000,
        "results": [
            {
                "engine": "ray",
                "job_seconds": 0.0,
                "runs": [{"direct": {"total_s": d}, "aifab": {"total_s": a}} for d, a in ray_runs],
            },
            # jobs that last have no target of their own: not judged here
            {
                "engine": "ray",
                "job_seconds": 2.0,
                "runs": [{"direct": {"total_s": 1}, "aifab": {"total_s": 9}}],
            },
        ],
    }


def _cycle(median_ms: float) -> dict[str, Any]:
    case = {"median_ms": median_ms, "samples_ms": [median_ms] * 3, "target_ms": 100.0, "must_ms": 250.0}
    return {
        "machine": {"date": "d"},
        "calibration_ms": 50.0,
        "cases": [
            {**case, "case": "1,000 nodes — placement aifab"},
            {**case, "case": "1,000 nodes — placement binpack", "median_ms": 999.0},  # not the default
        ],
    }


def _write(tmp: Path, name: str, data: dict[str, Any]) -> None:
    (tmp / name).write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("runs", "verdict"),
    [
        ([(1.0, 1.05), (1.0, 1.5), (1.0, 1.08)], MET),  # the median run's ratio, 1.08
        ([(1.0, 1.05), (1.0, 1.5), (1.0, 1.2)], MISSED),  # median 1.2
        ([(2.0, 2.2)], MET),  # exactly 10% over
    ],
)
def test_engine_target_is_judged_on_the_median_run(
    tmp_path: Path, runs: list[tuple[float, float]], verdict: str
) -> None:
    _write(tmp_path, "engines.json", _engines(runs))
    got = [r for r in rows(tmp_path) if r.issue.startswith("4")]
    assert [r.verdict for r in got] == [verdict]


@pytest.mark.parametrize(
    ("median", "must", "target"),
    [(99.9, MET, MET), (100.0, MET, MET), (100.1, MET, MISSED), (251.0, MISSED, MISSED)],
)
def test_cycle_goals_judge_the_default_placement(
    tmp_path: Path, median: float, must: str, target: str
) -> None:
    _write(tmp_path, "cycle_speed.json", _cycle(median))
    got = [(r.kind, r.verdict) for r in rows(tmp_path) if "one cycle" in r.goal]
    assert got == [("must", must), ("target", target)]


def test_replay_target_names_the_policies_over_it(tmp_path: Path) -> None:
    results = [
        {"policy": p, "wall_s": s, "avg_jct_s": j, "quota_promise_pct": 99.5}
        for p, s, j in [("fifo", 12.0, 900.0), ("kai", 31.0, 500.0), ("aifab", 29.0, 400.0)]
    ]
    _write(tmp_path, "philly-full.json", {"date": "2026-11-29T19:01:52", "nproc": 2, "results": results})
    by_goal = {r.goal: r for r in rows(tmp_path)}
    target = by_goal["the full replay, per policy, at most 30 s"]
    assert target.verdict == MISSED and "over: kai 31.0 s" in target.measured
    assert by_goal["the full replay, per policy, at most 120 s"].verdict == MET
    assert by_goal["aifab's default beats KAI-like on average JCT"].verdict == MET
    assert "quota promise" in " ".join(by_goal) and all(
        r.verdict == MET for g, r in by_goal.items() if "quota promise" in g
    )


def test_a_missing_results_file_reads_not_measured(tmp_path: Path) -> None:
    got = rows(tmp_path)
    assert got and all(r.verdict == NOT_MEASURED for r in got)
    assert any("`packing_floor.json`" in r.measured for r in got)
