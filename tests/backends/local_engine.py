"""The local backend as an engine of the contract suite: one machine, four virtual GPUs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from aifab.backends.base import Backend
from aifab.backends.local import LocalBackend, detect_inventory

from .engines import Engine


@pytest.fixture(scope="session")
def local_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    root: Path = tmp_path_factory.mktemp("local-engine")
    node = detect_inventory(node_name="local-1", gpus=4, gpu_model="virtual-gpu")

    def make_backend(home: Path) -> Backend:
        return LocalBackend(home, node)

    # One machine: nodes cannot come and go, and there is no engine to lose.
    yield Engine(name="local", make_backend=make_backend, shared_dir=root)
