"""A real Slurm cluster for the backend tests: ``scripts/slurm/cluster.sh`` on this host, one per
pytest-xdist worker (each takes its own ports and folder).

```slurm_engine`` is session-scoped: the cluster starts once (about a second) and every test of
the worker shares it, so tests must leave nodes as they found them and give each control plane
a home of its own. When Slurm cannot be installed or started the fixture fails, never skips: CI
installs Slurm, and a silently skipped backend would be an untested one.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from aifab.backends.slurm import SlurmBackend
from tests.backends.engines import Engine

CLUSTER_SH = Path(__file__).resolve().parents[2] / "scripts" / "slurm" / "cluster.sh"
POOL = "slurm-pool"
PARTITION = "gpu"
NODES = ("n1", "n2")  # started with the cluster
SPARE_NODE = "n3"  # declared in slurm.conf, started by add_node
GPUS_PER_NODE = 4
# Small enough that the tests' jobs never wait for one another's memory (4000 MB per node).
TASK_MEMORY_MIB = 128


@dataclass
class SlurmCluster:
    root: Path  # the cluster's own files (config, state, logs, fake GPU devices)
    shared_dir: Path  # what every node sees: workdirs, logs, the control planes' homes

    @property
    def slurm_conf(self) -> Path:
        return self.root / "etc" / "slurm.conf"

    def script(self, *args: str, timeout: float = 90) -> str:
        try:
            done = subprocess.run(
                ["bash", str(CLUSTER_SH), *args], capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(f"cluster.sh {' '.join(args)} took over {timeout}s") from exc
        if done.returncode != 0:
            raise AssertionError(f"cluster.sh {' '.join(args)} failed:\n{done.stdout}{done.stderr}")
        return done.stdout

    def make_backend(self, home: Path) -> SlurmBackend:
        """A backend for the control plane whose home is ``home`` (on the shared folder: the
        nodes write the tasks' start and exit records there). Same home: a restarted one."""
        return SlurmBackend(
            name="slurm",
            pool=POOL,
            partition=PARTITION,
            slurm_conf=str(self.slurm_conf),
            state_dir=home / "slurm",
            default_memory_mib=TASK_MEMORY_MIB,
            virtual_gpus=True,  # character devices that nothing opens
            command_timeout_s=20,
        )

    def add_node(self) -> str:
        self.script("add-node", str(self.root), SPARE_NODE)
        return SPARE_NODE

    def remove_node(self, node: str) -> None:
        self.script("kill-node", str(self.root), node)

    def restart_node(self, node: str) -> None:
        self.script("start-node", str(self.root), node)

    def stop_controller(self) -> None:
        self.script("stop-ctld", str(self.root))

    def start_controller(self) -> None:
        self.script("start-ctld", str(self.root))

    def slurm(self, *args: str) -> str:
        """A Slurm client command against this cluster (for checks the backend does not offer)."""
        done = subprocess.run(
            list(args),
            env={"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "SLURM_CONF": str(self.slurm_conf)},
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
        return done.stdout + done.stderr

    def engine(self) -> Engine:
        return Engine(
            name="slurm",
            make_backend=self.make_backend,
            shared_dir=self.shared_dir,
            add_node=self.add_node,
            remove_node=self.remove_node,
            stop_engine=self.stop_controller,
            start_engine=self.start_controller,
        )


def _install() -> None:
    try:
        done = subprocess.run(
            ["bash", str(CLUSTER_SH), "install"], capture_output=True, text=True, timeout=600, check=False
        )
    except subprocess.TimeoutExpired:
        pytest.fail("installing Slurm (scripts/slurm/cluster.sh install) took over 10 minutes")
    if done.returncode != 0:
        pytest.fail(
            "Slurm is needed for the Slurm backend tests and could not be installed "
            f"(scripts/slurm/cluster.sh install):\n{done.stdout}{done.stderr}"
        )


def cluster_of(engine: Engine) -> SlurmCluster:
    """The cluster behind ``slurm_engine`` (for tests that need more than the Engine offers)."""
    cluster = getattr(engine.make_backend, "__self__", None)
    assert isinstance(cluster, SlurmCluster), f"{engine.name} is not a test Slurm cluster"
    return cluster


@pytest.fixture(scope="session")
def slurm_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    """Self-contained (no other fixture to import): ``from tests.backends.slurm_cluster import
    slurm_engine`` is all a test module needs."""
    _install()
    # A short folder of its own: slurmstepd puts UNIX sockets under the spool directory, and
    # their paths may not exceed 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="aifab-slurm-", dir="/tmp"))
    cluster = SlurmCluster(root=root, shared_dir=tmp_path_factory.mktemp("slurm-shared"))
    try:
        try:
            cluster.script("start", str(root))
        except AssertionError as exc:
            logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(root.glob("log/*")))
            pytest.fail(f"the test Slurm cluster did not start: {exc}\n{logs}")
        yield cluster.engine()
    finally:
        subprocess.run(
            ["bash", str(CLUSTER_SH), "stop", str(root)], capture_output=True, timeout=120, check=False
        )
        shutil.rmtree(root, ignore_errors=True)
