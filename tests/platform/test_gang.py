"""A gang through the control plane: the unchanged MNIST DDP script as two tasks (gloo on CPU),
started together with the torch.distributed variables; both ranks end with identical weights.
A gang whose member dies is torn down and retried as a whole."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from .conftest import Platform

TRAIN = Path(__file__).resolve().parents[2] / "examples" / "mnist" / "train.py"


def test_ddp_gang_finishes_with_identical_weights(platform: Platform, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("mlxtend")
    assert platform.api.post("/v1/projects", json={"name": "vision", "deserved_gpus": 2}).status_code == 201
    out = tmp_path / "ranks"
    spec = {
        "kind": "job",
        "name": "mnist-ddp",
        "project": "vision",
        "command": [sys.executable, str(TRAIN), "--epochs", "2", "--out-dir", str(out)],
        "workdir": str(TRAIN.parent),
        "replicas": 2,
        "resources": {"gpus": 1, "cpu": 0.5, "memory": "1GiB"},
    }
    wid = platform.api.post("/v1/workloads", json=spec).json()["id"]
    d = platform.wait(wid, lambda d: d["phase"] in ("succeeded", "failed"), timeout=120)
    assert d["phase"] == "succeeded", d["events"]
    assert sorted(t["task"] for t in d["tasks"]) == [0, 1]
    ranks = [json.loads((out / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]


def test_a_gang_whose_member_dies_is_torn_down_and_retried_whole(platform: Platform) -> None:
    assert platform.api.post("/v1/projects", json={"name": "vision", "deserved_gpus": 2}).status_code == 201
    code = "import os, sys, time; r = int(os.environ['RANK']); time.sleep(0.3); sys.exit(5) if r == 1 else time.sleep(60)"
    spec = {
        "kind": "job",
        "name": "gang",
        "project": "vision",
        "command": [sys.executable, "-c", code],
        "replicas": 2,
        "retries": 1,
        "checkpoint_grace": 1,
        "resources": {"gpus": 1},
    }
    wid = platform.api.post("/v1/workloads", json=spec).json()["id"]
    d = platform.wait(wid, lambda d: d["phase"] == "failed", timeout=60)
    assert d["attempt"] == 2 and d["failures"] == 2
    for attempt in (1, 2):
        tasks = {t["task"]: t for t in d["tasks"] if t["attempt"] == attempt}
        assert tasks[1]["exit_code"] == 5
        assert tasks[0]["state"] == "exited" and tasks[0]["exit_code"] != 0  # stopped, not left running
    assert any(e["kind"] == "stop" and "stopping the gang" in e["message"] for e in d["events"])
