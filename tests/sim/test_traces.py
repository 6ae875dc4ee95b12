"""Trace loaders: parsing, gang mapping, clear errors, deterministic synthetic scenarios."""

from __future__ import annotations

from pathlib import Path

import pytest

from aifab.core.errors import TraceError
from aifab.sim.scenarios import largest_remainder, philly_scenario, resolve_trace
from aifab.sim.traces.philly import EXPECTED_ROWS, gang_sizes, read_philly
from aifab.sim.traces.synthetic import synthetic_scenario

HEADER = "timestamp,duration,num_gpus,gpu_time,cluster\n"
GOOD = [
    "2017-10-01 00:00:10,100.0,1,100.0,vc1\n",
    "2017-10-01 00:00:00,50.0,16,800.0,vc2\n",
    "2017-10-01 00:01:00,30.0,12,360.0,vc1\n",
]


def write(tmp_path: Path, rows: list[str], header: str = HEADER) -> Path:
    p = tmp_path / "philly.csv"
    p.write_text(header + "".join(rows))
    return p


def test_parses_and_sorts_by_submit(tmp_path: Path) -> None:
    jobs = read_philly(write(tmp_path, GOOD))
    assert [j.line for j in jobs] == [3, 2, 4]
    assert [j.submit for j in jobs] == [0.0, 10.0, 60.0]
    assert jobs[0].num_gpus == 16 and jobs[0].cluster == "vc2"


def test_gang_mapping() -> None:
    assert gang_sizes(1) == [1]
    assert gang_sizes(8) == [8]
    assert gang_sizes(12) == [6, 6]
    assert gang_sizes(16) == [8, 8]
    assert gang_sizes(20) == [7, 7, 6]
    assert gang_sizes(32) == [8, 8, 8, 8]


@pytest.mark.parametrize(
    ("row", "line", "expected"),
    [
        (
            [*GOOD[:1], "2017-10-01 00:00:00,50.0,x,800.0,vc2\n"],
            3,
            "philly.csv:3: column num_gpus: expected a positive integer, got 'x'",
        ),
        (
            ["bad-date,1,1,1,vc\n"],
            2,
            "philly.csv:2: column timestamp: expected YYYY-MM-DD HH:MM:SS, got 'bad-date'",
        ),
        (
            [*GOOD[:2], "2017-10-01 00:00:00,-5,1,1,vc\n"],
            4,
            "philly.csv:4: column duration: expected a positive number of seconds, got '-5'",
        ),
        (["2017-10-01 00:00:00,5,1,abc,vc\n"], 2, "philly.csv:2: column gpu_time"),
        (["2017-10-01 00:00:00,5,1,5, \n"], 2, "philly.csv:2: column cluster"),
        (["2017-10-01 00:00:00,5,1\n"], 2, "philly.csv:2: expected 5 fields, got 3"),
    ],
)
def test_bad_rows_name_file_line_column(tmp_path: Path, row: list[str], line: int, expected: str) -> None:
    with pytest.raises(TraceError) as info:
        read_philly(write(tmp_path, row))
    assert str(info.value).startswith(expected)
    assert info.value.line == line


def test_bad_header_and_empty_file(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match=r"philly.csv:1: header lacks column\(s\) num_gpus"):
        read_philly(write(tmp_path, GOOD, header="timestamp,duration,gpus,gpu_time,cluster\n"))
    with pytest.raises(TraceError, match=r"philly\.csv:1: empty file"):
        read_philly(write(tmp_path, [], header=""))
    with pytest.raises(TraceError, match="cannot read"):
        read_philly(tmp_path / "missing.csv")


def test_largest_remainder_sums_exactly() -> None:
    out = largest_remainder({"a": 1.0, "b": 1.0, "c": 1.0}, 448)
    assert sum(out.values()) == 448 and sorted(out.values()) == [149, 149, 150]
    out = largest_remainder({"a": 0.5, "b": 2.25, "c": 0.0}, 10)
    assert out == {"a": 2, "b": 8, "c": 0}


def test_philly_scenario_small(tmp_path: Path) -> None:
    sc = philly_scenario(write(tmp_path, GOOD), nodes=2, gpus_per_node=8)
    assert sc.capacity_gpus == 16
    assert sum(sc.deserved_gpus().values()) == 16
    big = next(j for j in sc.jobs if j.workload.queue == "vc2")
    assert [t.gpu.count for t in big.workload.tasks] == [8, 8]
    assert all(j.workload.preemptible and j.workload.checkpoint_interval == 1800.0 for j in sc.jobs)
    assert sc.sim.restart_overhead == 60.0


def test_real_philly_file_header_and_rows() -> None:
    path = resolve_trace("philly")
    assert path.read_text().splitlines()[0] == HEADER.strip()
    jobs = read_philly(path)
    assert len(jobs) == EXPECTED_ROWS


def test_synthetic_is_deterministic_per_seed() -> None:
    a = synthetic_scenario(seed=7, jobs=50)
    b = synthetic_scenario(seed=7, jobs=50)
    c = synthetic_scenario(seed=8, jobs=50)
    assert a.jobs == b.jobs
    assert a.jobs != c.jobs
    assert [j.submit_time for j in a.jobs] == sorted(j.submit_time for j in a.jobs)


def test_philly_quotas_sum_to_the_cluster() -> None:
    sc = philly_scenario(resolve_trace("philly"))
    deserved = sc.deserved_gpus()
    assert sc.capacity_gpus == 448 and sum(deserved.values()) == 448
    assert len(deserved) == 12  # the Sep-Oct file has 12 virtual clusters
    assert len(sc.jobs) == EXPECTED_ROWS
    gangs = [j for j in sc.jobs if len(j.workload.tasks) > 1]
    assert gangs and all(t.gpu.count <= 8 for j in gangs for t in j.workload.tasks)
