"""Per-project run policies: a runtime cap, retries after failures, a guaranteed runtime before
preemption, and the node pool a project's workloads run in."""

from __future__ import annotations

import sys

from .conftest import Platform
from .test_preemption import steps_job


def project(platform: Platform, name: str, **policy: object) -> None:
    r = platform.api.post("/v1/projects", json={"name": name, "deserved_gpus": 2, **policy})
    assert r.status_code == 201, r.text


def job(name: str, project: str, code: str, **extra: object) -> dict[str, object]:
    return {"kind": "job", "name": name, "project": project, "command": [sys.executable, "-c", code], **extra}


def test_project_max_runtime_caps_a_workload_without_its_own(platform: Platform) -> None:
    project(platform, "capped", max_runtime=1.5)
    ref = platform.api.post(
        "/v1/workloads", json=job("long", "capped", "import time; time.sleep(60)")
    ).json()["id"]
    d = platform.wait(ref, lambda d: d["phase"] == "failed", timeout=30)
    assert (
        "max runtime of 2 s" in d["reason"]
        or "max runtime of 1 s" in d["reason"]
        or "max runtime" in d["reason"]
    )
    assert d["end_time"] - d["start_time"] < 30


def test_project_retries_rerun_a_failed_workload(platform: Platform) -> None:
    project(platform, "retrying", retries=1)
    ref = platform.api.post("/v1/workloads", json=job("flaky", "retrying", "import sys; sys.exit(2)")).json()[
        "id"
    ]
    d = platform.wait(ref, lambda d: d["phase"] == "failed", timeout=30)
    assert d["attempt"] == 2
    assert any("retry 1 of 1" in e["message"] for e in d["events"])


def test_project_min_runtime_delays_preemption(platform: Platform) -> None:
    project(platform, "guarded", min_runtime=3)
    low = platform.api.post(
        "/v1/workloads", json=steps_job("low", "guarded", 400, 0.1, resources={"gpus": 2}, priority="batch")
    ).json()["id"]
    started = platform.wait(low, lambda d: d["phase"] == "running")["start_time"]
    high = platform.api.post(
        "/v1/workloads", json=steps_job("high", "guarded", 2, 0.05, priority="inference")
    ).json()["id"]
    # Guaranteed runtime is clock-driven: a pass notices it within FULL_PASS_EVERY seconds.
    platform.wait(high, lambda d: d["phase"] == "succeeded", timeout=40)
    evicted = next(
        e for e in platform.api.get(f"/v1/workloads/{low}").json()["events"] if e["kind"] == "evict"
    )
    assert evicted["time"] - started >= 3.0


def test_project_node_pool_places_its_workloads_there(platform: Platform) -> None:
    project(platform, "elsewhere", node_pool="gpu-farm")
    ref = platform.api.post("/v1/workloads", json=job("waits", "elsewhere", "print(1)")).json()["id"]
    d = platform.wait(ref, lambda d: d.get("reason") is not None)
    assert d["phase"] == "pending" and "pool gpu-farm" in d["reason"]
    listed = {p["name"]: p for p in platform.api.get("/v1/projects").json()}
    assert listed["elsewhere"]["node_pool"] == "gpu-farm"


def test_bad_project_policies_are_refused_with_the_field(platform: Platform) -> None:
    for body, field in (
        ({"max_runtime": 0}, "max_runtime"),
        ({"retries": -1}, "retries"),
        ({"max_runtime": 10, "min_runtime": 20}, "min_runtime"),
        ({"node_pool": "Bad Pool"}, "node_pool"),
    ):
        r = platform.api.post("/v1/projects", json={"name": "x", **body})
        assert r.status_code in (400, 422), (body, r.text)
        assert field in r.text
