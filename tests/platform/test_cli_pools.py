"""Pools and project policies from the command line: `aifab server --config`, `aifab admin
project --node-pool ...`, and the node state `aifab nodes` shows."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from .test_cli_e2e import AIFAB, Env, env  # noqa: F401


def test_server_refuses_a_bad_pool_file_naming_the_field(tmp_path: Path) -> None:
    config = tmp_path / "pools.yaml"
    config.write_text("pools:\n  ray:\n    backend: ray\n")
    r = subprocess.run(
        [AIFAB, "server", "--config", str(config)],
        env={"AIFAB_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0
    assert "pools.ray.address" in r.stderr and "Traceback" not in r.stderr


def test_project_policies_and_node_state_through_the_cli(env: Env) -> None:  # noqa: F811
    env.cli(
        "admin",
        "project",
        "p",
        "--deserved",
        "1",
        "--node-pool",
        "farm",
        "--retries",
        "2",
        "--max-runtime",
        "600",
    )
    projects = {p["name"]: p for p in json.loads(env.cli("projects", "-o", "json").stdout)}
    assert projects["p"]["node_pool"] == "farm" and projects["p"]["retries"] == 2
    assert projects["p"]["max_runtime"] == 600
    nodes = json.loads(env.cli("nodes", "-o", "json").stdout)
    assert [n["state"] for n in nodes] == ["ready"] and nodes[0]["pool"] == "default"
    assert "STATE" in env.cli("nodes").stdout
