"""The backend contract: every backend passes the same tests, driven through the control plane
(store, loops, API) exactly as in production, against a real engine.

Each test runs for every engine in ``ENGINES``; the engine fixtures start real clusters (see
``engines.py``). Features an engine cannot have (a single machine's nodes cannot come and go)
are skipped for that engine with the reason.
"""

from __future__ import annotations

import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from aifab.api.app import ServerContext, create_app
from aifab.backends.base import Backend
from aifab.backends.router import PoolRouter
from aifab.control.db import Database
from aifab.control.db.models import NodeRow
from aifab.control.loops import Controller
from aifab.control.server import Server
from aifab.control.services import auth
from aifab.control.settings import Settings
from tests.platform.conftest import Platform

from .engines import Engine
from .local_engine import local_engine  # noqa: F401
from .ray_cluster import ray_engine  # noqa: F401
from .slurm_cluster import slurm_engine  # noqa: F401

# Tests of one engine share its cluster: xdist runs them in one worker (one cluster, not two).
ENGINES = [pytest.param(name, marks=pytest.mark.xdist_group(name)) for name in ("local", "ray", "slurm")]
STEPS = str(Path(__file__).parents[1] / "platform" / "steps_job.py")
PY = sys.executable


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> Engine:
    e: Engine = request.getfixturevalue(f"{request.param}_engine")
    return e


class ContractPlatform(Platform):
    engine: Engine
    pool: str

    def restart(self) -> None:
        """A new control plane over the same store, with a new backend instance."""
        s = self.server
        router = PoolRouter(
            {self.pool: _served(self.engine, s.settings.home)}, kinds={self.pool: self.engine.name}
        )
        controller = Controller(s.db, router, s.settings)
        controller.sync_inventory()
        self.server = Server(s.settings, s.db, router, controller, None)
        self.api.app.state.ctx = ServerContext(s.settings, s.db, router, controller)

    def gpus_per_node(self) -> dict[str, int]:
        nodes = self.api.get("/v1/nodes").json()
        return {n["name"]: n["gpus"] for n in nodes if n["schedulable"] and n["gpus"] > 0}

    def submit(self, spec: dict[str, Any]) -> str:
        r = self.api.post("/v1/workloads", json={"kind": "job", "project": "p", **spec})
        assert r.status_code == 201, r.text
        return str(r.json()["id"])

    def logs(self, ref: str, attempt: int | None = None, task: int = 0) -> str:
        params: dict[str, Any] = {"task": task}
        if attempt is not None:
            params["attempt"] = attempt
        return str(self.api.get(f"/v1/workloads/{ref}/logs", params=params).json()["text"])


@pytest.fixture
def cp(engine: Engine, tmp_path: Path) -> Iterator[ContractPlatform]:
    home = engine.shared_dir / f"cp-{uuid.uuid4().hex[:8]}"
    settings = replace(
        Settings.load(env={}, home=home, database_url=f"sqlite:///{tmp_path / 'aifab.db'}"),
        inventory_interval=3600.0,  # tests take inventory when they mean to
    )
    home.mkdir(parents=True)
    db = Database(settings.database_url)
    db.migrate()
    pool = f"{engine.name}-pool"
    router = PoolRouter({pool: _served(engine, home)}, kinds={pool: engine.name})
    controller = Controller(db, router, settings)
    controller.sync_inventory()
    with db.session() as s:
        token = auth.bootstrap_admin(s)
    assert token is not None
    server = Server(settings, db, router, controller, token)
    api = TestClient(create_app(ServerContext(settings, db, router, controller)))
    api.headers["Authorization"] = f"Bearer {token}"
    platform = ContractPlatform(server, api, {"token": token})
    platform.engine, platform.pool = engine, pool
    total = sum(platform.gpus_per_node().values())
    assert total > 0, f"engine {engine.name} reports no GPU"
    assert api.post("/v1/projects", json={"name": "p", "deserved_gpus": total}).status_code == 201
    yield platform
    _stop_all(platform)
    db.dispose()


def _served(engine: Engine, home: Path) -> Backend:
    """The engine's backend as ``aifab server`` builds a pool's (pools.py): one that keeps a
    finished task's room until the control plane acknowledges the end (Slurm) waits far longer
    here than any test does, so an acknowledgement that never comes shows."""
    backend = engine.make_backend(home)
    if hasattr(backend, "end_hold_s"):
        backend.end_hold_s = 600
    return backend


def _stop_all(p: ContractPlatform) -> None:
    for w in p.api.get("/v1/workloads", params={"all": "true"}).json():
        if w["phase"] in ("pending", "scheduled", "running"):
            p.api.post(f"/v1/workloads/{w['id']}/cancel")
    deadline = time.time() + 30
    while time.time() < deadline:
        p.tick()
        live = [
            w
            for w in p.api.get("/v1/workloads", params={"all": "true"}).json()
            if w["phase"] in ("scheduled", "running")
        ]
        if not live:
            return
        time.sleep(0.2)


def code(text: str) -> list[str]:
    return [PY, "-c", textwrap.dedent(text)]


# ------------------------------------------------------------------------------------- tests


def test_inventory_lists_the_engine_nodes_with_pool_and_backend(cp: ContractPlatform) -> None:
    nodes = cp.api.get("/v1/nodes").json()
    assert nodes and all(n["pool"] == cp.pool and n["backend"] == cp.engine.name for n in nodes)
    assert sum(n["gpus"] for n in nodes) >= 4


def test_launch_logs_and_exit_codes(cp: ContractPlatform) -> None:
    ok = cp.submit(
        {
            "name": "ok",
            "command": code("print('hello from', __import__('os').environ['AIFAB_JOB_ID'])"),
            "resources": {"gpus": 1},
        }
    )
    bad = cp.submit({"name": "bad", "command": code("import sys; print('failing'); sys.exit(3)")})
    d = cp.wait(ok, lambda d: d["phase"] in ("succeeded", "failed"), timeout=60)
    assert d["phase"] == "succeeded", d["events"]
    assert f"hello from {ok}" in cp.logs(ok)
    d = cp.wait(bad, lambda d: d["phase"] in ("succeeded", "failed"), timeout=60)
    assert d["phase"] == "failed" and d["tasks"][0]["exit_code"] == 3
    assert "failing" in cp.logs(bad)


def test_environment_contract(cp: ContractPlatform) -> None:
    ref = cp.submit(
        {
            "name": "env",
            "command": code(
                """
                import os
                for k in ("AIFAB_JOB_ID", "AIFAB_ATTEMPT", "AIFAB_CHECKPOINT_DIR", "CUDA_VISIBLE_DEVICES", "MINE"):
                    print(k, "=", os.environ.get(k), flush=True)
                """
            ),
            "env": {"MINE": "kept"},
            "resources": {"gpus": 2},
        }
    )
    d = cp.wait(ref, lambda d: d["phase"] in ("succeeded", "failed"), timeout=60)
    assert d["phase"] == "succeeded", (d["events"], cp.logs(ref))
    out = dict(line.split(" = ", 1) for line in cp.logs(ref).splitlines() if " = " in line)
    assert out["AIFAB_JOB_ID"] == ref and out["AIFAB_ATTEMPT"] == "1" and out["MINE"] == "kept"
    assert out["AIFAB_CHECKPOINT_DIR"] == d["checkpoint_dir"]
    visible = out["CUDA_VISIBLE_DEVICES"].split(",")
    assert len(visible) == 2
    # What aifab records is what the task was given (the engine may have picked the indices).
    assert sorted(int(x) for x in visible) == sorted(d["tasks"][0]["devices"]) or cp.engine.name == "ray"


def test_cancel_stops_a_running_task(cp: ContractPlatform) -> None:
    ref = cp.submit(
        {"name": "sleeper", "command": code("import time; print('up', flush=True); time.sleep(120)")}
    )
    cp.wait(ref, lambda d: d["phase"] == "running", timeout=60)
    assert cp.api.post(f"/v1/workloads/{ref}/cancel").status_code == 200
    d = cp.wait(ref, lambda d: d["phase"] == "cancelled", timeout=60)
    assert d["tasks"][0]["state"] == "exited"


def test_preemption_with_grace_then_requeue_and_resume(cp: ContractPlatform) -> None:
    per_node = cp.gpus_per_node()
    size = min(per_node.values())
    lows = [
        cp.submit(
            {
                "name": f"low-{i}",
                "command": [PY, STEPS, "60", "0.1"],
                "resources": {"gpus": size},
                "priority": "batch",
                "checkpoint_grace": 10,
            }
        )
        for i in range(len(per_node))
    ]
    for ref in lows:
        cp.wait(ref, lambda d: d["phase"] == "running" and d["last_checkpoint_time"] is not None, timeout=90)
    high = cp.submit(
        {
            "name": "high",
            "command": [PY, STEPS, "3", "0.05"],
            "resources": {"gpus": size},
            "priority": "inference",
        }
    )
    cp.wait(high, lambda d: d["phase"] == "succeeded", timeout=90)
    victims = [
        r
        for r in lows
        if any(e["kind"] == "preempted" for e in cp.api.get(f"/v1/workloads/{r}").json()["events"])
    ]
    assert len(victims) == 1
    victim = cp.wait(victims[0], lambda d: d["phase"] == "succeeded", timeout=120)
    assert victim["attempt"] == 2
    first, second = cp.logs(victims[0], attempt=1), cp.logs(victims[0], attempt=2)
    saved = int(first.split("preempted at step ")[1].split(";")[0])
    assert f"resumed from step {saved}" in second and "done 60" in second


GANG = """
import os, socket, sys, time
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
print("rank", rank, "of", world, "master", addr, port, flush=True)
if rank == 0:
    srv = socket.create_server(("0.0.0.0", port))
    srv.settimeout(60)
    conn, _ = srv.accept()
    print("got", conn.recv(64).decode(), flush=True)
else:
    deadline = time.time() + 60
    while True:
        try:
            s = socket.create_connection((addr, port), timeout=5)
            break
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.2)
    s.sendall(f"hello from rank {rank}".encode())
"""


def test_gang_starts_whole_and_its_members_reach_each_other(cp: ContractPlatform) -> None:
    per_node = cp.gpus_per_node()
    # Whole nodes per task on engines with several nodes, so the gang spans two of them.
    gpus = min(per_node.values()) if len(per_node) > 1 else 1
    ref = cp.submit({"name": "gang", "command": code(GANG), "replicas": 2, "resources": {"gpus": gpus}})
    d = cp.wait(ref, lambda d: d["phase"] in ("succeeded", "failed"), timeout=90)
    assert d["phase"] == "succeeded", d["events"]
    nodes = {t["node"] for t in d["tasks"]}
    assert len(nodes) == min(2, len(per_node))
    assert "got hello from rank 1" in cp.logs(ref, task=0)


def test_gang_member_failure_tears_down_the_gang(cp: ContractPlatform) -> None:
    script = code(
        """
        import os, sys, time
        if os.environ["RANK"] == "1":
            sys.exit(5)
        print("rank 0 waits", flush=True)
        time.sleep(120)
        """
    )
    ref = cp.submit(
        {
            "name": "gang-fail",
            "command": script,
            "replicas": 2,
            "resources": {"gpus": 1},
            "checkpoint_grace": 2,
        }
    )
    d = cp.wait(ref, lambda d: d["phase"] in ("succeeded", "failed"), timeout=90)
    assert d["phase"] == "failed"
    assert "task 1 failed" in " ".join(e["message"] for e in d["events"])
    assert all(t["state"] == "exited" for t in d["tasks"])


def test_a_restarted_control_plane_adopts_running_tasks(cp: ContractPlatform) -> None:
    ref = cp.submit(
        {
            "name": "adopt",
            "command": code("import time; print('start', flush=True); time.sleep(4); print('end')"),
        }
    )
    cp.wait(ref, lambda d: d["phase"] == "running", timeout=60)
    cp.restart()
    d = cp.wait(ref, lambda d: d["phase"] in ("succeeded", "failed"), timeout=60)
    assert d["phase"] == "succeeded" and d["attempt"] == 1
    assert "start" in cp.logs(ref) and "end" in cp.logs(ref)


def _cordon_all_but(cp: ContractPlatform, node: str) -> None:
    with cp.server.db.session() as s:
        s.execute(
            update(NodeRow).where(NodeRow.name != node).values(schedulable=False, updated_at=time.time())
        )


def test_a_node_appears_then_disappears_and_its_work_is_requeued(cp: ContractPlatform) -> None:
    if cp.engine.add_node is None or cp.engine.remove_node is None:
        pytest.skip(f"a {cp.engine.name} pool is one machine: its nodes cannot come and go")
    new = cp.engine.add_node()
    deadline = time.time() + 60
    while new not in cp.gpus_per_node():
        assert time.time() < deadline, f"node {new} never appeared"
        time.sleep(0.5)
        cp.server.controller.sync_inventory()
    _cordon_all_but(cp, new)
    ref = cp.submit({"name": "on-new", "command": [PY, STEPS, "100", "0.1"], "resources": {"gpus": 1}})
    d = cp.wait(ref, lambda d: d["phase"] == "running" and d["last_checkpoint_time"] is not None, timeout=60)
    assert d["tasks"][-1]["node"] == new
    cp.engine.remove_node(new)
    cp.server.controller.sync_inventory()  # the others come back; the removed one stays out
    deadline = time.time() + 90
    while new in cp.gpus_per_node():
        assert time.time() < deadline, f"node {new} never disappeared"
        time.sleep(0.5)
        cp.server.controller.sync_inventory()
    d = cp.wait(ref, lambda d: d["phase"] == "succeeded", timeout=120)
    assert d["attempt"] >= 2 and d["tasks"][-1]["node"] != new
    assert "lost with node" in " ".join(e["message"] for e in d["events"])
    assert "resumed from step" in cp.logs(ref, attempt=d["attempt"])


def test_engine_unreachable_then_back_keeps_state(cp: ContractPlatform) -> None:
    if cp.engine.stop_engine is None or cp.engine.start_engine is None:
        pytest.skip(f"the {cp.engine.name} fixture cannot take its engine away")
    ref = cp.submit({"name": "survivor", "command": code("import time; time.sleep(8); print('finished')")})
    cp.wait(ref, lambda d: d["phase"] == "running", timeout=60)
    cp.engine.stop_engine()
    try:
        cp.server.controller.sync_inventory()
        cp.tick(3)  # must neither crash nor give up on the running task
        # An engine going down may take a moment to show (a loaded machine, a client that
        # still holds its connection): the report must come, within seconds.
        deadline = time.time() + 30
        while not cp.server.controller.pool_errors:
            assert time.time() < deadline, "the unreachable engine is reported"
            time.sleep(0.5)
            cp.server.controller.sync_inventory()
            cp.tick(1)
        assert not cp.gpus_per_node(), "no new work goes to an unreachable pool"
        d = cp.api.get(f"/v1/workloads/{ref}").json()
        assert d["phase"] == "running"
    finally:
        cp.engine.start_engine()
    deadline = time.time() + 60
    while not cp.gpus_per_node():
        assert time.time() < deadline
        time.sleep(0.5)
        cp.server.controller.sync_inventory()
    assert not cp.server.controller.pool_errors
    d = cp.wait(ref, lambda d: d["phase"] in ("succeeded", "failed"), timeout=60)
    assert d["phase"] == "succeeded" and d["attempt"] == 1
