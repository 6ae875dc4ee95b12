"""A real Ray cluster on loopback for the backend tests: a head node (no GPUs) and two workers
``w1`` and ``w2`` (2 CPUs and 4 logical GPUs each), every node named by the ``aifab.io/node``
label. Import the fixtures into a test module with
``from tests.backends.ray_cluster import ray_engine  # noqa: F401``.

On these machines Ray must be kept on 127.0.0.1 (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, for
the nodes and for this process, which is the driver), its session folder must be short (Unix
socket paths are limited to 107 bytes) and its daemons ignore SIGTERM: everything started here
is killed by process id at the end, never by name (other test runs share the machine).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from aifab.backends.ray import RayBackend
from tests.backends.engines import Engine

NAMESPACE = "aifab-test"
OBJECT_STORE_BYTES = 100 * 1024 * 1024  # Ray would size it from the whole host's memory
WORKER_LABELS = {
    "aifab.io/gpu-model": "H100",
    "aifab.io/gpu-memory-mib": "81920",
    "aifab.io/virtual-gpus": "true",
}
# A SIGKILLed node is declared dead after about 1.5 s instead of Ray's default of ~30 s.
HEALTH_CHECKS = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 500,
    "health_check_failure_threshold": 3,
}


class LoopbackRay:
    """The cluster: nodes by name, and every process they started, for killing by pid."""

    def __init__(self, shared_dir: Path, gcs_port: int = 0) -> None:
        from ray.cluster_utils import Cluster

        self.shared_dir = shared_dir
        self.gcs_port = gcs_port  # 0: any free port
        self.cluster = Cluster(initialize_head=False, shutdown_at_exit=True)
        self.nodes: dict[str, Any] = {}  # name → ray._private.node.Node
        self._names = itertools.count(1)
        self._seen: dict[int, float] = {}  # pid → create time, of everything started here

    @property
    def address(self) -> str:
        return str(self.cluster.address)

    def start(self, workers: int = 2) -> None:
        port = {"gcs_server_port": self.gcs_port} if self.gcs_port else {}
        self._add(
            "head", num_cpus=1, num_gpus=0, include_dashboard=False, _system_config=HEALTH_CHECKS, **port
        )
        for _ in range(workers):
            self.add_node()

    def add_node(self) -> str:
        name = f"w{next(self._names)}"
        self._add(name, num_cpus=2, num_gpus=4, labels={**WORKER_LABELS})
        return name

    def _add(self, name: str, **args: Any) -> None:
        labels = {"aifab.io/node": name, **args.pop("labels", {})}
        with _process_state_kept():
            node = self.cluster.add_node(labels=labels, object_store_memory=OBJECT_STORE_BYTES, **args)
        self.nodes[name] = node
        self._remember(node)

    def stop_engine(self) -> None:
        """Makes the cluster unreachable, state intact: the GCS is frozen (SIGSTOP), so calls to
        it time out as they would across a network partition."""
        os.kill(self._gcs_pid(), signal.SIGSTOP)

    def start_engine(self) -> None:
        os.kill(self._gcs_pid(), signal.SIGCONT)

    def _gcs_pid(self) -> int:
        return int(self.nodes["head"].all_processes["gcs_server"][0].process.pid)

    def raylet_pid(self, name: str) -> int:
        return int(self.nodes[name].all_processes["raylet"][0].process.pid)

    def remove_node(self, name: str) -> None:
        """Kill a worker node's raylet and everything under it, as a machine failure would."""
        if name == "head":
            raise ValueError("the head node cannot be removed: it is the cluster")
        node = self.nodes.pop(name)
        doomed = self._tree(node)
        self.cluster.remove_node(node, allow_graceful=False)
        _kill(doomed)

    def stop(self, driver: bool = True) -> None:
        """Kill every process of the cluster; with ``driver``, disconnect this process from it
        first (leave it False for a cluster this process does not drive: it may drive another)."""
        import ray

        with contextlib.suppress(Exception):
            self.start_engine()  # a frozen GCS would hold up the driver's shutdown
        with contextlib.suppress(Exception):  # whatever state the driver is in, kill the rest
            if driver:
                ray.shutdown()
        for name in [n for n in self.nodes if n != "head"] + ["head"]:
            node = self.nodes.pop(name, None)
            if node is not None:
                doomed = self._tree(node)
                with contextlib.suppress(Exception):
                    node.kill_all_processes(check_alive=False, allow_graceful=False, wait=True)
                _kill(doomed)
        _kill(self._seen)

    def _remember(self, node: Any) -> None:
        self._seen.update(self._tree(node))

    def _tree(self, node: Any) -> dict[int, float]:
        """The node's daemons and all their descendants now (workers, runners, tasks)."""
        found: dict[int, float] = {}
        for infos in node.all_processes.values():
            for info in infos:
                with contextlib.suppress(psutil.Error):
                    proc = psutil.Process(info.process.pid)
                    for p in [proc, *proc.children(recursive=True)]:
                        with contextlib.suppress(psutil.Error):
                            found[p.pid] = p.create_time()
        self._seen.update(found)
        return found


@contextlib.contextmanager
def _process_state_kept() -> Iterator[None]:
    """Starting a node in this process points the process's GCS client (the one of
    ``ray.experimental.internal_kv``, which aifab's records and node listing use) at that node's
    cluster, and a head node writes its address as this machine's "current" cluster. Both are
    put back as they were: a process connected as a driver keeps talking to its own cluster,
    even while it starts another (one it does not drive), and after that one is gone."""
    from ray._common.utils import get_ray_address_file
    from ray.experimental import internal_kv

    client = internal_kv.internal_kv_get_gcs_client()  # type: ignore[no-untyped-call]
    address_file = Path(get_ray_address_file(None))
    address = address_file.read_text() if address_file.exists() else None
    try:
        yield
    finally:
        if client is not None:  # none yet: the driver's ray.init sets its own
            internal_kv._initialize_internal_kv(client)
        if address is not None:
            address_file.write_text(address)


def _kill(pids: dict[int, float]) -> None:
    """SIGKILL each process that is still the one we saw (same pid and start time)."""
    for pid, created in pids.items():
        with contextlib.suppress(psutil.Error, OSError):
            if abs(psutil.Process(pid).create_time() - created) < 1:
                os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(_running(p) for p in pids):
        time.sleep(0.05)


def _running(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)  # zombies hold nothing
    except psutil.NoSuchProcess:
        return False


class _Shared:
    """One cluster per test process, however many modules import the fixtures: pytest makes a
    session fixture imported into two modules two fixtures, and a process can be the driver of
    one Ray cluster only. The last user to finish stops it."""

    loopback: LoopbackRay | None = None
    users = 0
    patch: pytest.MonkeyPatch | None = None
    ray_tmp = ""


def _acquire(tmp_path_factory: pytest.TempPathFactory) -> LoopbackRay:
    if _Shared.loopback is None:
        _Shared.loopback = _start(tmp_path_factory)
    _Shared.users += 1
    return _Shared.loopback


def _start(tmp_path_factory: pytest.TempPathFactory) -> LoopbackRay:
    import ray._private.ray_constants as ray_constants

    _Shared.ray_tmp = tempfile.mkdtemp(prefix="aifab-ray-", dir="/tmp")  # short: socket paths live here
    _Shared.patch = patch = pytest.MonkeyPatch()
    patch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    patch.setenv("RAY_TMPDIR", _Shared.ray_tmp)
    # Ray ends every process that loses the GCS for a minute (60 s by default), this one too:
    # stop_engine must not take pytest down on a slow machine.
    patch.setenv("RAY_gcs_rpc_server_reconnect_timeout_s", "600")
    # Read once at import; this process (the driver) may have imported Ray already.
    patch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
    loopback = LoopbackRay(tmp_path_factory.mktemp("ray-shared"))
    started = time.monotonic()
    try:
        loopback.start()
        # Connect the driver now, while there are the three nodes only: nodes that come and go
        # later are never the one it is attached to.
        _backend(loopback, loopback.shared_dir).inventory()
    except Exception as exc:
        _stop(loopback)
        pytest.fail(f"could not start a Ray cluster on loopback: {type(exc).__name__}: {exc}")
    print(f"Ray cluster at {loopback.address} up in {time.monotonic() - started:.1f} s")
    return loopback


def _release() -> None:
    _Shared.users -= 1
    if _Shared.users == 0 and _Shared.loopback is not None:
        loopback, _Shared.loopback = _Shared.loopback, None
        _stop(loopback)


def _stop(loopback: LoopbackRay) -> None:
    try:
        loopback.stop()
    finally:
        if _Shared.patch is not None:
            _Shared.patch.undo()
            _Shared.patch = None
        shutil.rmtree(_Shared.ray_tmp, ignore_errors=True)


def namespace_for(home: Path) -> str:
    """One Ray namespace per control-plane home: two control planes on the cluster never share
    runner names or records (their workload ids may well coincide)."""
    return f"{NAMESPACE}-{hashlib.sha256(str(home).encode()).hexdigest()[:12]}"


def _backend(loopback: LoopbackRay, home: Path) -> RayBackend:
    # A generous start: this machine has two cores shared with other test runs. Calls keep the
    # default timeout: while stop_engine holds the GCS, every call waits that long.
    return RayBackend(
        "ray",
        "ray",
        loopback.address,
        namespace_for(home),
        call_timeout=5.0,
        start_timeout=60.0,
        log_dir=str(home / "ray-logs"),
    )


@pytest.fixture(scope="session")
def ray_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    loopback = _acquire(tmp_path_factory)
    try:
        yield Engine(
            name="ray",
            make_backend=lambda home: _backend(loopback, home),
            shared_dir=loopback.shared_dir,
            add_node=loopback.add_node,
            remove_node=loopback.remove_node,
            stop_engine=loopback.stop_engine,
            start_engine=loopback.start_engine,
        )
    finally:
        _release()


@pytest.fixture(scope="session")
def ray_loopback(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopbackRay]:
    """The cluster behind ``ray_engine`` itself, for tests that look at its processes."""
    loopback = _acquire(tmp_path_factory)
    try:
        yield loopback
    finally:
        _release()
