"""One aifab server, three pools: local virtual GPUs, a real Ray cluster and a real Slurm
partition, configured through the server's configuration file and scheduled under one set of
project quotas (see docs/pools.md)."""

from __future__ import annotations

import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from aifab.api.app import ServerContext, create_app
from aifab.control.server import build
from aifab.control.settings import Settings
from aifab.core.errors import ValidationError
from tests.platform.conftest import Platform

from .engines import Engine
from .ray_cluster import LoopbackRay, namespace_for, ray_loopback  # noqa: F401
from .slurm_cluster import PARTITION, cluster_of, slurm_engine  # noqa: F401

# Shares the Ray cluster of the other Ray tests (one per process): the same xdist worker.
pytestmark = pytest.mark.xdist_group("ray")
PY = sys.executable

CONFIG = """
pools:
  laptop:
    backend: local
    gpus: 2
    node_name: laptop-1
  ray:
    backend: ray
    address: {ray_address}
    namespace: {namespace}
  slurm:
    backend: slurm
    partition: {partition}
    slurm_conf: {slurm_conf}
    virtual_gpus: true
    default_memory_mib: 128
"""


@pytest.fixture
def three_pools(ray_loopback: LoopbackRay, slurm_engine: Engine) -> Iterator[Platform]:  # noqa: F811
    slurm = cluster_of(slurm_engine)
    home = slurm.shared_dir / f"three-{uuid.uuid4().hex[:8]}"
    home.mkdir()
    config = home / "config.yaml"
    config.write_text(
        CONFIG.format(
            ray_address=ray_loopback.address,
            namespace=namespace_for(home),
            partition=PARTITION,
            slurm_conf=slurm.slurm_conf,
        )
    )
    settings = Settings.load(env={}, home=home, config=str(config))
    server = build(settings)
    assert server.admin_token is not None
    api = TestClient(create_app(ServerContext(settings, server.db, server.backend, server.controller)))
    api.headers["Authorization"] = f"Bearer {server.admin_token}"
    platform = Platform(server, api, {"token": server.admin_token})
    yield platform
    for w in api.get("/v1/workloads", params={"all": "true"}).json():
        if w["phase"] in ("pending", "scheduled", "running"):
            api.post(f"/v1/workloads/{w['id']}/cancel")
    deadline = time.time() + 30
    while time.time() < deadline and any(
        w["phase"] in ("scheduled", "running")
        for w in api.get("/v1/workloads", params={"all": "true"}).json()
    ):
        platform.tick()
        time.sleep(0.2)
    server.db.dispose()


def job(name: str, project: str, seconds: float = 1.0, **extra: Any) -> dict[str, Any]:
    code = f"import os, time; print('on', os.environ.get('AIFAB_JOB_ID'), flush=True); time.sleep({seconds})"
    return {"kind": "job", "name": name, "project": project, "command": [PY, "-c", code], **extra}


GANG = textwrap.dedent(
    """
    import os, socket, time
    rank, addr, port = int(os.environ["RANK"]), os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    if rank == 0:
        conn, _ = socket.create_server(("0.0.0.0", port)).accept()
        print("got", conn.recv(64).decode(), flush=True)
    else:
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection((addr, port), timeout=5).sendall(b"hello"); break
            except OSError:
                if time.time() > deadline: raise
                time.sleep(0.2)
    """
)


def test_one_server_schedules_a_mix_over_three_pools(three_pools: Platform) -> None:
    p = three_pools
    nodes = {n["name"]: n for n in p.api.get("/v1/nodes").json()}
    by_pool = {(n["pool"], n["backend"]) for n in nodes.values() if n["schedulable"]}
    assert {("laptop", "local"), ("ray", "ray"), ("slurm", "slurm")} <= by_pool
    pool_of = {name: n["pool"] for name, n in nodes.items()}
    total = sum(n["gpus"] for n in nodes.values() if n["schedulable"])  # 2 + 8 + 8
    # Shared quotas across pools: vision may use at most 10 GPUs wherever they are.
    assert (
        p.api.post("/v1/projects", json={"name": "vision", "deserved_gpus": 8, "limit_gpus": 10}).status_code
        == 201
    )
    assert p.api.post("/v1/projects", json={"name": "nlp", "deserved_gpus": total - 8}).status_code == 201

    refs = {
        "on-slurm": ("vision", job("on-slurm", "vision", 2, node_pool="slurm", resources={"gpus": 4})),
        "on-ray": ("vision", job("on-ray", "vision", 2, node_pool="ray", resources={"gpus": 2})),
        "gang": (
            "vision",
            {**job("gang", "vision"), "command": [PY, "-c", GANG], "replicas": 2, "resources": {"gpus": 2}},
        ),
        "half-a": ("nlp", job("half-a", "nlp", 2, resources={"gpus": 0.5})),
        "half-b": ("nlp", job("half-b", "nlp", 2, resources={"gpus": 0.5})),
        "on-laptop": ("nlp", job("on-laptop", "nlp", 1, node_pool="laptop", resources={"gpus": 1})),
    }
    ids = {}
    for name, (_, spec) in refs.items():
        r = p.api.post("/v1/workloads", json=spec)
        assert r.status_code == 201, r.text
        ids[name] = r.json()["id"]
    # Over vision's limit of 10 while the others hold 4 + 2 + 4: waits and says why.
    over = p.api.post("/v1/workloads", json=job("over", "vision", 1, resources={"gpus": 4})).json()["id"]
    seen_limit = False
    deadline = time.time() + 180
    while True:
        p.tick()
        d = {n: p.api.get(f"/v1/workloads/{i}").json() for n, i in ids.items()}
        o = p.api.get(f"/v1/workloads/{over}").json()
        seen_limit = seen_limit or (o["phase"] == "pending" and "limit" in (o.get("reason") or ""))
        if all(x["phase"] in ("succeeded", "failed") for x in d.values()) and o["phase"] == "succeeded":
            break
        assert time.time() < deadline, {n: (x["phase"], x.get("reason")) for n, x in d.items()}
        time.sleep(0.2)
    assert all(x["phase"] == "succeeded" for x in d.values()), {n: x["events"][-3:] for n, x in d.items()}
    pools = {n: {pool_of[t["node"]] for t in x["tasks"]} for n, x in d.items()}
    assert pools["on-slurm"] == {"slurm"} and pools["on-ray"] == {"ray"} and pools["on-laptop"] == {"laptop"}
    assert len(pools["gang"]) == 1 and pools["gang"] <= {"ray", "slurm"}, "a gang stays inside one pool"
    assert pools["half-a"] | pools["half-b"] <= {"laptop", "ray"}, "Slurm cannot share a GPU"
    assert seen_limit, "the job over vision's limit waited for room under the limit"
    assert "got hello" in p.api.get(f"/v1/workloads/{ids['gang']}/logs", params={"task": 0}).json()["text"]


def test_a_bad_pool_configuration_names_the_field(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("pools:\n  ray:\n    backend: ray\n")
    with pytest.raises(ValidationError) as err:
        Settings.load(env={}, home=tmp_path, config=str(config))
    assert err.value.field == "pools.ray.address"
    config.write_text("pools:\n  gpu:\n    backend: kubernetes\n")
    with pytest.raises(ValidationError) as err:
        Settings.load(env={}, home=tmp_path, config=str(config))
    assert "kubernetes" in str(err.value) or "backend" in str(err.value)
