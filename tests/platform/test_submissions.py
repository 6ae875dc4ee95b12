"""The submission and listing fast paths keep the API's semantics (SQLite and PostgreSQL).

Submissions that arrive together share one transaction (aifab.api.submissions); each is still
authenticated, validated, limit-checked, audited and answered on its own. The listing selects
columns and serialises them in one call; it must say what describe says.
"""

from __future__ import annotations

import json
import sys
import threading
from concurrent.futures import Future
from typing import Any

import pytest
from fastapi.exceptions import RequestValidationError
from sqlalchemy import select, update

from aifab.api.app import _object
from aifab.api.submissions import Submissions
from aifab.control.db.models import AuditRow, EventRow, WorkloadRow
from aifab.control.services import auth, workloads
from aifab.core.errors import AuthenticationError, NotFoundError, PermissionDeniedError, ValidationError

from .conftest import Platform

PY = sys.executable


def job(name: str, project: str, **extra: object) -> dict[str, Any]:
    return {"kind": "job", "name": name, "project": project, "command": [PY, "-c", "pass"], **extra}


def setup(p: Platform) -> str:
    """Projects vision and capped (limit 1 GPU); bob may only read vision. Returns bob's token."""
    for body in ({"name": "vision", "deserved_gpus": 1}, {"name": "capped", "limit_gpus": 1}):
        r = p.api.post("/v1/projects", json=body)
        assert r.status_code == 201, r.text
    r = p.api.post("/v1/users", json={"name": "bob", "roles": {"vision": "viewer"}})
    assert r.status_code == 201, r.text
    return str(r.json()["token"])


def test_submissions_that_arrive_together_are_each_checked_stored_and_audited(platform: Platform) -> None:
    bob = setup(platform)
    admin = platform.admin["token"]
    server = platform.server
    woken = threading.Event()
    subs = Submissions(server.db, server.settings.checkpoints_dir, check=_object, on_stored=woken.set)
    requests: list[tuple[str | None, Any, type[BaseException] | None]] = [
        (admin, job("a", "vision", resources={"gpus": 2}), None),
        (admin, job("bad", "vision", resources={"gpus": -1}), ValidationError),
        (admin, job("b", "vision"), None),
        (admin, job("nowhere", "no-such-project"), NotFoundError),
        (admin, job("big", "capped", resources={"gpus": 2}), ValidationError),  # over the limit
        ("afb_not-a-token", job("c", "vision"), AuthenticationError),
        (bob, job("viewer", "vision"), PermissionDeniedError),
        (admin, ["not", "an", "object"], RequestValidationError),
        (admin, job("c", "capped", resources={"gpus": 0.5}), None),
    ]
    # While this session holds the write lock (SQLite), the submissions queue up and are then
    # stored together; on PostgreSQL they may be split over transactions: same answers.
    with server.db.session() as s:
        s.get(WorkloadRow, "w0")
        futures: list[Future[bytes]] = [subs.submit(t, body, "10.1.2.3") for t, body, _ in requests]
    stored = []
    for (_, body, error), fut in zip(requests, futures, strict=True):
        if error is None:
            stored.append((body["name"], fut.result(timeout=30)))
        else:
            with pytest.raises(error):
                fut.result(timeout=30)
    assert woken.is_set()
    assert [name for name, _ in stored] == ["a", "b", "c"]
    ids = [platform.api.get(f"/v1/workloads/{n}").json()["id"] for n, _ in stored]
    assert ids == ["w1", "w2", "w3"]  # in arrival order, refusals take no number
    for (name, answer), wid in zip(stored, ids, strict=True):
        d = platform.api.get(f"/v1/workloads/{wid}").json()
        assert answer.decode().startswith(f'{{"id":"{wid}","name":"{name}"')
        assert d["phase"] == "pending" and d["created_by"] == "admin"
        assert [e["kind"] for e in d["events"]] == ["pending"]
    with server.db.session() as s:
        audit = s.scalars(select(AuditRow).where(AuditRow.action == "workload.submit")).all()
        assert sorted(a.target for a in audit) == ids
        assert {(a.actor, a.source) for a in audit} == {("admin", "10.1.2.3")}
        assert {a.detail["name"] for a in audit} == {"a", "b", "c"}
        assert len(s.scalars(select(EventRow)).all()) == 3


def test_many_concurrent_submissions_through_the_api(platform: Platform) -> None:
    setup(platform)
    errors: list[str] = []

    def submit(k: int) -> None:
        for i in range(10):
            r = platform.api.post("/v1/workloads", json=job(f"t{k}-{i}", "vision"))
            if r.status_code != 201:
                errors.append(r.text)

    threads = [threading.Thread(target=submit, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    rows = platform.api.get("/v1/workloads", params={"limit": 1000}).json()
    assert [r["id"] for r in rows] == [f"w{i}" for i in range(1, 61)]
    assert len({r["name"] for r in rows}) == 60
    audit = platform.api.get("/v1/audit", params={"limit": 1000}).json()
    assert sorted(a["target"] for a in audit if a["action"] == "workload.submit") == sorted(
        r["id"] for r in rows
    )


def test_submit_errors_come_in_the_order_fastapi_gives_them(platform: Platform) -> None:
    """The submission route parses its body itself: same answers as a `body: dict` parameter."""
    setup(platform)
    anon = platform.as_user("afb_not-a-token")
    anon.headers.pop("Authorization")
    json_headers = {"Content-Type": "application/json"}
    # undecodable JSON: 422 before authentication
    for c in (anon, platform.api):
        r = c.post("/v1/workloads", content=b'{"kind": ', headers=json_headers)
        assert r.status_code == 422 and r.json()["error"] == "validation_error", r.text
        assert r.json()["message"] == "JSON decode error"
    # anything else: authentication first
    for body in (b"[1, 2]", b"", b'{"kind": "job"}'):
        r = anon.post("/v1/workloads", content=body, headers=json_headers)
        assert r.status_code == 401 and r.json()["error"] == "unauthenticated", (body, r.text)
    # then the body must be an object
    r = platform.api.post("/v1/workloads", content=b"[1, 2]", headers=json_headers)
    assert r.status_code == 422 and r.json()["message"] == "Input should be a valid dictionary", r.text
    r = platform.api.post("/v1/workloads", content=b"")
    assert r.status_code == 422 and r.json()["message"] == "Field required", r.text
    r = platform.api.post("/v1/workloads", content=b"{}", headers={"Content-Type": "text/plain"})
    assert r.status_code == 422 and r.json()["message"] == "Input should be a valid dictionary", r.text
    r = platform.api.post(
        "/v1/workloads", content=b'{"kind": "job"}', headers={"Content-Type": "application/vnd.x+json"}
    )
    assert r.status_code == 422 and r.json()["field"] == "name", r.text  # parsed, then the spec
    r = platform.api.post("/v1/workloads", json=job("ok", "vision"))
    assert r.status_code == 201 and r.json()["id"] == "w1", r.text


def test_the_submission_route_is_documented_as_before(platform: Platform) -> None:
    op = platform.api.get("/openapi.json").json()["paths"]["/v1/workloads"]["post"]
    assert op["requestBody"] == {
        "content": {
            "application/json": {"schema": {"additionalProperties": True, "title": "Body", "type": "object"}}
        },
        "required": True,
    }
    assert [(p["in"], p["name"]) for p in op["parameters"]] == [("header", "authorization")]
    assert op["responses"]["201"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/WorkloadOut"
    }
    assert "422" in op["responses"]


def test_the_listing_says_what_describe_says(platform: Platform) -> None:
    setup(platform)
    specs = [
        job("two", "vision", resources={"gpus": 2}),
        job("half", "vision", resources={"gpus": 0.5}, priority="inference"),
        job("memory", "vision", resources={"gpus": "8GiB"}),
        job("gang", "vision", replicas=3, resources={"gpus": 1}),
        job("cpu", "capped"),
    ]
    for body in specs:
        r = platform.api.post("/v1/workloads", json=body)
        assert r.status_code == 201, r.text
        submitted = r.json()
        assert submitted == {
            k: v
            for k, v in platform.api.get(f"/v1/workloads/{submitted['id']}").json().items()
            if k in submitted
        }
    platform.api.post("/v1/workloads/w5/cancel")
    rows = platform.api.get("/v1/workloads").json()
    assert [r["name"] for r in rows] == ["two", "half", "memory", "gang", "cpu"]
    assert [(r["gpus"], r["replicas"]) for r in rows] == [(2, 1), (0.5, 1), ("8192MiB", 1), (1, 3), (0, 1)]
    for row in rows:
        d = platform.api.get(f"/v1/workloads/{row['id']}").json()
        assert row == {k: d[k] for k in row}, row["id"]
        assert set(row) == {
            "id",
            "name",
            "project",
            "phase",
            "gpus",
            "replicas",
            "priority",
            "attempt",
            "submit_time",
            "start_time",
            "end_time",
            "reason",
            "reason_code",
        }
    active = platform.api.get("/v1/workloads", params={"phase": ["pending", "running"]}).json()
    assert [r["id"] for r in active] == ["w1", "w2", "w3", "w4"]
    capped = platform.api.get("/v1/workloads", params={"project": "capped"}).json()
    assert [(r["id"], r["phase"]) for r in capped] == [("w5", "cancelled")]
    assert len(platform.api.get("/v1/workloads", params={"limit": 2}).json()) == 2


def test_the_listing_json_is_the_listing_whichever_way_it_is_built(
    platform: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On SQLite the database writes the listing's JSON; it must parse to exactly what the rows
    give (order, exact floats, nulls, strings that need escaping), for every filter."""
    setup(platform)
    for i, (project, gpus) in enumerate(
        [("vision", 1), ("capped", 0.25), ("vision", "8GiB"), ("capped", 0.5)] * 2
    ):
        r = platform.api.post("/v1/workloads", json=job(f"j{i}", project, resources={"gpus": gpus}))
        assert r.status_code == 201, r.text
    for wid in ("w2", "w3", "w7"):
        assert platform.api.post(f"/v1/workloads/{wid}/cancel").status_code == 200
    db = platform.server.db
    with db.session() as s:
        s.execute(
            update(WorkloadRow)
            .where(WorkloadRow.id == "w4")
            .values(reason='a "quoted"\tünïcode\nreason \\ ✓', reason_code="x", start_time=1 / 3, attempt=2)
        )
        s.execute(update(WorkloadRow).where(WorkloadRow.id == "w5").values(submit_time=1795904232.8532548))
    bob = auth.Principal("bob", False, {"vision": auth.Role.VIEWER})
    cases: list[tuple[auth.Principal, str | None, list[str] | None, int]] = [
        (auth.SYSTEM, None, None, 1000),
        (auth.SYSTEM, None, ["pending", "cancelled"], 1000),
        (auth.SYSTEM, None, ["cancelled"], 2),
        (auth.SYSTEM, "capped", None, 1000),
        (bob, None, None, 1000),
        (bob, None, ["scheduled"], 1000),
    ]
    for p, project, phases, limit in cases:
        with db.read_session() as s:
            rows = workloads.listing(s, p, project, phases, limit)
            built = workloads.listing_json(s, p, project, phases, limit)
        assert json.loads(built) == rows, (p.name, project, phases, limit)
        assert [r["id"] for r in rows] == sorted((r["id"] for r in rows), key=lambda x: int(x[1:]))
    with db.read_session() as s:
        everything = json.loads(workloads.listing_json(s, auth.SYSTEM))
    assert [r["id"] for r in everything] == [f"w{i}" for i in range(1, 9)]
    w4, w5 = everything[3], everything[4]
    assert w4["reason"] == 'a "quoted"\tünïcode\nreason \\ ✓' and w4["start_time"] == 1 / 3
    assert w5["submit_time"] == 1795904232.8532548
    assert [r["gpus"] for r in everything[:4]] == [1, 0.25, "8192MiB", 0.5]
    # where SQLite could not write exact numbers, the rows are serialised in Python: same JSON
    monkeypatch.setattr(workloads, "_exact_reals", lambda conn: False)
    with db.read_session() as s:
        assert json.loads(workloads.listing_json(s, auth.SYSTEM)) == everything
