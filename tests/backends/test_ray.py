"""The Ray backend against a real three-node Ray cluster on loopback (``ray_cluster.py``): exit
codes, logs, the environment contract, exact placement, stopping with a grace period, adoption by
a restarted control plane, gangs across nodes (DDP with gloo included), and nodes that come and go."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import psutil
import pytest
import ray

from aifab.backends.base import BackendError, EngineUnavailable, Handle, LaunchRequest, TaskState, TaskStatus
from aifab.backends.local import task_env
from aifab.backends.ray import RayBackend
from aifab.backends.ray.tasks import TaskRef
from tests.backends.engines import Engine
from tests.backends.ray_cluster import LoopbackRay, ray_engine, ray_loopback  # noqa: F401

# Every test here shares one Ray cluster with the contract suite's Ray tests: one xdist worker.
pytestmark = pytest.mark.xdist_group("ray")
PY = sys.executable
TRAIN = Path(__file__).resolve().parents[2] / "examples" / "mnist" / "train.py"
CONTROL_PLANE = """
import json, sys, time
from aifab.backends.base import LaunchRequest
from aifab.backends.ray import RayBackend

address, namespace, requests = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
backend = RayBackend("ray", "ray", address, namespace, call_timeout=15, start_timeout=60)
print(json.dumps([backend.launch(LaunchRequest(**r)) for r in requests]), flush=True)
time.sleep(120)
"""
SAVES_ON_SIGTERM = """
import signal, sys, time
def on_term(*_):
    print("saving", flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
print("ready", flush=True)
time.sleep(60)
"""
IGNORES_SIGTERM = """
import signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("ready", flush=True)
time.sleep(60)
"""
# What the task says about where it runs: the raylet it descends from (Ray sets RAY_RAYLET_PID
# in its workers' environment, and the task inherits its runner's), and its GPUs.
WHERE = "import json, os; print(json.dumps({k: os.environ[k] for k in ('RAY_RAYLET_PID', 'CUDA_VISIBLE_DEVICES')}), flush=True)"


def wait_until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.1)


def wait_for_end(backend: RayBackend, handle: Handle, timeout: float = 30.0) -> TaskStatus:
    wait_until(lambda: backend.status(handle).state != TaskState.RUNNING, timeout)
    return backend.status(handle)


def gone(pid: int) -> bool:
    """Dead, or a zombie nobody reaped yet."""
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def log_text(backend: RayBackend, handle: Handle) -> str:
    return backend.read_log(handle)[0].decode()


class Launcher:
    """Builds requests with a fresh workload id per test and releases every task at the end."""

    def __init__(self, engine: Engine, home: Path) -> None:
        self.engine = engine
        self.home = home  # the control plane's: a second backend over it is that control plane restarted
        self.backend: RayBackend = engine.make_backend(home)  # type: ignore[assignment]
        self.workload = f"wl-{uuid.uuid4().hex[:8]}"
        self.handles: list[Handle] = []

    def request(
        self,
        command: Sequence[str],
        *,
        node: str = "w1",
        index: int = 0,
        env: Mapping[str, str] | None = None,
        devices: tuple[int, ...] = (),
        gpu_milli: int = 0,
        gang_nodes: tuple[str, ...] = (),
        workdir: Path | None = None,
    ) -> LaunchRequest:
        shared = self.engine.shared_dir
        return LaunchRequest(
            workload_id=self.workload,
            attempt=0,
            task_index=index,
            node=node,
            command=list(command),
            workdir=str(workdir or shared),
            env=dict(env or {}),
            devices=devices,
            gpu_milli=gpu_milli,
            log_path=str(shared / "logs" / self.workload / f"task-{index}.log"),
            gang_nodes=gang_nodes,
            gang_gpus=tuple(1 for _ in gang_nodes),
        )

    def launch(self, req: LaunchRequest) -> Handle:
        handle = self.backend.launch(req)
        self.handles.append(handle)
        return handle

    def python(self, code: str, **kwargs: object) -> Handle:
        return self.launch(self.request([PY, "-c", code], **kwargs))  # type: ignore[arg-type]

    def release_all(self) -> None:
        for handle in self.handles:
            self.backend.release(handle)


@pytest.fixture
def tasks(ray_engine: Engine) -> Iterator[Launcher]:  # noqa: F811
    launcher = Launcher(ray_engine, ray_engine.shared_dir / f"cp-{uuid.uuid4().hex[:8]}")
    yield launcher
    launcher.release_all()


# -- inventory ---------------------------------------------------------------------------------


def test_inventory_lists_the_named_nodes_with_their_gpus(tasks: Launcher) -> None:
    nodes = {n.name: n for n in tasks.backend.inventory()}
    assert {"head", "w1", "w2"} <= set(nodes)
    head, w1 = nodes["head"], nodes["w1"]
    assert head.gpus == () and head.cpu_milli == 1000
    assert [g.index for g in w1.gpus] == [0, 1, 2, 3]
    assert {(g.model, g.memory_mib) for g in w1.gpus} == {("H100", 81920)}
    assert w1.virtual_gpus and w1.cpu_milli == 2000 and w1.memory_mib > 0
    assert w1.pool == "ray" and w1.address == "127.0.0.1"
    assert w1.labels["aifab.io/node"] == "w1" and w1.labels["aifab.io/backend"] == "ray"
    caps = tasks.backend.capabilities
    assert caps.gangs_across_nodes and caps.fractional_gpus and caps.preemption and caps.log_streaming
    # Connecting made this process a Ray driver; it must not have taken over its SIGTERM.
    assert getattr(signal.getsignal(signal.SIGTERM), "__module__", None) != "ray._private.worker"


def test_unreachable_cluster_is_reported_at_once(tasks: Launcher) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    code = (
        "from aifab.backends.base import EngineUnavailable\n"
        "from aifab.backends.ray import RayBackend\n"
        "try:\n"
        f"    RayBackend('r', 'r', '127.0.0.1:{closed}', call_timeout=2).inventory()\n"
        "except EngineUnavailable as exc:\n"
        "    print('unavailable:', exc)\n"
    )
    done = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.startswith("unavailable:"), done.stdout + done.stderr
    # A process drives one Ray cluster: this one is connected to the test cluster already.
    with pytest.raises(BackendError, match="already connected"):
        RayBackend("r", "r", f"127.0.0.1:{closed}").inventory()


# -- exit codes, logs, placement, environment --------------------------------------------------


@pytest.mark.parametrize("code", [0, 3])
def test_exit_code_and_log(tasks: Launcher, code: int) -> None:
    script = f"import sys; print('to-out', flush=True); print('to-err', file=sys.stderr, flush=True); sys.exit({code})"
    handle = tasks.python(script)
    json.dumps(handle)  # the control plane stores it as JSON
    status = wait_for_end(tasks.backend, handle)
    assert (status.state, status.exit_code, status.signal) == (TaskState.EXITED, code, None)
    assert status.finished_at is not None and status.finished_at <= time.time()
    data, end = tasks.backend.read_log(handle)
    assert b"to-out\n" in data and b"to-err\n" in data and end == len(data)
    assert tasks.backend.read_log(handle, offset=2, limit=3) == (data[2:5], 5)


def where(backend: RayBackend, handle: Handle) -> tuple[int, list[str]]:
    """(the raylet the task descends from, the GPU ids it sees), from what WHERE printed."""
    seen = json.loads(log_text(backend, handle).splitlines()[0])
    return int(seen["RAY_RAYLET_PID"]), [d for d in seen["CUDA_VISIBLE_DEVICES"].split(",") if d]


@pytest.mark.parametrize("node", ["head", "w2"])
def test_task_runs_on_the_requested_node(tasks: Launcher, ray_loopback: LoopbackRay, node: str) -> None:  # noqa: F811
    devices = () if node == "head" else (0, 1)
    handle = tasks.python(WHERE, node=node, devices=devices, gpu_milli=1000 if devices else 0)
    assert wait_for_end(tasks.backend, handle).exit_code == 0
    raylet, visible = where(tasks.backend, handle)
    assert raylet == ray_loopback.raylet_pid(node)
    assert len(visible) == len(devices)
    reported = tasks.backend.status(handle).devices  # Ray's ids, when they are not aifab's
    assert [str(d) for d in (reported or devices)] == visible


def test_environment_contract_reaches_the_task(tasks: Launcher, ray_loopback: LoopbackRay) -> None:  # noqa: F811
    world: dict[str, str | int] = {
        "master_addr": "127.0.0.1",
        "master_port": 29500,
        "world_size": 4,
        "rank": 3,
        "local_rank": 1,
        "local_world_size": 2,
    }
    env = task_env(tasks.workload, 0, "/ckpt/x", [2], 500, 8000, world) | {"USER_VAR": "x"}
    keys = [*env, "RAY_RAYLET_PID"]
    code = f"import json, os; print(json.dumps({{k: os.environ.get(k) for k in {keys!r}}}), flush=True)"
    handle = tasks.python(code, node="w2", env=env, devices=(2,), gpu_milli=500)
    status = wait_for_end(tasks.backend, handle)
    assert status.exit_code == 0
    seen = json.loads(log_text(tasks.backend, handle))
    ray_ids = seen["CUDA_VISIBLE_DEVICES"].split(",")  # Ray's pick, not aifab's
    assert len(ray_ids) == 1  # a half GPU is one device id, shared
    assert status.devices == (None if ray_ids == ["2"] else tuple(int(d) for d in ray_ids))
    unchanged = {k: v for k, v in env.items() if k != "CUDA_VISIBLE_DEVICES"}
    assert {k: seen[k] for k in unchanged} == unchanged
    assert seen["AIFAB_GPU_FRACTION"] == "0.5" and seen["RANK"] == "3" and seen["USER_VAR"] == "x"
    assert int(seen["RAY_RAYLET_PID"]) == ray_loopback.raylet_pid("w2")


def test_log_streams_while_the_task_runs(tasks: Launcher) -> None:
    code = "import time\nfor i in range(600):\n    print(f'line {i}', flush=True)\n    time.sleep(0.1)"
    handle = tasks.python(code)
    wait_until(lambda: "line 3" in log_text(tasks.backend, handle))
    assert tasks.backend.status(handle).state == TaskState.RUNNING
    first, end = tasks.backend.read_log(handle, limit=7)
    assert (first, end) == (b"line 0\n", 7)
    tasks.backend.stop(handle, grace_seconds=0)
    status = wait_for_end(tasks.backend, handle)
    assert (status.exit_code, status.signal) == (None, signal.SIGKILL)


# -- stopping ------------------------------------------------------------------------------------


def test_stop_lets_the_task_save_within_its_grace(tasks: Launcher) -> None:
    handle = tasks.python(SAVES_ON_SIGTERM)
    wait_until(lambda: "ready" in log_text(tasks.backend, handle))
    tasks.backend.stop(handle, grace_seconds=20)
    status = wait_for_end(tasks.backend, handle)
    assert (status.state, status.exit_code, status.signal) == (TaskState.EXITED, 0, None)
    assert log_text(tasks.backend, handle).count("saving") == 1


def test_task_ignoring_sigterm_is_killed_after_grace_without_the_control_plane(
    tasks: Launcher,
    ray_engine: Engine,  # noqa: F811
) -> None:
    handle = tasks.python(IGNORES_SIGTERM)
    wait_until(lambda: "ready" in log_text(tasks.backend, handle))
    stopped_at = time.time()
    tasks.backend.stop(handle, grace_seconds=2)
    restarted = ray_engine.make_backend(
        tasks.home
    )  # the stopping control plane is gone; nobody calls kill_overdue
    assert restarted.status(handle).state == TaskState.RUNNING  # the grace is not over
    status = wait_for_end(restarted, handle)  # type: ignore[arg-type]
    assert (status.state, status.exit_code, status.signal) == (TaskState.EXITED, None, signal.SIGKILL)
    assert status.finished_at is not None and status.finished_at >= stopped_at + 2


def test_kill_overdue_kills_a_runner_still_there_past_a_deadline(tasks: Launcher) -> None:
    handle = tasks.python(IGNORES_SIGTERM)
    wait_until(lambda: "ready" in log_text(tasks.backend, handle))
    tasks.backend.kill_overdue()  # nothing is overdue
    assert tasks.backend.status(handle).state == TaskState.RUNNING
    # Stands in for a stop that the runner never acted on: only the deadline is known.
    tasks.backend._note_deadline(TaskRef.of(handle, tasks.backend.namespace), time.time() - 60)
    tasks.backend.kill_overdue()
    status = wait_for_end(tasks.backend, handle)
    assert (status.state, status.exit_code, status.signal) == (TaskState.EXITED, None, signal.SIGKILL)


# -- adoption and idempotence ----------------------------------------------------------------------


def test_restarted_control_plane_adopts_running_and_ended_tasks(
    tasks: Launcher,
    ray_loopback: LoopbackRay,  # noqa: F811
) -> None:
    running = tasks.request([PY, "-c", "import time; print('hello', flush=True); time.sleep(60)"])
    ending = tasks.request([PY, "-c", "import time; time.sleep(1); raise SystemExit(5)"], index=1)
    reqs = json.dumps([dataclasses.asdict(running), dataclasses.asdict(ending)])
    control_plane = subprocess.Popen(
        [PY, "-c", CONTROL_PLANE, ray_loopback.address, tasks.backend.namespace, reqs], stdout=subprocess.PIPE
    )
    watchdog = threading.Timer(120, control_plane.kill)
    watchdog.start()
    try:
        assert control_plane.stdout is not None
        line = control_plane.stdout.readline()
    finally:
        control_plane.kill()  # kill -9: no cleanup of any kind
        control_plane.wait()
        watchdog.cancel()
    handles = json.loads(line)
    tasks.handles.extend(handles)
    adopted = tasks.backend  # another process, another Ray driver: a restarted control plane

    assert adopted.status(handles[0]).state == TaskState.RUNNING
    wait_until(lambda: log_text(adopted, handles[0]) == "hello\n")
    status = wait_for_end(adopted, handles[1])
    assert (status.state, status.exit_code) == (TaskState.EXITED, 5)
    # Launching again finds the tasks, running or ended: nothing runs twice.
    assert [adopted.launch(running), adopted.launch(ending)] == handles
    assert log_text(adopted, handles[0]) == "hello\n"
    with pytest.raises(BackendError, match="another command"):
        adopted.launch(tasks.request([PY, "-c", "pass"]))
    adopted.stop(handles[0], grace_seconds=0)
    assert wait_for_end(adopted, handles[0]).signal == signal.SIGKILL


def test_runner_killed_outside_aifab_is_reported_killed_with_its_task(tasks: Launcher) -> None:
    handle = tasks.python("import os, time; print(os.getpid(), flush=True); time.sleep(60)")
    wait_until(lambda: log_text(tasks.backend, handle).strip().isdigit())
    pid = int(log_text(tasks.backend, handle))
    worker = psutil.Process(pid).ppid()  # the Ray worker that runs the task's runner
    assert "ray::" in " ".join(psutil.Process(worker).cmdline())
    os.kill(worker, signal.SIGKILL)  # an OOM kill
    status = wait_for_end(tasks.backend, handle)
    assert (status.state, status.exit_code, status.signal) == (TaskState.EXITED, None, signal.SIGKILL)
    wait_until(lambda: gone(pid))  # the task died with its runner


def test_launch_errors(tasks: Launcher, tmp_path: Path) -> None:
    with pytest.raises(BackendError, match="no alive Ray node named 'nowhere'"):
        tasks.launch(tasks.request([PY, "-c", "pass"], node="nowhere"))
    # Found on the node, after launch returned: the shell's exit codes, the reason in the log.
    missing = tasks.launch(tasks.request(["no-such-program-xyz"], index=1))
    nowhere = tasks.launch(tasks.request([PY, "-c", "pass"], index=2, workdir=tmp_path / "missing"))
    for handle, code, why in (
        (missing, 127, "command not found"),
        (nowhere, 126, "working directory not found"),
    ):
        status = wait_for_end(tasks.backend, handle)
        assert (status.state, status.exit_code, status.signal) == (TaskState.EXITED, code, None)
        assert why in log_text(tasks.backend, handle)
    with pytest.raises(BackendError, match="cannot name"):
        tasks.backend.launch(LaunchRequest("../x", 0, 0, "w1", [PY], str(tmp_path), {}))
    with pytest.raises(BackendError, match="not a Ray-backend handle"):
        tasks.backend.status({"log_path": "/tmp/x"})


def test_release_kills_a_task_still_running(tasks: Launcher) -> None:
    handle = tasks.python("import os, time; print(os.getpid(), flush=True); time.sleep(60)")
    wait_until(lambda: log_text(tasks.backend, handle).strip().isdigit())
    pid = int(log_text(tasks.backend, handle))
    tasks.backend.release(handle)  # its records are dropped: its runner kills the command
    wait_until(lambda: gone(pid), timeout=10)


# -- per-task costs ----------------------------------------------------------------------------------


def test_tasks_reuse_the_workers_of_their_node(tasks: Launcher) -> None:
    """No process starts per task: one after another, tasks run on a few pooled Ray workers."""
    workers = set()
    for i in range(12):
        handle = tasks.python("import os; print(os.getppid(), flush=True)", index=i)
        assert wait_for_end(tasks.backend, handle).exit_code == 0
        workers.add(int(log_text(tasks.backend, handle)))
    assert len(workers) <= 4, workers


def test_status_of_many_tasks_is_one_round_trip(tasks: Launcher, monkeypatch: pytest.MonkeyPatch) -> None:
    handles = [tasks.python("import time; time.sleep(30)", index=i) for i in range(6)]
    records = tasks.backend._records
    reads: list[int] = []
    real = records.get_many

    def counted(keys: list[str]) -> dict[str, dict[str, object]]:
        reads.append(len(keys))
        return real(keys)

    monkeypatch.setattr(records, "get_many", counted)
    assert all(tasks.backend.status(h).state == TaskState.RUNNING for h in handles)
    assert len(reads) == 1 and reads[0] >= 2 * len(handles)  # start and exit of every task
    time.sleep(0.3)  # the next burst reads them again
    assert all(tasks.backend.status(h).state == TaskState.RUNNING for h in handles)
    assert len(reads) == 2


def test_a_hand_over_lost_on_its_way_is_made_again(tasks: Launcher, monkeypatch: pytest.MonkeyPatch) -> None:
    """launch does not wait for the agent's answer: a control plane that dies before its
    submission left must not leave the task waiting for ever."""
    agents = tasks.backend._agents
    sent: list[str] = []
    real = agents.submit

    def lose_the_first(spec: dict[str, object]) -> None:
        sent.append(str(spec["key"]))
        if len(sent) > 1:
            real(spec)

    monkeypatch.setattr(agents, "submit", lose_the_first)
    handle = tasks.python("print('ran', flush=True)")
    status = wait_for_end(tasks.backend, handle)
    assert (status.state, status.exit_code) == (TaskState.EXITED, 0) and len(sent) >= 2
    assert log_text(tasks.backend, handle) == "ran\n"


def test_task_queued_in_ray_is_stopped_or_given_up_and_never_runs(
    tasks: Launcher,
    ray_loopback: LoopbackRay,  # noqa: F811
) -> None:
    """A task Ray cannot start yet (its node's GPUs held) is RUNNING for aifab, a stop ends it
    at once, and one still waiting after start_timeout ends with code 127; neither runs later."""
    gpus = (0, 1, 2, 3)
    holder = tasks.python(
        "import time; print('holds', flush=True); time.sleep(60)", node="w2", devices=gpus, gpu_milli=1000
    )
    wait_until(lambda: "holds" in log_text(tasks.backend, holder))
    stopped = tasks.python("print('ran', flush=True)", node="w2", index=1, devices=(0,), gpu_milli=1000)
    impatient = RayBackend("ray", "ray", ray_loopback.address, tasks.backend.namespace, start_timeout=3)
    given_up = impatient.launch(tasks.request([PY, "-c", "print('ran')"], node="w2", index=2, devices=(0,)))
    tasks.handles.append(given_up)
    time.sleep(1)
    assert tasks.backend.status(stopped).state == TaskState.RUNNING  # queued in Ray
    tasks.backend.stop(stopped, grace_seconds=30)
    status = tasks.backend.status(stopped)
    assert (status.state, status.exit_code, status.signal) == (TaskState.EXITED, None, signal.SIGTERM)
    status = wait_for_end(impatient, given_up, timeout=20)
    assert (status.state, status.exit_code) == (TaskState.EXITED, 127)
    assert "did not start it" in log_text(impatient, given_up)
    tasks.backend.stop(holder, grace_seconds=0)
    wait_for_end(tasks.backend, holder)
    time.sleep(2)  # the GPUs are free: neither may start now
    assert "ran" not in log_text(tasks.backend, stopped) + log_text(tasks.backend, given_up)


# -- gangs -------------------------------------------------------------------------------------------


def test_gang_is_reserved_whole_and_placed_on_its_nodes(tasks: Launcher, ray_loopback: LoopbackRay) -> None:  # noqa: F811
    gang = ("w2", "w1")
    code = WHERE + "; import time; time.sleep(2)"
    handles = [
        tasks.python(code, node=n, index=i, devices=(0,), gpu_milli=1000, gang_nodes=gang)
        for i, n in enumerate(gang)
    ]
    group = ray.util.get_placement_group(f"aifab:{tasks.workload}:0")
    table = ray.util.placement_group_table(group)
    assert table["state"] == "CREATED" and table["strategy"] == "STRICT_SPREAD"
    for handle, node in zip(handles, gang, strict=True):
        assert wait_for_end(tasks.backend, handle).exit_code == 0
        assert where(tasks.backend, handle)[0] == ray_loopback.raylet_pid(node)
    wait_until(lambda: ray.util.placement_group_table(group)["state"] == "REMOVED", timeout=15)


def test_gang_that_cannot_be_reserved_fails_its_launch_and_leaves_nothing(
    tasks: Launcher,
    ray_loopback: LoopbackRay,  # noqa: F811
) -> None:
    impatient = RayBackend("ray", "ray", ray_loopback.address, tasks.backend.namespace, start_timeout=2)
    req = tasks.request([PY, "-c", "pass"], devices=(0,), gpu_milli=1000, gang_nodes=("w1", "w2"))
    req = dataclasses.replace(req, gang_gpus=(5, 1))  # w1 has 4 GPUs
    with pytest.raises(BackendError, match="could not reserve the gang"):
        impatient.launch(req)
    groups = ray.util.placement_group_table().values()
    assert {g["state"] for g in groups if g["name"] == f"aifab:{tasks.workload}:0"} == {"REMOVED"}
    with pytest.raises(BackendError, match="could not reserve the gang"):
        impatient.launch(req)  # a retry starts afresh, and fails the same way


def test_ddp_gang_across_two_nodes_ends_with_identical_weights(
    tasks: Launcher,
    ray_engine: Engine,  # noqa: F811
) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("mlxtend")
    gang = ("w1", "w2")
    addresses = {n.name: n.address for n in tasks.backend.inventory()}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = ray_engine.shared_dir / tasks.workload
    handles = []
    for rank, node in enumerate(gang):
        world: dict[str, str | int] = {
            "master_addr": addresses[gang[0]],
            "master_port": port,
            "world_size": 2,
            "rank": rank,
            "local_rank": 0,
            "local_world_size": 1,
        }
        env = task_env(tasks.workload, 0, str(out / "ckpt"), [0], 1000, None, world)
        command = [PY, str(TRAIN), "--epochs", "1", "--out-dir", str(out)]
        req = tasks.request(
            command,
            node=node,
            index=rank,
            env=env,
            devices=(0,),
            gpu_milli=1000,
            gang_nodes=gang,
            workdir=TRAIN.parent,
        )
        handles.append(tasks.launch(req))
    for handle in handles:
        status = wait_for_end(tasks.backend, handle, timeout=120)
        assert status.exit_code == 0, log_text(tasks.backend, handle)
    ranks = [json.loads((out / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]
    assert ranks[0]["world_size"] == 2


def test_unreachable_engine_is_reported_then_the_task_is_found_again(
    tasks: Launcher,
    ray_engine: Engine,  # noqa: F811
) -> None:
    assert ray_engine.stop_engine is not None and ray_engine.start_engine is not None
    handle = tasks.python("import time; print('up', flush=True); time.sleep(60)")
    wait_until(lambda: "up" in log_text(tasks.backend, handle))
    ray_engine.stop_engine()
    try:
        started = time.monotonic()
        # The backend may answer once more from what it read a moment ago (its records are kept
        # for a fraction of a second); the outage must be reported right after, not waited out.
        deadline = started + 4 * tasks.backend.call_timeout
        while True:
            try:
                assert tasks.backend.status(handle).state == TaskState.RUNNING
            except EngineUnavailable:
                break
            assert time.monotonic() < deadline, "status kept answering with the engine stopped"
            time.sleep(0.05)
        with pytest.raises(EngineUnavailable):
            tasks.backend.inventory()
        assert time.monotonic() - started < 4 * tasks.backend.call_timeout  # reported, not waited out
    finally:
        ray_engine.start_engine()
    wait_until(lambda: tasks.backend.status(handle).state == TaskState.RUNNING)


# -- nodes coming and going ----------------------------------------------------------------------


def test_node_appears_then_disappears_with_its_task(tasks: Launcher, ray_engine: Engine) -> None:  # noqa: F811
    assert ray_engine.add_node is not None and ray_engine.remove_node is not None
    name = ray_engine.add_node()
    added = {n.name: n for n in tasks.backend.inventory()}
    assert name in added and len(added[name].gpus) == 4
    handle = tasks.python(
        "import os, time; print(os.getpid(), flush=True); time.sleep(60)",
        node=name,
        devices=(0,),
        gpu_milli=1000,
    )
    wait_until(lambda: log_text(tasks.backend, handle).strip().isdigit())
    pid = int(log_text(tasks.backend, handle))
    ray_engine.remove_node(name)
    wait_until(lambda: name not in {n.name for n in tasks.backend.inventory()})
    status = wait_for_end(tasks.backend, handle)
    assert status.state == TaskState.UNKNOWN  # its runner and its node are gone
    assert tasks.backend.status(handle).state == TaskState.UNKNOWN  # and it stays so
    assert gone(pid)
    assert os.path.exists(handle["log_path"])  # the log outlives the node (shared folder)
