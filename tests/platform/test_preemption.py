"""Preemption through the control plane: reclaim evicts the cheapest borrower with SIGTERM and
its grace period, the victim saves, is requeued with the same checkpoint directory, and resumes
where it stopped once there is room again."""

from __future__ import annotations

import sys
from pathlib import Path

from .conftest import Platform

SCRIPT = str(Path(__file__).with_name("steps_job.py"))


def steps_job(name: str, project: str, total: int, pause: float, **extra: object) -> dict[str, object]:
    return {
        "kind": "job",
        "name": name,
        "project": project,
        "command": [sys.executable, SCRIPT, str(total), str(pause)],
        "resources": {"gpus": 1},
        "checkpoint_grace": 5,
        **extra,
    }


def test_reclaim_preempts_a_borrower_which_resumes_from_its_checkpoint(platform: Platform) -> None:
    for name in ("a", "b"):
        assert platform.api.post("/v1/projects", json={"name": name, "deserved_gpus": 1}).status_code == 201
    # a borrows b's idle GPU with a second job.
    a1 = platform.api.post("/v1/workloads", json=steps_job("a1", "a", 40, 0.1)).json()["id"]
    a2 = platform.api.post("/v1/workloads", json=steps_job("a2", "a", 40, 0.1)).json()["id"]
    for w in (a1, a2):
        platform.wait(w, lambda d: d["phase"] == "running")
    platform.wait(a2, lambda d: d["last_checkpoint_time"] is not None)
    # b wants its deserved GPU back.
    b1 = platform.api.post("/v1/workloads", json=steps_job("b1", "b", 3, 0.1)).json()["id"]
    platform.wait(b1, lambda d: d["phase"] == "succeeded", timeout=30)
    victims = [
        w
        for w in (a1, a2)
        if any(e["kind"] == "preempted" for e in platform.api.get(f"/v1/workloads/{w}").json()["events"])
    ]
    assert len(victims) == 1, "exactly one of a's jobs yields (a stays at its fair share of 1)"
    victim = platform.wait(victims[0], lambda d: d["phase"] == "succeeded", timeout=40)
    assert victim["attempt"] == 2
    kinds = [e["kind"] for e in victim["events"]]
    assert kinds.index("evict") < kinds.index("preempted") < len(kinds) - 1 - kinds[::-1].index("pending")
    assert any("reclaim" in e["message"] for e in victim["events"] if e["kind"] == "evict")
    assert victim["lost_gpu_seconds"] < 5  # it checkpointed every 0.1 s: little work lost
    first = platform.api.get(f"/v1/workloads/{victims[0]}/logs", params={"attempt": 1}).json()["text"]
    second = platform.api.get(f"/v1/workloads/{victims[0]}/logs", params={"attempt": 2}).json()["text"]
    saved = int(first.split("preempted at step ")[1].split(";")[0])
    assert f"resumed from step {saved}" in second and "done 40" in second
    assert victim["tasks"][0]["attempt"] == 1 and victim["tasks"][1]["attempt"] == 2


def test_higher_priority_job_preempts_inside_its_project(platform: Platform) -> None:
    assert platform.api.post("/v1/projects", json={"name": "a", "deserved_gpus": 2}).status_code == 201
    low = platform.api.post(
        "/v1/workloads", json=steps_job("low", "a", 40, 0.1, resources={"gpus": 2}, priority="batch")
    ).json()["id"]
    platform.wait(low, lambda d: d["phase"] == "running")
    high = platform.api.post(
        "/v1/workloads", json=steps_job("high", "a", 2, 0.05, priority="inference")
    ).json()["id"]
    platform.wait(high, lambda d: d["phase"] == "succeeded", timeout=30)
    d = platform.wait(low, lambda d: d["phase"] == "succeeded", timeout=40)
    assert any(e["kind"] == "preempted" for e in d["events"]) and d["attempt"] == 2
