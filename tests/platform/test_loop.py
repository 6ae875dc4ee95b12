"""The server's control loop as it really runs (``Controller.run`` in a thread): launches
handed to threads, ends pushed through the backends' ends journals, interrupted launches taken
up again by a new process. Real processes on the local executor, SQLite store."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from aifab.api.app import ServerContext, create_app
from aifab.backends.base import LaunchRequest
from aifab.backends.ends import journal_mark, note_end
from aifab.control.db.models import TaskRunRow
from aifab.control.server import Server, build
from aifab.control.settings import Settings


def _server(home: Path, **overrides: float) -> tuple[Server, TestClient]:
    settings = Settings.load(env={}, home=home, gpus=2, gpu_model="virtual-gpu")
    server = build(replace(settings, **overrides))
    api = TestClient(create_app(ServerContext(server.settings, server.db, server.backend, server.controller)))
    token = server.admin_token or (home / "admin.token").read_text().strip()
    api.headers["Authorization"] = f"Bearer {token}"
    return server, api


@pytest.fixture
def slow_polls(tmp_path: Path) -> Iterator[tuple[Server, TestClient]]:
    """A running loop whose polls are far apart (60 s): whatever happens within seconds was
    pushed (a submission's wake, a launch's outcome, an end in the ends journal)."""
    server, api = _server(tmp_path / "home", busy_interval=60.0, schedule_interval=60.0)
    stop = threading.Event()
    loop = threading.Thread(target=server.controller.run, args=(stop,), daemon=True)
    loop.start()
    yield server, api
    stop.set()
    server.controller.wake.set()
    loop.join(timeout=30)
    server.db.dispose()


def _wait_phase(api: TestClient, wid: str, phases: set[str], timeout: float = 20.0) -> dict[str, object]:
    deadline = time.time() + timeout
    while True:
        d = api.get(f"/v1/workloads/{wid}").json()
        if d["phase"] in phases:
            return dict(d)
        if time.time() > deadline:
            raise AssertionError(f"{wid} is {d['phase']} after {timeout} s: {d['events'][-4:]}")
        time.sleep(0.05)


def test_the_ends_journal_grows_by_one_mark_per_end(tmp_path: Path) -> None:
    journal = tmp_path / "ends"
    assert journal_mark(journal) == 0
    note_end(journal)
    note_end(str(journal))
    assert journal_mark(journal) == 2
    note_end(None)  # a spec written before journals existed: nothing to note
    note_end(tmp_path / "missing" / "ends")  # a hint only: never raises


def test_an_end_is_noticed_without_waiting_for_the_next_poll(slow_polls: tuple[Server, TestClient]) -> None:
    _, api = slow_polls
    assert api.post("/v1/projects", json={"name": "p"}).status_code == 201
    spec = {
        "kind": "job",
        "name": "quick",
        "project": "p",
        "command": ["sleep", "0.5"],
        "resources": {"gpus": 1},
    }
    wid = api.post("/v1/workloads", json=spec).json()["id"]
    done = _wait_phase(api, wid, {"succeeded", "failed"})
    assert done["phase"] == "succeeded"
    # and the freed GPU goes to the next workload just as quickly
    a, b = (
        api.post("/v1/workloads", json={**spec, "name": n, "resources": {"gpus": 2}}).json()["id"]
        for n in "ab"
    )
    assert _wait_phase(api, a, {"succeeded", "failed"})["phase"] == "succeeded"
    assert _wait_phase(api, b, {"succeeded", "failed"})["phase"] == "succeeded"


def test_a_launch_interrupted_by_a_crash_is_made_once_by_the_next_process(tmp_path: Path) -> None:
    home = tmp_path / "home"
    first, api = _server(home)
    assert api.post("/v1/projects", json={"name": "p"}).status_code == 201
    marker = tmp_path / "runs.txt"
    spec = {
        "kind": "job",
        "name": "once",
        "project": "p",
        "command": ["sh", "-c", f"echo run >> {marker}"],
        "resources": {"gpus": 1},
    }
    wid = api.post("/v1/workloads", json=spec).json()["id"]
    first.controller.schedule_once()
    # The process marks the task launching (written before acting), then dies before calling
    # the engine: nothing ran, the store says "launching".
    assert first.controller._claim_launches()
    with first.db.read_session() as s:
        assert [r.state for r in s.scalars(select(TaskRunRow))] == ["launching"]
    first.db.dispose()

    second, api = _server(home)
    try:
        deadline = time.time() + 20
        while api.get(f"/v1/workloads/{wid}").json()["phase"] not in ("succeeded", "failed"):
            assert time.time() < deadline, api.get(f"/v1/workloads/{wid}").json()["events"][-4:]
            second.controller.tick()
            time.sleep(0.05)
        assert api.get(f"/v1/workloads/{wid}").json()["phase"] == "succeeded"
        for _ in range(3):  # more passes launch nothing again
            second.controller.tick()
        assert marker.read_text().splitlines() == ["run"]
    finally:
        second.db.dispose()


def test_an_end_is_acknowledged_once_the_launch_taking_its_room_returned(
    slow_polls: tuple[Server, TestClient],
) -> None:
    """An engine that keeps a finished task's room until the control plane acknowledges the
    end (Slurm's end_hold_s) hears it after the launch of what takes the room, not before."""
    server, api = slow_polls
    router = server.backend
    entered, proceed, launched_b = threading.Event(), threading.Event(), threading.Event()
    acknowledged: list[tuple[dict[str, Any], bool]] = []  # (handle, b's launch had returned)
    real_launch = router.launch
    names: dict[str, str] = {}

    def launch(req: LaunchRequest) -> dict[str, Any]:
        if names.get(req.workload_id) != "b":
            return real_launch(req)
        entered.set()
        proceed.wait(30)
        handle = real_launch(req)
        launched_b.set()
        return handle

    def acknowledge_ends(handles: list[dict[str, Any]]) -> None:
        acknowledged.extend((h, launched_b.is_set()) for h in handles)

    router.launch = launch  # type: ignore[method-assign]
    router.acknowledge_ends = acknowledge_ends  # type: ignore[method-assign]
    assert api.post("/v1/projects", json={"name": "p"}).status_code == 201
    spec = {"kind": "job", "project": "p", "command": ["true"], "resources": {"gpus": 2}}
    for name in "ab":
        names[api.post("/v1/workloads", json={**spec, "name": name}).json()["id"]] = name
    a, b = sorted(names, key=names.__getitem__)
    assert entered.wait(20), "b was never launched into the room a left"
    with server.db.read_session() as s:
        a_handle = next(s.scalars(select(TaskRunRow).where(TaskRunRow.workload_id == a))).handle
    time.sleep(0.5)  # a loop that acknowledged too early would have done so by now
    assert all(h != a_handle for h, _ in acknowledged)
    proceed.set()
    assert _wait_phase(api, b, {"succeeded", "failed"})["phase"] == "succeeded"
    deadline = time.time() + 20
    while (a_handle, True) not in acknowledged:
        assert time.time() < deadline, acknowledged
        time.sleep(0.05)
