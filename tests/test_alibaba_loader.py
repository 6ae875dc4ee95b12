"""The openb trace loader: good files load, bad rows fail with file, line and column."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from aifab.core.errors import TraceError
from aifab.sim.traces.alibaba import load_nodes, load_pods

DATA = Path(__file__).resolve().parents[1] / "data" / "alibaba-gpu-v2023"
POD_HEADER = "name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec\n"


def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_published_node_list_has_6212_gpus() -> None:
    nodes = load_nodes(DATA / "openb_node_list_gpu_node.csv")
    assert len(nodes) == 1213
    assert sum(n.gpus for n in nodes) == 6212


def test_published_pod_list_loads_with_and_without_gpu_spec() -> None:
    pods = load_pods(DATA / "openb_pod_list_gpuspec10.csv")
    assert len(pods) == 8152
    assert any(p.gpu_spec for p in pods)
    multi = load_pods(DATA / "openb_pod_list_multigpu20.csv")  # no gpu_spec column
    assert all(not p.gpu_spec for p in multi)


def test_good_rows(tmp_path: Path) -> None:
    p = _write(
        tmp_path, "pods.csv", POD_HEADER + "a,1000,2048,1,500,T4|P100\nb,2000,0,0,0,\nc,8000,1,8,1000,\n"
    )
    pods = load_pods(p)
    assert [x.name for x in pods] == ["a", "b", "c"]
    assert pods[0].gpu_spec == frozenset({"T4", "P100"})
    assert pods[0].shape().shared and pods[2].total_gpu_milli == 8000


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ("a,1000,2048,x,500,", "pods.csv:3: column num_gpu: expected an integer 0-8, got 'x'"),
        ("a,1000,2048,9,1000,", "pods.csv:3: column num_gpu: expected an integer 0-8, got '9'"),
        ("a,1000,2048,1,1500,", "pods.csv:3: column gpu_milli: expected an integer 0-1000, got '1500'"),
        ("a,-5,2048,1,500,", "pods.csv:3: column cpu_milli: expected an integer >= 0, got '-5'"),
        ("a,1000,2048,0,300,", "pods.csv:3: column gpu_milli: must be 0 when num_gpu is 0"),
        ("a,1000,2048,2,500,", "pods.csv:3: column gpu_milli: a pod with 2 GPUs must take 1000"),
        ("a,1000,2048,1,500", "pods.csv:3: expected 6 fields, got 5"),
    ],
)
def test_bad_pod_rows_name_file_line_and_column(tmp_path: Path, row: str, expected: str) -> None:
    p = _write(tmp_path, "pods.csv", POD_HEADER + "ok,1000,1,1,1000,\n" + row + "\n")
    with pytest.raises(TraceError) as err:
        load_pods(p)
    assert str(err.value).startswith(expected)
    assert err.value.line == 3


def test_missing_column_and_bad_node_rows(tmp_path: Path) -> None:
    p = _write(tmp_path, "pods.csv", "name,cpu_milli,num_gpu\na,1,0\n")
    with pytest.raises(TraceError, match=r"pods.csv:1: missing column\(s\) memory_mib, gpu_milli"):
        load_pods(p)
    n = _write(tmp_path, "nodes.csv", "sn,cpu_milli,memory_mib,gpu,model\nn1,64000,1024,2,T4\nn1,1,1,1,T4\n")
    with pytest.raises(TraceError, match=re.escape("nodes.csv:3: column sn: duplicate node name 'n1'")):
        load_nodes(n)
    n2 = _write(tmp_path, "nodes2.csv", "sn,cpu_milli,memory_mib,gpu,model\nn1,64000,1024,two,T4\n")
    with pytest.raises(
        TraceError, match=re.escape("nodes2.csv:2: column gpu: expected an integer 0-8, got 'two'")
    ):
        load_nodes(n2)
    with pytest.raises(TraceError, match=re.escape("nope.csv:0: cannot open")):
        load_nodes(tmp_path / "nope.csv")
