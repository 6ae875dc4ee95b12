"""``aifab sim`` end to end, in-process with Typer's runner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from aifab.cli.main import app
from aifab.sim import engine

runner = CliRunner()

TINY = (
    "timestamp,duration,num_gpus,gpu_time,cluster\n"
    "2017-10-01 00:00:00,3600,8,28800,vcA\n"
    "2017-10-01 00:01:00,600,1,600,vcB\n"
    "2017-10-01 00:02:00,1200,4,4800,vcA\n"
    "2017-10-01 00:03:00,7200,16,115200,vcB\n"
    "2017-10-01 00:05:00,300,2,600,vcC\n"
    "2017-10-01 00:06:00,900,1,900,vcC\n"
)


@pytest.fixture(autouse=True)
def scheduler(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real scheduler when it is importable, else the tests' greedy stand-in."""
    try:
        from aifab.scheduler import run_cycle  # noqa: F401
    except ImportError:
        from tests.sim._fake_scheduler import greedy_cycle

        monkeypatch.setattr(engine, "default_scheduler", lambda: greedy_cycle)


def test_sim_writes_table_csv_json_and_plots(tmp_path: Path) -> None:
    trace = tmp_path / "tiny.csv"
    trace.write_text(TINY)
    out = tmp_path / "out"
    res = runner.invoke(
        app,
        [
            "sim",
            "--trace",
            str(trace),
            "--policy",
            "fifo",
            "--policy",
            "aifab",
            "--nodes",
            "2",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "avg JCT h" in res.output and "fifo" in res.output and "aifab" in res.output
    for name in ("results.csv", "results.json", "allocation.png", "jct_cdf.png"):
        assert (out / name).stat().st_size > 0
    data = json.loads((out / "results.json").read_text())
    assert [r["policy"] for r in data["results"]] == ["fifo", "aifab"]
    assert data["results"][0]["jobs"] == 6
    assert (out / "results.csv").read_text().splitlines()[0].startswith("policy,jobs,unfinished,avg_jct_s")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--trace", "no/such/file.csv", "--policy", "fifo"], "unknown trace"),
        (["--trace", "philly", "--policy", "bogus"], "unknown policy 'bogus'"),
    ],
)
def test_bad_input_exits_2_with_one_line(args: list[str], message: str) -> None:
    res = runner.invoke(app, ["sim", *args])
    assert res.exit_code == 2
    assert message in res.output
    assert "Traceback" not in res.output


def test_bad_row_exits_2_naming_the_line(tmp_path: Path) -> None:
    trace = tmp_path / "bad.csv"
    trace.write_text(TINY + "2017-10-01 00:07:00,60,x,60,vcA\n")
    res = runner.invoke(app, ["sim", "--trace", str(trace), "--policy", "fifo", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2
    assert "bad.csv:8: column num_gpus: expected a positive integer, got 'x'" in res.output


def test_version() -> None:
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and "aifab 0.1.0" in res.output
