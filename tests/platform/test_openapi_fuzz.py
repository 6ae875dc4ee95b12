"""Schemathesis against the OpenAPI document: whatever it sends, the server never answers 5xx."""

from __future__ import annotations

import tempfile
from pathlib import Path

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from aifab.api.app import ServerContext, create_app
from aifab.control.server import build
from aifab.control.settings import Settings

# Schemathesis reads the schema when tests are collected, so the server is built at import: a
# store of its own in a temporary directory, two virtual GPUs, no projects (nothing submitted
# can ever run, so the fuzzing starts no processes).
_home = Path(tempfile.mkdtemp(prefix="aifab-fuzz-"))
_settings = Settings.load(env={}, home=_home, database_url=f"sqlite:///{_home / 'fuzz.db'}", gpus=2)
_server = build(_settings)
_app = create_app(ServerContext(_settings, _server.db, _server.backend, _server.controller))
schema = schemathesis.openapi.from_asgi("/openapi.json", _app)


@schema.auth()
class Admin:
    def get(self, case: schemathesis.Case, ctx: schemathesis.AuthContext) -> str:
        return _server.admin_token or ""

    def set(self, case: schemathesis.Case, data: str, ctx: schemathesis.AuthContext) -> None:
        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {data}"}


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case: schemathesis.Case) -> None:
    case.call_and_validate(checks=[not_a_server_error])
