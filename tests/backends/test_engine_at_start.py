"""The control plane started while its engine is down, against real engines: a server built from
its configuration file (as ``aifab server --config`` builds it) while the Ray cluster's GCS or
Slurm's controller does not answer must start, say which pool is unreachable and why, keep a job
submitted meanwhile waiting with a reason, and run it once the engine is back, by itself (its
loops take inventory again). The same for a server restarted while its engine is down, with a
task still running there. And a Slurm node drained under running and waiting work: it takes no
new work, its running task finishes there, nothing is lost or run twice.

The local backend has no engine to lose: it is not tested here.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient

from aifab.api.app import ServerContext, create_app
from aifab.backends.ray.cluster import alive_nodes
from aifab.control.server import build
from aifab.control.settings import Settings
from tests.platform.test_cli_e2e import Env, _free_port

from .engines import Engine
from .ray_cluster import LoopbackRay, namespace_for, ray_engine, ray_loopback  # noqa: F401
from .slurm_cluster import PARTITION, TASK_MEMORY_MIB, cluster_of, slurm_engine  # noqa: F401
from .test_contract import ContractPlatform, _stop_all, code

ENGINES = [pytest.param(name, marks=pytest.mark.xdist_group(name)) for name in ("ray", "slurm")]
FINAL = ("succeeded", "failed", "cancelled")
PY = sys.executable
RAY_DOWN = "Ray's GCS did not list its nodes"  # the GCS frozen: calls to it time out
SLURM_DOWN = "sinfo: slurmctld cannot be reached"
# Runs until the file named by its first argument exists (two minutes at most), then says so.
WAITS_FOR = """
import os, pathlib, sys, time
go, deadline = pathlib.Path(sys.argv[1]), time.time() + 120
print("started", os.environ["AIFAB_JOB_ID"], flush=True)
while not go.exists() and time.time() < deadline:
    time.sleep(0.1)
print("finished" if go.exists() else "gave up", flush=True)
sys.exit(0 if go.exists() else 4)
"""


@dataclass
class Site:
    """One engine under test, and the pool a server's configuration file gives it."""

    engine: Engine
    pool_config: Callable[[Path], dict[str, Any]]  # the pool's entry for a server whose home is given
    down: str  # what the pool's error says while the engine is stopped
    servers: list[ContractPlatform] = field(default_factory=list)

    @property
    def pool(self) -> str:
        return self.engine.name

    def home(self) -> Path:
        """A new control plane's home, on the folder every node of the engine sees."""
        home = self.engine.shared_dir / f"at-start-{uuid.uuid4().hex[:8]}"
        home.mkdir()
        config = {"pools": {self.pool: self.pool_config(home)}}
        (home / "config.yaml").write_text(yaml.safe_dump(config))
        return home

    def start(self, home: Path) -> ContractPlatform:
        """`aifab server --config HOME/config.yaml` in this process, its loops driven by ``tick``:
        store opened, pools connected, inventory taken, as ``build`` does at every start."""
        settings = Settings.load(env={}, home=home, config=str(home / "config.yaml"))
        server = build(settings)
        token = server.admin_token or (home / "admin.token").read_text().strip()
        api = TestClient(create_app(ServerContext(settings, server.db, server.backend, server.controller)))
        api.headers["Authorization"] = f"Bearer {token}"
        platform = ContractPlatform(server, api, {"token": token})
        platform.engine, platform.pool = self.engine, self.pool
        self.servers.append(platform)
        return platform


def _ray_pool(loopback: LoopbackRay) -> Callable[[Path], dict[str, Any]]:
    return lambda home: {"backend": "ray", "address": loopback.address, "namespace": namespace_for(home)}


def _slurm_pool(engine: Engine) -> Callable[[Path], dict[str, Any]]:
    conf = str(cluster_of(engine).slurm_conf)
    pool = {"backend": "slurm", "partition": PARTITION, "slurm_conf": conf, "virtual_gpus": True}
    return lambda home: {**pool, "default_memory_mib": TASK_MEMORY_MIB}


def _serving(engine: Engine, pool_config: Callable[[Path], dict[str, Any]], down: str) -> Iterator[Site]:
    """A site whose servers are cleaned up after the test: the last one started (the others
    are earlier lives of it) cancels what is left and waits for it to stop."""
    s = Site(engine, pool_config, down)
    yield s
    if s.servers:
        _stop_all(s.servers[-1])
    for platform in s.servers:
        platform.server.db.dispose()


@pytest.fixture(params=ENGINES)
def site(request: pytest.FixtureRequest) -> Iterator[Site]:
    engine: Engine = request.getfixturevalue(f"{request.param}_engine")
    if request.param == "ray":
        yield from _serving(engine, _ray_pool(request.getfixturevalue("ray_loopback")), RAY_DOWN)
    else:
        yield from _serving(engine, _slurm_pool(engine), SLURM_DOWN)


@pytest.fixture
def slurm_site(slurm_engine: Engine) -> Iterator[Site]:  # noqa: F811
    yield from _serving(slurm_engine, _slurm_pool(slurm_engine), SLURM_DOWN)


def stop_engine(site: Site) -> None:
    assert site.engine.stop_engine is not None
    site.engine.stop_engine()


def start_engine(site: Site) -> None:
    assert site.engine.start_engine is not None
    site.engine.start_engine()


def waits_for(go: Path, name: str, gpus: int = 1) -> dict[str, Any]:
    return {"name": name, "command": [*code(WAITS_FOR), str(go)], "resources": {"gpus": gpus}}


def until(p: ContractPlatform, condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
    """Passes of the server's loops until ``condition`` holds (they retake inventory every few
    seconds by themselves)."""
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"not {what} after {timeout:g} s"
        p.tick()
        time.sleep(0.2)


# ------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("known", [False, True], ids=["first-start", "restart"])
def test_server_started_while_its_engine_is_down(site: Site, known: bool) -> None:
    """First start (the store knows no node of the pool) or a restart (it knows them, and a task
    of the pool still runs): the server starts, reports the pool unreachable with the engine's
    reason, keeps what runs and what waits, and carries on by itself once the engine is back."""
    home = site.home()
    go = home / "go"
    running = None
    if known:
        before = site.start(home)
        assert before.api.post("/v1/projects", json={"name": "p", "deserved_gpus": 2}).status_code == 201
        running = before.submit(waits_for(go, "runs-through"))
        before.wait(running, lambda d: d["phase"] == "running", timeout=90)
    stop_engine(site)
    try:
        p = site.start(home)  # must not raise: the engine's absence is reported, not fatal
        why = p.server.controller.pool_errors.get(site.pool, "")
        assert site.down in why and "{" not in why, p.server.controller.pool_errors  # for a person
        nodes = p.api.get("/v1/nodes").json()
        assert all(n["pool"] == site.pool and not n["schedulable"] for n in nodes), nodes
        assert {n["state"] for n in nodes} == {f"unreachable: {why}"}, nodes
        if known:
            assert len(nodes) > 1, "a restarted server lists the nodes it knows, even if their engine is away"
        else:
            # never answered: one row says the pool exists and why it shows no nodes
            assert [(n["name"], n["gpus"]) for n in nodes] == [(f"({site.pool})", 0)], nodes
            assert p.api.post("/v1/projects", json={"name": "p", "deserved_gpus": 2}).status_code == 201
        waiting = p.submit(
            {"name": "waits", "command": code("print('ran late', flush=True)"), "resources": {"gpus": 1}}
        )
        p.tick(2)  # must neither crash nor give up on anything
        d = p.api.get(f"/v1/workloads/{waiting}").json()
        assert d["phase"] == "pending" and d["attempt"] == 0 and not d["tasks"], d
        assert d["reason"], "a waiting workload says why it waits"
        assert f"pool {site.pool} is unreachable ({why})" in d["reason"], d["reason"]
        if running is not None:
            d = p.api.get(f"/v1/workloads/{running}").json()
            assert d["phase"] == "running" and d["attempt"] == 1, d["events"]
    finally:
        start_engine(site)
    go.touch()
    for ref in [waiting] if running is None else [waiting, running]:
        # No explicit inventory call: the server's own loop finds the engine back.
        d = p.wait(ref, lambda d: d["phase"] in FINAL, timeout=120)
        assert d["phase"] == "succeeded" and d["attempt"] == 1 and d["failures"] == 0, d["events"]
        assert not [e for e in d["events"] if e["kind"] == "error"], d["events"]
    assert "ran late" in p.logs(waiting)
    if running is not None:
        assert "finished" in p.logs(running)
    assert not p.server.controller.pool_errors
    assert {n["state"] for n in p.api.get("/v1/nodes").json()} == {"ready"}


def started(p: ContractPlatform, ref: str) -> bool:
    """The task really runs (its log says so), not only handed to its engine."""
    return "started" in p.logs(ref)


@pytest.mark.xdist_group("slurm")
def test_drained_slurm_nodes_take_no_new_work_and_lose_none(slurm_site: Site) -> None:
    """``scontrol update state=drain``: a task Slurm has started on the node runs to its end
    there (aifab neither calls it lost nor runs it again); a task aifab handed to a node drained
    before Slurm started it (Slurm would hold it until the node is resumed) is taken back and
    placed again, not run twice; nothing new goes to a drained node, even an idle one."""
    cluster = cluster_of(slurm_site.engine)
    home = slurm_site.home()
    go = home / "go"
    p = slurm_site.start(home)
    per_node = p.gpus_per_node()
    assert len(per_node) == 2, per_node
    size = max(per_node.values())  # a whole node per job
    assert p.api.post("/v1/projects", json={"name": "p", "deserved_gpus": 2 * size}).status_code == 201

    def drain(node: str) -> None:
        out = cluster.slurm("scontrol", "update", f"NodeName={node}", "State=DRAIN", "Reason=aifab-test")
        assert out.strip() == "", out

    first = p.submit(waits_for(go, "on-drained", size))
    busy = p.wait(first, lambda d: started(p, first), timeout=60)["tasks"][0]["node"]
    (idle,) = set(per_node) - {busy}
    try:
        # Drained in Slurm just after aifab took inventory: aifab still sees the node free.
        p.server.controller.sync_inventory()
        drain(idle)
        late = p.submit(
            {"name": "late", "command": code("print('ran', flush=True)"), "resources": {"gpus": size}}
        )
        p.tick()
        d = p.api.get(f"/v1/workloads/{late}").json()
        assert d["phase"] in ("scheduled", "running") and d["tasks"][0]["node"] == idle, d
        # Slurm holds it for the drained node: aifab takes it back and requeues it, no failure.
        # (Until its next inventory aifab may place it on that node again: taken back again.)
        until(p, lambda: idle not in p.gpus_per_node(), f"{idle} out of the schedulable nodes")
        d = p.wait(late, lambda d: d["phase"] == "pending", timeout=30)
        assert d["failures"] == 0 and d["reason"], d
        assert {(t["node"], t["state"]) for t in d["tasks"]} == {(idle, "lost")}, d["tasks"]
        assert f"lost with node {idle}" in " ".join(e["message"] for e in d["events"])
        assert f"aifab-{late}-" not in cluster.slurm("squeue", "--format=%j"), "its Slurm jobs are cancelled"
        # Drained under a running task: the task runs on, the node takes nothing new.
        drain(busy)
        until(p, lambda: busy not in p.gpus_per_node(), f"{busy} out of the schedulable nodes")
        nodes = {n["name"]: n for n in p.api.get("/v1/nodes").json()}
        assert not nodes[busy]["schedulable"] and nodes[busy]["state"] != "ready", nodes
        assert p.api.get(f"/v1/workloads/{first}").json()["phase"] == "running"
        go.touch()
        d = p.wait(first, lambda d: d["phase"] in FINAL, timeout=60)
        assert d["phase"] == "succeeded" and d["attempt"] == 1 and d["failures"] == 0, d["events"]
        assert d["tasks"][0]["node"] == busy and "finished" in p.logs(first)
        p.tick(3)  # both nodes idle now, both drained: the late job still waits
        assert p.api.get(f"/v1/workloads/{late}").json()["phase"] == "pending"
        cluster.slurm("scontrol", "update", f"NodeName={idle}", "State=RESUME")
        d = p.wait(late, lambda d: d["phase"] in FINAL, timeout=60)
        assert d["phase"] == "succeeded" and d["failures"] == 0, d["events"]
        assert d["tasks"][-1]["node"] == idle and d["tasks"][-1]["exit_code"] == 0
        runs = [p.logs(late, attempt=a) for a in range(1, d["attempt"] + 1)]
        assert runs[-1] == "ran\n" and not any(runs[:-1]), runs  # ran once: the attempts held back never
    finally:
        go.touch()
        for node in per_node:
            cluster.slurm("scontrol", "update", f"NodeName={node}", "State=RESUME")
    until(p, lambda: set(p.gpus_per_node()) == set(per_node), "every node back after its resume")


@pytest.mark.xdist_group("ray")
def test_aifab_server_started_before_its_ray_cluster(ray_loopback: LoopbackRay, tmp_path: Path) -> None:  # noqa: F811
    """A real ``aifab server`` process whose Ray pool names an address where no cluster runs
    yet (this process cannot stand for it: it drives the shared test cluster already). It
    serves, reports the pool, keeps a job waiting, and runs it once a cluster starts there."""
    gcs_port = _free_port()
    home = tmp_path / "home"
    home.mkdir()
    config = home / "pools.yaml"
    pool = {"backend": "ray", "address": f"127.0.0.1:{gcs_port}", "namespace": namespace_for(home)}
    config.write_text(yaml.safe_dump({"pools": {"ray": pool}}))
    env = Env(home, _free_port())
    env.server_args = ("--config", str(config))
    # The same Ray settings as the shared cluster (ray_loopback set them for this process).
    cluster = LoopbackRay(ray_loopback.shared_dir, gcs_port=gcs_port)
    shared = {n.node_id for n in alive_nodes(timeout=10).values()}  # what this process drives
    try:
        env.start()  # fails unless the server answers
        env.cli("login", "--url", f"http://127.0.0.1:{env.port}")
        log = "".join(p.read_text() for p in home.glob("server-*.log"))
        assert f"aifab: pool ray: the Ray cluster at 127.0.0.1:{gcs_port} cannot be reached" in log, log
        nodes = json.loads(env.cli("nodes", "-o", "json").stdout)
        assert [(n["name"], n["state"].split(":")[0]) for n in nodes] == [("(ray)", "unreachable")], nodes
        env.cli("admin", "project", "p", "--deserved", "1")
        run = ["run", "-p", "p", "--gpus", "1", "-o", "json", "--", PY, "-c", "print('ran on ray')"]
        wid = json.loads(env.cli(*run).stdout)["id"]
        deadline = time.time() + 30
        while not (d := json.loads(env.cli("describe", wid, "-o", "json").stdout))["reason"]:
            assert time.time() < deadline, f"no scheduling pass gave {wid} a reason: {d}"
            time.sleep(0.2)
        assert d["phase"] == "pending" and d["attempt"] == 0, d
        assert env.server is not None and env.server.poll() is None

        cluster.start(workers=1)
        d = env.wait_phase(wid, "succeeded", timeout=120)
        assert d["attempt"] == 1 and d["failures"] == 0, d["events"]
        assert "ran on ray" in env.cli("logs", wid).stdout
        nodes = json.loads(env.cli("nodes", "-o", "json").stdout)
        assert {(n["name"], n["state"]) for n in nodes} == {("head", "ready"), ("w1", "ready")}, nodes
    finally:
        env.kill()
        cluster.stop(driver=False)
    # Starting and stopping that cluster here left this process talking to the shared one.
    assert {n.node_id for n in alive_nodes(timeout=10).values()} == shared
