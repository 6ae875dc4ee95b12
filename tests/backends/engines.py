"""What the backend contract suite needs from each engine under test.

Each engine module (``local``, ``ray_cluster``, ``slurm_cluster``) provides a session-scoped
pytest fixture named ``<name>_engine`` that starts a real cluster (or, for local, nothing) and
yields an :class:`Engine`; the contract suite in ``test_contract.py`` runs every test against
each of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from aifab.backends.base import Backend


@dataclass
class Engine:
    name: str  # "local", "ray", "slurm"
    # A new backend instance connected to the engine each call, for the control plane whose
    # home folder is given (the backend keeps its own state there, and names what it starts so
    # that two control planes on one engine never collide). A second call with the same home
    # stands for a restarted control plane: it must adopt what the first one launched.
    make_backend: Callable[[Path], Backend]
    # A folder every node of the engine can read and write (workdirs, logs, checkpoints).
    shared_dir: Path
    # Adds a node to the running engine and returns its name (None: the engine cannot).
    add_node: Callable[[], str] | None = None
    # Takes a node out of the engine (drained or killed) (None: the engine cannot).
    remove_node: Callable[[str], None] | None = None
    # Makes the engine unreachable, then reachable again (None: not supported by the fixture).
    stop_engine: Callable[[], None] | None = None
    start_engine: Callable[[], None] | None = None
