"""The control plane through its API, against SQLite and PostgreSQL, with real processes."""

from __future__ import annotations

import sys

from .conftest import Platform

PY = sys.executable


def job(name: str, project: str, code: str, **extra: object) -> dict[str, object]:
    return {"kind": "job", "name": name, "project": project, "command": [PY, "-c", code], **extra}


def make_project(p: Platform, name: str, deserved: float = 2) -> None:
    r = p.api.post("/v1/projects", json={"name": name, "deserved_gpus": deserved})
    assert r.status_code == 201, r.text


def test_a_job_runs_to_success_with_logs_and_events(platform: Platform) -> None:
    make_project(platform, "vision")
    r = platform.api.post(
        "/v1/workloads",
        json=job(
            "hello",
            "vision",
            "import os; print('hi from', os.environ['AIFAB_JOB_ID'], os.environ['CUDA_VISIBLE_DEVICES'])",
            resources={"gpus": 1},
        ),
    )
    assert r.status_code == 201, r.text
    wid = r.json()["id"]
    d = platform.wait(wid, lambda d: d["phase"] == "succeeded")
    assert [e["kind"] for e in d["events"]][:3] == ["pending", "scheduled", "launched"]
    assert d["tasks"][0]["exit_code"] == 0
    log = platform.api.get(f"/v1/workloads/{wid}/logs").json()
    assert f"hi from {wid} 0" in log["text"]


def test_two_half_gpu_jobs_share_one_device(platform: Platform) -> None:
    make_project(platform, "nlp")
    ids = [
        platform.api.post(
            "/v1/workloads",
            json=job(f"half{i}", "nlp", "import time; time.sleep(1.5)", resources={"gpus": 0.5}),
        ).json()["id"]
        for i in range(2)
    ]
    runs = [platform.wait(w, lambda d: d["phase"] == "running") for w in ids]
    devices = {tuple(d["tasks"][0]["devices"]) for d in runs}
    assert len(devices) == 1  # both on the same device
    assert all(d["tasks"][0]["gpu_milli"] == 500 for d in runs)
    for w in ids:
        platform.wait(w, lambda d: d["phase"] == "succeeded")


def test_cancel_stops_a_running_job(platform: Platform) -> None:
    make_project(platform, "vision")
    wid = platform.api.post(
        "/v1/workloads", json=job("sleeper", "vision", "import time; time.sleep(60)", checkpoint_grace=1)
    ).json()["id"]
    platform.wait(wid, lambda d: d["phase"] == "running")
    assert platform.api.post(f"/v1/workloads/{wid}/cancel").status_code == 200
    d = platform.wait(wid, lambda d: d["phase"] == "cancelled")
    assert d["tasks"][0]["state"] == "exited"


def test_failure_is_retried_then_failed(platform: Platform) -> None:
    make_project(platform, "vision")
    wid = platform.api.post(
        "/v1/workloads", json=job("flaky", "vision", "raise SystemExit(3)", retries=1)
    ).json()["id"]
    d = platform.wait(wid, lambda d: d["phase"] == "failed")
    assert d["failures"] == 2 and d["attempt"] == 2
    assert [t["exit_code"] for t in d["tasks"]] == [3, 3]


def test_bad_input_is_a_clear_4xx(platform: Platform) -> None:
    make_project(platform, "vision")
    cases = [
        (job("x", "nowhere", "pass"), 404, "project"),
        (job("x", "vision", "pass", resources={"gpus": -1}), 422, "resources.gpus"),
        (job("x", "vision", "pass", bogus=1), 422, "bogus"),
        ({"kind": "job", "name": "x", "project": "vision"}, 422, "command"),
    ]
    for body, status, field in cases:
        r = platform.api.post("/v1/workloads", json=body)
        assert r.status_code == status, (body, r.text)
        assert field in (r.json().get("field") or "") + r.json()["message"], r.text
    assert (
        platform.api.post(
            "/v1/projects", json={"name": "capped", "deserved_gpus": 1, "limit_gpus": 1}
        ).status_code
        == 201
    )
    r = platform.api.post("/v1/workloads", json=job("x", "capped", "pass", resources={"gpus": 2}))
    assert (
        r.status_code == 422
        and r.json()["field"] == "resources.gpus"
        and "limited to 1" in r.json()["message"]
    )
    assert platform.api.post("/v1/projects", json={"name": "Bad_Name"}).status_code == 422
    assert platform.api.get("/v1/workloads/w999").status_code == 404
    anon = platform.as_user("afb_not-a-token")
    assert anon.get("/v1/workloads").status_code == 401


def test_a_schedule_pass_is_skipped_only_when_nothing_changed(platform: Platform) -> None:
    make_project(platform, "vision", deserved=1)
    r = platform.api.post("/v1/workloads", json=job("big", "vision", "pass", resources={"gpus": 4}))
    ctl = platform.server.controller
    first = ctl.schedule_once()
    assert first is not None and "w1" in first.pending  # 4 GPUs on a 2-GPU node: it waits
    assert ctl.schedule_once() is None  # same state: the last pass already answered it
    platform.api.post("/v1/workloads", json=job("small", "vision", "pass", resources={"gpus": 1}))
    again = ctl.schedule_once()
    assert again is not None and [b.workload_id for b in again.binds] == ["w2"]
    assert r.status_code == 201


def test_admin_revokes_a_users_tokens_through_the_api(platform: Platform) -> None:
    make_project(platform, "vision")
    token = platform.api.post("/v1/users", json={"name": "alice", "roles": {"vision": "member"}}).json()[
        "token"
    ]
    alice = platform.as_user(token)
    assert alice.get("/v1/whoami").status_code == 200
    assert alice.post("/v1/users/alice/tokens/revoke").status_code == 403  # only admins
    r = platform.api.post("/v1/users/alice/tokens/revoke")
    assert r.status_code == 200 and r.json()["revoked"] == 1
    assert alice.get("/v1/whoami").status_code == 401
    assert platform.api.post("/v1/users/nobody/tokens/revoke").status_code == 404
    actions = [e["action"] for e in platform.api.get("/v1/audit").json()]
    assert actions[0] == "token.revoke"


def test_a_requeued_workload_with_hours_of_service_waits_behind_fresh_ones(platform: Platform) -> None:
    """The default job order is priority, then Tiresias-style least attained service, then
    FIFO: the control plane counts a requeued workload's earlier runs as attained service."""
    from sqlalchemy import select

    from aifab.control.db.models import TaskRunRow, WorkloadRow

    make_project(platform, "vision", deserved=2)
    ids = [
        platform.api.post("/v1/workloads", json=job(n, "vision", "pass", resources={"gpus": 1})).json()["id"]
        for n in ("old", "new1", "new2")
    ]
    with platform.server.db.session() as s:  # "old" ran 2 GPU-hours before it was preempted
        old = s.scalars(select(WorkloadRow).where(WorkloadRow.id == ids[0])).one()
        old.attempt = 1
        s.add(
            TaskRunRow(
                workload_id=ids[0],
                attempt=1,
                task_index=0,
                node="n",
                gpu_milli=1000,
                state="exited",
                started_at=1000.0,
                finished_at=1000.0 + 7200.0,
            )
        )
    result = platform.server.controller.schedule_once()
    assert result is not None
    assert sorted(b.workload_id for b in result.binds) == sorted(ids[1:])  # 2 GPUs: the fresh ones
    assert ids[0] in result.pending


def test_projects_show_the_fair_shares_of_the_last_pass(platform: Platform) -> None:
    make_project(platform, "vision", deserved=1)
    make_project(platform, "nlp", deserved=1)
    sleeper = "import time; time.sleep(60)"

    def submit(name: str, project: str) -> str:
        r = platform.api.post("/v1/workloads", json=job(name, project, sleeper, resources={"gpus": 1}))
        assert r.status_code == 201, r.text
        return str(r.json()["id"])

    def shares() -> dict[str, float]:
        listed = platform.api.get("/v1/projects").json()
        return {p["name"]: p["fair_share_gpus"] for p in listed if p["name"] in ("vision", "nlp")}

    ids = [submit("v1", "vision"), submit("v2", "vision")]
    platform.tick(2)
    assert shares() == {"vision": 2, "nlp": 0}  # idle capacity goes to the one project asking
    ids.append(submit("n1", "nlp"))
    platform.tick(2)
    assert shares() == {"vision": 1, "nlp": 1}
    platform.tick(2)  # passes that change nothing keep what is shown
    assert shares() == {"vision": 1, "nlp": 1}
    for wid in ids:
        platform.api.post(f"/v1/workloads/{wid}/cancel")
    platform.tick(3)
