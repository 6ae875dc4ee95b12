"""Fixtures for the control plane: an in-process server over SQLite and PostgreSQL.

The server's loops are not started; tests call ``controller.tick()`` to advance them, so every
step is deterministic. Tasks are real processes started by the local executor.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient

from aifab.api.app import ServerContext, create_app
from aifab.control.server import Server, build
from aifab.control.settings import Settings

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'aifab.db'}"
        return
    name = f"aifab_platform_{uuid.uuid4().hex[:10]}"
    try:
        admin = psycopg.connect(PG_ADMIN, autocommit=True)
    except psycopg.OperationalError as exc:
        pytest.fail(
            f"PostgreSQL is not reachable at 127.0.0.1:5432 ({exc}); start it with pg_ctlcluster 15 main start"
        )
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        admin.close()


@dataclass
class Platform:
    server: Server
    api: TestClient
    admin: dict[str, str]

    def as_user(self, token: str) -> TestClient:
        c = TestClient(self.api.app)
        c.headers["Authorization"] = f"Bearer {token}"
        return c

    def tick(self, times: int = 1) -> None:
        for _ in range(times):
            self.server.controller.tick()

    def wait(
        self, ref: str, until: Callable[[dict[str, Any]], bool], timeout: float = 20.0
    ) -> dict[str, Any]:
        deadline = time.time() + timeout
        while True:
            self.tick()
            d = self.api.get(f"/v1/workloads/{ref}").json()
            if until(d):
                return d
            if time.time() > deadline:
                raise AssertionError(
                    f"timed out waiting on {ref}: {d['phase']} {d.get('reason')} {d['events'][-3:]}"
                )
            time.sleep(0.05)


@pytest.fixture
def platform(tmp_path: Path, store_url: str) -> Iterator[Platform]:
    settings = Settings.load(
        env={}, home=tmp_path / "home", database_url=store_url, gpus=2, gpu_model="virtual-gpu"
    )
    server = build(settings)
    assert server.admin_token is not None
    app = create_app(ServerContext(settings, server.db, server.backend, server.controller))
    api = TestClient(app)
    api.headers["Authorization"] = f"Bearer {server.admin_token}"
    yield Platform(server, api, {"token": server.admin_token})
    _stop_everything(server)
    server.db.dispose()


def _stop_everything(server: Server) -> None:
    from sqlalchemy import select

    from aifab.control.db.models import TaskRunRow

    with server.db.session() as s:
        for r in s.scalars(select(TaskRunRow).where(TaskRunRow.state.in_(("running", "stopping")))):
            if r.handle:
                server.backend.stop(r.handle, 0.0)
    server.backend.kill_overdue()
