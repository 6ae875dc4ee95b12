"""Role-based access through the API, as a table: each role x each action x own/other project.

Roles: an admin may do everything; a project *member* submits and manages the project's
workloads and reads the project; a *viewer* only reads. Another project's workloads and logs
answer 404 exactly like a workload that does not exist, so their existence does not leak.
Every change is in the append-only audit log (who, what, when, from where), which only admins
read. Runs on SQLite and PostgreSQL (the ``platform`` fixture is parametrised).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import httpx
from fastapi import FastAPI
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from aifab.control.services import auth

from .conftest import Platform

PY = sys.executable
OWN = {"alice": "vision", "bob": "nlp", "vera": "vision", "root2": "vision"}
OTHER = {"alice": "nlp", "bob": "vision", "vera": "nlp", "root2": "nlp"}
ADDRESS = {
    "admin": "10.0.0.1",
    "alice": "10.0.0.2",
    "bob": "10.0.0.3",
    "vera": "10.0.0.4",
    "root2": "10.0.0.5",
}
SLEEP = "import time; time.sleep(60)"


def job(name: str, project: str, code: str = "pass") -> dict[str, Any]:
    return {"kind": "job", "name": name, "project": project, "command": [PY, "-c", code]}


def client(p: Platform, token: str | None, address: str = "10.9.9.9") -> TestClient:
    c = TestClient(p.api.app, client=(address, 50000))
    if token is not None:
        c.headers["Authorization"] = f"Bearer {token}"
    return c


@dataclass
class World:
    """Two projects with one finished job each (with logs), four users and their clients."""

    p: Platform
    admin: TestClient
    users: dict[str, TestClient]
    tokens: dict[str, str]
    done: dict[str, str]  # project -> id of a succeeded workload
    done_name: dict[str, str]  # project -> its name
    created: list[tuple[str, str, str]] = field(
        default_factory=list
    )  # (actor, action, target) that succeeded
    serial: int = 0

    def next(self, prefix: str) -> str:
        self.serial += 1
        return f"{prefix}-{self.serial}"

    def sleeper(self, project: str) -> str:
        """A fresh workload that stays pending (the loops are not ticked): a target for cancel."""
        r = self.admin.post("/v1/workloads", json=job(self.next("sleeper"), project, SLEEP))
        assert r.status_code == 201, r.text
        self.created.append(("admin", "workload.submit", r.json()["id"]))
        return str(r.json()["id"])

    def phase(self, wid: str) -> str:
        return str(self.admin.get(f"/v1/workloads/{wid}").json()["phase"])

    def workload_count(self) -> int:
        return len(self.admin.get("/v1/workloads").json())


def setup_world(p: Platform) -> World:
    admin = client(p, p.admin["token"], ADDRESS["admin"])
    for name in ("vision", "nlp"):
        r = admin.post("/v1/projects", json={"name": name, "deserved_gpus": 1})
        assert r.status_code == 201, r.text
    specs: dict[str, dict[str, Any]] = {
        "alice": {"roles": {"vision": "member"}},
        "bob": {"roles": {"nlp": "member"}},
        "vera": {"roles": {"vision": "viewer"}},
        "root2": {"admin": True},
    }
    tokens = {}
    for name, extra in specs.items():
        r = admin.post("/v1/users", json={"name": name, **extra})
        assert r.status_code == 201, r.text
        assert r.json()["name"] == name and r.json()["token"].startswith(auth.TOKEN_PREFIX)
        tokens[name] = r.json()["token"]
    done, done_name = {}, {}
    for project in ("vision", "nlp"):
        r = admin.post("/v1/workloads", json=job(f"{project}-hello", project, f"print('log of {project}')"))
        assert r.status_code == 201, r.text
        done[project], done_name[project] = r.json()["id"], f"{project}-hello"
    for wid in done.values():
        p.wait(wid, lambda d: d["phase"] == "succeeded")
    users = {name: client(p, token, ADDRESS[name]) for name, token in tokens.items()}
    w = World(p, admin, users, tokens, done, done_name)
    w.created += [("admin", "queue.create", "vision"), ("admin", "queue.create", "nlp")]
    w.created += [("admin", "user.create", u) for u in specs]
    w.created += [("admin", "workload.submit", wid) for wid in done.values()]
    return w


# --- the actions: each returns the response and checks its own side effects -------------------

Act = Callable[[World, str, str], httpx.Response]  # (world, user, target project) -> response


def list_project(w: World, user: str, project: str) -> httpx.Response:
    r: httpx.Response = w.users[user].get("/v1/workloads", params={"project": project})
    if r.status_code == 200:
        assert {x["project"] for x in r.json()} == {project}, r.json()
    else:  # indistinguishable from a project that does not exist
        ghost = w.users[user].get("/v1/workloads", params={"project": "no-such-project"})
        assert (ghost.status_code, ghost.json()) == (
            r.status_code,
            _renamed(r.json(), project, "no-such-project"),
        )
    return r


def describe(w: World, user: str, project: str) -> httpx.Response:
    r: httpx.Response = w.users[user].get(f"/v1/workloads/{w.done[project]}")
    by_name = w.users[user].get(f"/v1/workloads/{w.done_name[project]}")
    assert by_name.status_code == r.status_code, by_name.text
    if r.status_code == 200:
        assert r.json()["id"] == by_name.json()["id"] == w.done[project]
    else:
        _same_as_missing(w, user, r, w.done[project], "")
    return r


def logs(w: World, user: str, project: str) -> httpx.Response:
    r: httpx.Response = w.users[user].get(f"/v1/workloads/{w.done[project]}/logs")
    if r.status_code == 200:
        assert f"log of {project}" in r.json()["text"], r.json()
    else:
        _same_as_missing(w, user, r, w.done[project], "/logs")
        attempt = w.users[user].get(f"/v1/workloads/{w.done[project]}/logs", params={"attempt": 1, "task": 0})
        assert attempt.status_code == 404, attempt.text
    return r


def submit(w: World, user: str, project: str) -> httpx.Response:
    before = w.workload_count()
    r: httpx.Response = w.users[user].post("/v1/workloads", json=job(w.next(f"by-{user}"), project, SLEEP))
    if r.status_code == 201:
        assert r.json()["project"] == project and r.json()["phase"] == "pending"
        w.created.append((user, "workload.submit", r.json()["id"]))
        assert w.workload_count() == before + 1
    else:
        assert w.workload_count() == before, "a refused submission stored a workload"
        if r.status_code == 404:  # the other project looks like one that does not exist
            ghost = w.users[user].post("/v1/workloads", json=job("ghost", "no-such-project", SLEEP))
            assert ghost.json() == _renamed(r.json(), project, "no-such-project")
    return r


def cancel_active(w: World, user: str, project: str) -> httpx.Response:
    wid = w.sleeper(project)
    r: httpx.Response = w.users[user].post(f"/v1/workloads/{wid}/cancel")
    if r.status_code == 200:
        assert w.phase(wid) == "cancelled"
        w.created.append((user, "workload.cancel", wid))
    else:
        assert w.phase(wid) == "pending", "a refused cancel touched the workload"
        if r.status_code == 404:
            _same_as_missing(w, user, r, wid, "/cancel", method="post")
    return r


def cancel_finished(w: World, user: str, project: str) -> httpx.Response:
    r: httpx.Response = w.users[user].post(f"/v1/workloads/{w.done[project]}/cancel")
    assert w.phase(w.done[project]) == "succeeded"
    return r


def list_projects(w: World, user: str, project: str) -> httpx.Response:
    r: httpx.Response = w.users[user].get("/v1/projects")
    seen = {x["name"] for x in r.json()}
    every = {x["name"] for x in w.admin.get("/v1/projects").json()}
    assert seen == (every if user == "root2" else {OWN[user]}), (user, seen)
    return r


def create_project(w: World, user: str, project: str) -> httpx.Response:
    name = w.next(f"proj-{user}")
    r: httpx.Response = w.users[user].post("/v1/projects", json={"name": name})
    if r.status_code == 201:
        w.created.append((user, "queue.create", name))
    assert (name in {x["name"] for x in w.admin.get("/v1/projects").json()}) == (r.status_code == 201)
    return r


def create_user(w: World, user: str, project: str) -> httpx.Response:
    name = w.next(f"user-{user}")
    r: httpx.Response = w.users[user].post("/v1/users", json={"name": name, "roles": {project: "member"}})
    if r.status_code == 201:
        w.created.append((user, "user.create", name))
        assert client(w.p, r.json()["token"]).get("/v1/whoami").json()["roles"] == {project: "member"}
    return r


def issue_token(w: World, user: str, project: str) -> httpx.Response:
    r: httpx.Response = w.users[user].post("/v1/users/alice/tokens")
    if r.status_code == 201:
        w.created.append((user, "token.issue", "alice"))
        assert client(w.p, r.json()["token"]).get("/v1/whoami").json()["name"] == "alice"
    return r


def read_audit(w: World, user: str, project: str) -> httpx.Response:
    r: httpx.Response = w.users[user].get("/v1/audit")
    return r


def nodes(w: World, user: str, project: str) -> httpx.Response:
    r: httpx.Response = w.users[user].get("/v1/nodes")
    if r.status_code == 200:
        assert len(r.json()) >= 1
    return r


def whoami(w: World, user: str, project: str) -> httpx.Response:
    r: httpx.Response = w.users[user].get("/v1/whoami")
    assert r.json()["name"] == user
    return r


def api_routes(p: Platform) -> list[APIRoute]:
    return [
        r for r in cast(FastAPI, p.api.app).routes if isinstance(r, APIRoute) and r.path.startswith("/v1/")
    ]


def _renamed(body: dict[str, Any], old: str, new: str) -> dict[str, Any]:
    return dict(json.loads(json.dumps(body).replace(old, new)))


def _same_as_missing(
    w: World, user: str, r: httpx.Response, wid: str, suffix: str, method: str = "get"
) -> None:
    """The answer about another project's workload is the answer about one that does not exist."""
    ghost = getattr(w.users[user], method)(f"/v1/workloads/w99999{suffix}")
    assert (r.status_code, r.json()) == (ghost.status_code, _renamed(ghost.json(), "w99999", wid)), r.text


# --- the table ---------------------------------------------------------------------------------

A, M, V = "root2", "alice", "vera"  # admin, a member of vision, a viewer of vision
M2 = "bob"  # a member of nlp
ACTIONS: dict[str, Act] = {
    "list workloads": list_project,
    "describe": describe,
    "logs": logs,
    "submit": submit,
    "cancel active": cancel_active,
    "cancel finished": cancel_finished,
    "list projects": list_projects,
    "create project": create_project,
    "create user": create_user,
    "issue token": issue_token,
    "read audit": read_audit,
    "nodes": nodes,
    "whoami": whoami,
}
# action -> user -> (own project, other project)
EXPECTED: dict[str, dict[str, tuple[int, int]]] = {
    "list workloads": {A: (200, 200), M: (200, 404), M2: (200, 404), V: (200, 404)},
    "describe": {A: (200, 200), M: (200, 404), M2: (200, 404), V: (200, 404)},
    "logs": {A: (200, 200), M: (200, 404), M2: (200, 404), V: (200, 404)},
    "submit": {A: (201, 201), M: (201, 404), M2: (201, 404), V: (403, 404)},
    "cancel active": {A: (200, 200), M: (200, 404), M2: (200, 404), V: (403, 404)},
    "cancel finished": {A: (409, 409), M: (409, 404), M2: (409, 404), V: (403, 404)},
    "list projects": {A: (200, 200), M: (200, 200), M2: (200, 200), V: (200, 200)},
    "create project": {A: (201, 201), M: (403, 403), M2: (403, 403), V: (403, 403)},
    "create user": {A: (201, 201), M: (403, 403), M2: (403, 403), V: (403, 403)},
    "issue token": {A: (201, 201), M: (403, 403), M2: (403, 403), V: (403, 403)},
    "read audit": {A: (200, 200), M: (403, 403), M2: (403, 403), V: (403, 403)},
    "nodes": {A: (200, 200), M: (200, 200), M2: (200, 200), V: (200, 200)},
    "whoami": {A: (200, 200), M: (200, 200), M2: (200, 200), V: (200, 200)},
}
MATRIX = [
    (user, action, where, codes[0 if where == "own" else 1])
    for action, by_user in EXPECTED.items()
    for user, codes in by_user.items()
    for where in ("own", "other")
]


def test_every_role_against_every_action_in_its_own_and_another_project(platform: Platform) -> None:
    w = setup_world(platform)
    wrong = []
    for user, action, where, expected in MATRIX:
        project = OWN[user] if where == "own" else OTHER[user]
        r = ACTIONS[action](w, user, project)
        if r.status_code != expected:
            wrong.append(
                f"{user:6} {action:16} {where:5} ({project}): want {expected}, got {r.status_code} {r.text[:160]}"
            )
        elif r.status_code >= 400:
            assert set(r.json()) == {"error", "message", "field"}, r.text
    assert not wrong, "\n" + "\n".join(wrong)

    # the unfiltered listing shows exactly the workloads of the projects one may read
    every = w.admin.get("/v1/workloads").json()
    assert {x["project"] for x in every} == {"vision", "nlp"}
    for user in ("alice", "bob", "vera", "root2"):
        seen = {x["id"] for x in w.users[user].get("/v1/workloads").json()}
        assert seen == {x["id"] for x in every if user == "root2" or x["project"] == OWN[user]}, user
        for phase in ("succeeded", "cancelled", "pending"):  # filters do not widen what one sees
            rows = w.users[user].get("/v1/workloads", params={"phase": phase}).json()
            assert all(user == "root2" or x["project"] == OWN[user] for x in rows), (user, phase)

    # a member cancels a *running* workload of its project; the others cannot touch it. First
    # clear what the table left waiting, so the node has room for it.
    for x in w.admin.get("/v1/workloads", params={"phase": "pending"}).json():
        assert w.admin.post(f"/v1/workloads/{x['id']}/cancel").status_code == 200
        w.created.append(("admin", "workload.cancel", x["id"]))
    wid = w.users["alice"].post("/v1/workloads", json=job("long", "vision", SLEEP)).json()["id"]
    w.created.append(("alice", "workload.submit", wid))
    platform.wait(wid, lambda d: d["phase"] == "running")
    assert w.users["bob"].post(f"/v1/workloads/{wid}/cancel").status_code == 404
    assert w.users["bob"].get(f"/v1/workloads/{wid}/logs").status_code == 404
    assert w.users["vera"].post(f"/v1/workloads/{wid}/cancel").status_code == 403
    assert w.phase(wid) == "running"
    assert w.users["alice"].post(f"/v1/workloads/{wid}/cancel").status_code == 200
    w.created.append(("alice", "workload.cancel", wid))
    platform.wait(wid, lambda d: d["phase"] == "cancelled")

    check_audit(w)


def check_audit(w: World) -> None:
    entries = w.admin.get("/v1/audit", params={"limit": 10000}).json()
    assert w.users["root2"].get("/v1/audit", params={"limit": 10000}).json() == entries
    for e in entries:
        assert e["actor"] and e["action"] and e["target"] and e["time"] > 0, e
        assert e["source"] == ADDRESS[e["actor"]], e  # from where: the caller's address
    times = [e["time"] for e in entries]
    assert times == sorted(times, reverse=True)  # newest first
    # every successful change is there, with who and what; nothing refused left a trace
    recorded = [(e["actor"], e["action"], e["target"]) for e in entries]
    assert sorted(recorded) == sorted(w.created), set(recorded) ^ set(w.created)
    for action in ("workload.submit", "workload.cancel", "queue.create", "user.create", "token.issue"):
        assert action in {e["action"] for e in entries}, action
    assert "vera" not in {e["actor"] for e in entries}  # the viewer changed nothing
    text = json.dumps(entries)
    assert not any(token in text for token in w.tokens.values())  # secrets are never logged

    # append-only: later changes add entries; the earlier ones stay exactly as they were
    w.users["bob"].post("/v1/workloads", json=job("later", "nlp", SLEEP))
    after = w.admin.get("/v1/audit", params={"limit": 10000}).json()
    assert len(after) == len(entries) + 1 and after[1:] == entries
    assert (after[0]["actor"], after[0]["action"]) == ("bob", "workload.submit")
    for method in ("delete", "put", "patch", "post"):
        assert getattr(w.admin, method)("/v1/audit").status_code == 405, method
    audit_routes = [r for r in api_routes(w.p) if r.path.startswith("/v1/audit")]
    assert audit_routes and all(r.methods == {"GET"} for r in audit_routes)
    assert len(w.admin.get("/v1/audit", params={"limit": 10000}).json()) == len(after)
    assert len(w.admin.get("/v1/audit", params={"limit": 2}).json()) == 2


def test_without_a_valid_token_everything_but_health_is_401(platform: Platform) -> None:
    r = platform.api.post("/v1/projects", json={"name": "vision"})
    assert r.status_code == 201, r.text
    r = platform.api.post("/v1/users", json={"name": "bob", "roles": {"vision": "member"}})
    bob, admin = r.json()["token"], platform.admin["token"]
    callers = {
        "no token": client(platform, None),
        "bogus token": client(platform, "afb_bogus-secret"),
        "admin token, one char off": client(platform, admin[:-1] + ("x" if admin[-1] != "x" else "y")),
        "empty bearer": client(platform, ""),
    }
    paths = [
        (method, route.path.replace("{ref}", "w1").replace("{name}", "bob"))
        for route in api_routes(platform)
        if route.path != "/v1/health"
        for method in sorted(route.methods or ())
    ]
    assert len(paths) >= 10
    for label, c in callers.items():
        assert c.get("/v1/health").status_code == 200
        for method, path in paths:
            r = c.request(method, path, json={} if method == "POST" else None)
            assert r.status_code == 401, (label, method, path, r.text)
            assert r.json()["error"] == "unauthenticated", r.text

    # a revoked token stops working at once (there is no API route for it: the service level)
    bob_client = client(platform, bob)
    assert bob_client.get("/v1/whoami").status_code == 200
    with platform.server.db.session() as s:
        assert auth.revoke_tokens(s, "bob") == 1
    r = bob_client.get("/v1/workloads")
    assert r.status_code == 401 and "revoked" in r.json()["message"], r.text
    assert bob_client.post("/v1/workloads", json=job("x", "vision")).status_code == 401
    # an admin issues a new one; the old stays revoked
    fresh = platform.api.post("/v1/users/bob/tokens")
    assert fresh.status_code == 201, fresh.text
    assert client(platform, fresh.json()["token"]).get("/v1/whoami").json()["roles"] == {"vision": "member"}
    assert bob_client.get("/v1/whoami").status_code == 401

    # taking a role away takes effect on the next request, with the same token
    new = client(platform, fresh.json()["token"])
    assert new.get("/v1/workloads", params={"project": "vision"}).status_code == 200
    with platform.server.db.session() as s:
        auth.set_role(s, "bob", "vision", None)
    assert new.get("/v1/workloads", params={"project": "vision"}).status_code == 404
    assert new.post("/v1/workloads", json=job("x", "vision")).status_code == 404
    assert new.get("/v1/projects").json() == []
