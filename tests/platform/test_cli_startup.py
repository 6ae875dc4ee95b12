"""The client commands stay light: `aifab ps` imports neither the simulator nor the scheduler."""

from __future__ import annotations

import subprocess
import sys

import pytest

from aifab.cli import platform as cli
from aifab.control import settings


def test_the_cli_default_port_is_the_servers() -> None:
    assert cli.DEFAULT_PORT == settings.DEFAULT_PORT


def test_client_commands_do_not_import_the_scheduler() -> None:
    code = (
        "import sys; import aifab.cli.main; "
        "print(sorted(m for m in ('numpy', 'aifab.scheduler', 'aifab.sim', 'aifab.cli.sim', 'yaml', 'sqlalchemy') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_every_command_is_listed_and_loads(capsys: pytest.CaptureFixture[str]) -> None:
    from typer.main import get_command

    from aifab.cli.main import app

    group = get_command(app)
    ctx = group.make_context("aifab", ["--help"], resilient_parsing=True)
    names = group.list_commands(ctx)  # type: ignore[attr-defined]
    assert names[:3] == ["sim", "packing", "server"] and names[-2:] == ["demo", "admin"]
    assert {"ps", "run", "apply", "describe", "logs", "cancel", "projects", "nodes"} <= set(names)
    for name in names:
        assert group.get_command(ctx, name) is not None, name  # type: ignore[attr-defined]


def test_ps_prints_a_plain_aligned_table(capsys: pytest.CaptureFixture[str]) -> None:
    rows = [
        {"id": "w1", "name": "a", "reason": None},
        {"id": "w10", "name": "longer-name", "reason": "needs 64 GPUs; only 4 GPUs free in the cluster"},
    ]
    cli._emit(rows, "table", [("id", "ID"), ("name", "NAME"), ("reason", "REASON")], plain=True)
    assert capsys.readouterr().out.splitlines() == [
        "ID    NAME          REASON",
        "w1    a",
        "w10   longer-name   needs 64 GPUs; only 4 GPUs free in the cluster",
    ]
