"""The Slurm backend against a real Slurm 22.05 cluster on this host (two nodes of four GPUs,
``scripts/slurm/cluster.sh``): inventory, exit codes, logs, the environment contract with
Slurm's own GPU choice, stopping with a grace period, adoption by a restarted control plane,
nodes coming and going, and an unreachable controller. The parsing of Slurm's output is
tested on its own first (no cluster needed)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from aifab.backends.base import (
    Backend,
    BackendError,
    EngineUnavailable,
    Handle,
    LaunchRequest,
    TaskState,
    TaskStatus,
)
from aifab.backends.slurm import jobscript
from aifab.backends.slurm import parse as slurm_parse
from tests.backends.engines import Engine
from tests.backends.slurm_cluster import GPUS_PER_NODE, NODES, POOL, cluster_of, slurm_engine  # noqa: F401

# Every test here shares one Slurm cluster with the contract suite's Slurm tests: one xdist worker.
pytestmark = pytest.mark.xdist_group("slurm")

PY = sys.executable
TRAIN = Path(__file__).resolve().parents[2] / "examples" / "mnist" / "train.py"
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
SLEEPS = "import time; print('ready', flush=True); time.sleep(60)"


def wait_until(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.1)


def wait_for_end(backend: Backend, handle: Handle, timeout: float = 20.0) -> TaskStatus:
    wait_until(lambda: backend.status(handle).state != TaskState.RUNNING, timeout)
    return backend.status(handle)


def log_text(backend: Backend, handle: Handle) -> str:
    return backend.read_log(handle)[0].decode()


def wait_ready(backend: Backend, handle: Handle) -> None:
    wait_until(lambda: "ready" in log_text(backend, handle))


class Launcher:
    """One test's control plane: a home of its own on the shared folder (the cluster serves the
    whole session), and a backend for it; whatever still runs at the end of the test is killed."""

    def __init__(self, engine: Engine, workdir: Path) -> None:
        self.engine = engine
        self.workdir = workdir
        self.home = engine.shared_dir / f"cp-{uuid.uuid4().hex[:8]}"
        self.workload = f"wl-{uuid.uuid4().hex[:8]}"
        self.backend = self.restarted()
        self.handles: list[Handle] = []

    def restarted(self) -> Backend:
        """A new backend instance over the same home: the control plane after a restart."""
        return self.engine.make_backend(self.home)

    def request(
        self,
        code: str,
        *,
        node: str = "n1",
        index: int = 0,
        devices: Sequence[int] = (),
        env: Mapping[str, str] | None = None,
        command: Sequence[str] | None = None,
    ) -> LaunchRequest:
        return LaunchRequest(
            workload_id=self.workload,
            attempt=0,
            task_index=index,
            node=node,
            command=list(command) if command is not None else [PY, "-c", code],
            workdir=str(self.workdir),
            env=dict(env or {}),
            devices=tuple(devices),
        )

    def launch(self, code: str, **kwargs: Any) -> Handle:
        handle = self.backend.launch(self.request(code, **kwargs))
        self.handles.append(handle)
        return handle

    def cleanup(self) -> None:
        backend = self.restarted()
        for handle in self.handles:
            try:
                if backend.status(handle).state == TaskState.RUNNING:
                    backend.stop(handle, grace_seconds=0)
                    wait_for_end(backend, handle)
            except BackendError:
                continue  # the controller is away (a test stopped it): the cluster's stop kills it


@pytest.fixture
def run(slurm_engine: Engine, tmp_path: Path) -> Iterator[Launcher]:  # noqa: F811
    workdir = slurm_engine.shared_dir / tmp_path.name  # every node sees the shared folder
    workdir.mkdir(exist_ok=True)
    launcher = Launcher(slurm_engine, workdir)
    yield launcher
    launcher.cleanup()


# -- parsing Slurm's output (no cluster) -----------------------------------------------------


def test_gpu_counts_of_node_gres() -> None:
    assert slurm_parse.gpu_counts("gpu:4") == [(None, 4)]
    assert slurm_parse.gpu_counts("gpu:a100:2(S:0-1),gpu:v100:1,mps:200") == [("a100", 2), ("v100", 1)]
    assert slurm_parse.gpu_counts("(null)") == [] and slurm_parse.gpu_counts("") == []


def test_gpu_indices_of_job_gres() -> None:
    assert slurm_parse.gpu_indices(["gpu:4(IDX:0-3)"]) == (0, 1, 2, 3)
    assert slurm_parse.gpu_indices(["gpu(IDX:0-1)"]) == (0, 1)
    assert slurm_parse.gpu_indices(["gpu:a100:3(IDX:0,2-3),mps:100(0/100,0/100)"]) == (0, 2, 3)
    assert slurm_parse.gpu_indices(["gpu:1(IDX:N/A)"]) == ()
    text = "JOB_GRES=gpu:2\n     Nodes=n1 CPU_IDs=0 Mem=100 GRES=gpu:2(IDX:1-2)\n"
    assert slurm_parse.gpu_indices(slurm_parse.scontrol_gres_details(text)) == (1, 2)


def test_unusable_nodes_are_left_out() -> None:
    raw = {"name": "a", "state": "idle", "state_flags": [], "partitions": ["gpu"], "gres": "gpu:h100:2"}
    info = slurm_parse.node_info(raw, pool="p", partition="gpu", gpu_memory_mib=1000)
    assert info is not None and [g.model for g in info.gpus] == ["h100", "h100"]
    for change in ({"state": "down"}, {"state_flags": ["DRAIN"]}, {"state_flags": ["NOT_RESPONDING"]}):
        assert slurm_parse.node_info(raw | change, pool="p", partition="gpu", gpu_memory_mib=1) is None
    assert slurm_parse.node_info(raw, pool="p", partition="cpu", gpu_memory_mib=1) is None


def test_end_of_a_job_the_supervisor_did_not_record() -> None:
    assert slurm_parse.end_from_job({"job_state": "FAILED", "exit_code": 3 << 8}) == (3, None)
    assert slurm_parse.end_from_job({"job_state": "FAILED", "exit_code": 9}) == (None, 9)
    assert slurm_parse.end_from_job({"job_state": "CANCELLED", "exit_code": 0}) == (None, signal.SIGTERM)
    assert slurm_parse.end_from_job({"job_state": "TIMEOUT", "exit_code": 0}) == (None, signal.SIGKILL)


# -- the supervisor holds a finished job for the control plane (no cluster) ------------------


def _supervise(
    tmp_path: Path, command: list[str], hold_s: float
) -> tuple[subprocess.Popen[bytes], Path, Path]:
    """The batch script as Slurm would run it, here on its own: (process, exit record, ack)."""
    exit_path, ack = tmp_path / "task.exit.json", tmp_path / "task.ack"
    spec = {
        "command": command,
        "workdir": str(tmp_path),
        "env": {},
        "start_path": str(tmp_path / "task.start.json"),
        "exit_path": str(exit_path),
        "ack_path": str(ack),
        "hold_s": hold_s,
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    proc = subprocess.Popen([sys.executable, jobscript.__file__, str(tmp_path / "spec.json")])
    return proc, exit_path, ack


def test_a_finished_supervisor_holds_until_its_end_is_acknowledged(tmp_path: Path) -> None:
    proc, exit_path, ack = _supervise(tmp_path, ["sh", "-c", "exit 3"], hold_s=60)
    wait_until(exit_path.exists)
    time.sleep(0.3)
    assert proc.poll() is None  # the end is on record; the job, and its room, are kept
    ack.touch()
    assert proc.wait(timeout=20) == 3
    assert json.loads(exit_path.read_text())["exit_code"] == 3


def test_a_supervisor_told_to_stop_does_not_hold(tmp_path: Path) -> None:
    proc, exit_path, _ = _supervise(tmp_path, ["true"], hold_s=60)
    wait_until(exit_path.exists)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0


def test_an_unacknowledged_hold_ends_by_itself(tmp_path: Path) -> None:
    proc, _, ack = _supervise(tmp_path, ["true"], hold_s=0.5)
    assert proc.wait(timeout=20) == 0 and not ack.exists()


# -- inventory -------------------------------------------------------------------------------


def test_inventory_lists_the_nodes_with_their_gpus(slurm_engine: Engine) -> None:  # noqa: F811
    nodes = slurm_engine.make_backend(slurm_engine.shared_dir / "cp-inventory").inventory()
    assert [n.name for n in nodes] == list(NODES)  # n3 is declared but has no slurmd
    for node in nodes:
        assert [g.index for g in node.gpus] == list(range(GPUS_PER_NODE))
        assert {g.model for g in node.gpus} == {"slurm-gpu"} and node.virtual_gpus
        assert (node.pool, node.cpu_milli, node.memory_mib, node.address) == (POOL, 4000, 4000, "127.0.0.1")
        assert node.labels["slurm.partition"] == "gpu"
        assert node.labels["slurm.feature/aifab-test"] == "true"


def test_capabilities(slurm_engine: Engine) -> None:  # noqa: F811
    caps = slurm_engine.make_backend(slurm_engine.shared_dir / "cp-capabilities").capabilities
    assert caps.gangs_across_nodes and caps.engine_assigns_devices and caps.preemption
    assert not caps.fractional_gpus


# -- exit codes and logs ---------------------------------------------------------------------


@pytest.mark.parametrize("code", [0, 3])
def test_exit_code_is_recorded(run: Launcher, code: int) -> None:
    handle = run.launch(f"raise SystemExit({code})")
    json.dumps(handle)  # the control plane stores it as JSON
    status = wait_for_end(run.backend, handle)
    assert (status.state, status.exit_code, status.signal) == (TaskState.EXITED, code, None)
    assert status.finished_at is not None and status.finished_at <= time.time()


def test_log_holds_stdout_and_stderr_with_offsets(run: Launcher) -> None:
    handle = run.launch(
        "import sys; print('to-out', flush=True); print('to-err', file=sys.stderr, flush=True)"
    )
    wait_for_end(run.backend, handle)
    data, end = run.backend.read_log(handle)
    assert b"to-out\n" in data and b"to-err\n" in data
    assert end == len(data)
    assert run.backend.read_log(handle, offset=2, limit=3) == (data[2:5], 5)
    assert run.backend.read_log(handle, offset=end) == (b"", end)


def test_log_path_of_the_request_is_used(run: Launcher) -> None:
    log = run.workdir / "elsewhere" / "my.log"
    req = run.request("print('hello')")
    fields = {f: getattr(req, f) for f in req.__slots__} | {"log_path": str(log)}
    handle = run.backend.launch(LaunchRequest(**fields))
    run.handles.append(handle)
    wait_for_end(run.backend, handle)
    assert log.read_text() == "hello\n"


def test_command_that_cannot_run_reports_127(run: Launcher) -> None:
    handle = run.launch("", command=["no-such-program-xyz"])
    assert wait_for_end(run.backend, handle).exit_code == 127
    assert "command not found" in log_text(run.backend, handle)


# -- the environment contract ----------------------------------------------------------------


def test_environment_reaches_the_task_and_slurm_picks_the_gpus(run: Launcher) -> None:
    env = {"AIFAB_JOB_ID": run.workload, "AIFAB_ATTEMPT": "0", "RANK": "0", "CUDA_VISIBLE_DEVICES": "3,2"}
    keys = [*env, "SLURM_JOB_GPUS", "SLURMD_NODENAME"]
    code = f"import json, os; print(json.dumps({{k: os.environ.get(k) for k in {keys!r}}}))"
    handle = run.launch(code, node="n2", devices=(2, 3), env=env)
    status = wait_for_end(run.backend, handle)
    seen = json.loads(log_text(run.backend, handle))
    assert {k: seen[k] for k in ("AIFAB_JOB_ID", "AIFAB_ATTEMPT", "RANK")} == {
        "AIFAB_JOB_ID": run.workload,
        "AIFAB_ATTEMPT": "0",
        "RANK": "0",
    }
    assert seen["SLURMD_NODENAME"] == "n2"
    # Slurm's choice, not aifab's ("3,2"): two of the node's four, reported back as they are.
    slurm_gpus = tuple(int(d) for d in seen["CUDA_VISIBLE_DEVICES"].split(","))
    assert len(slurm_gpus) == 2 and set(slurm_gpus) <= set(range(GPUS_PER_NODE))
    assert seen["CUDA_VISIBLE_DEVICES"] == seen["SLURM_JOB_GPUS"]
    assert status.devices == slurm_gpus


def test_running_task_reports_its_gpus(run: Launcher) -> None:
    handle = run.launch(SLEEPS, devices=(0,))
    wait_ready(run.backend, handle)
    status = run.backend.status(handle)
    assert status.state == TaskState.RUNNING
    assert status.devices is not None and len(status.devices) == 1


def test_task_without_gpus_sees_none(run: Launcher, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")  # the control plane's own view
    handle = run.launch("import os; print(repr(os.environ['CUDA_VISIBLE_DEVICES']))")
    status = wait_for_end(run.backend, handle)
    assert log_text(run.backend, handle) == "''\n"
    assert status.devices == ()


# -- stopping --------------------------------------------------------------------------------


def test_stop_lets_the_task_save_within_its_grace(run: Launcher) -> None:
    handle = run.launch(SAVES_ON_SIGTERM)
    wait_ready(run.backend, handle)
    run.backend.stop(handle, grace_seconds=10)
    status = wait_for_end(run.backend, handle)
    assert (status.state, status.exit_code, status.signal) == (TaskState.EXITED, 0, None)
    assert log_text(run.backend, handle).count("saving") == 1  # SIGTERM arrived once


def test_task_ignoring_sigterm_is_killed_after_grace(run: Launcher) -> None:
    handle = run.launch(IGNORES_SIGTERM)
    wait_ready(run.backend, handle)
    stopped_at = time.time()
    run.backend.stop(handle, grace_seconds=1)
    run.backend.kill_overdue()
    assert run.backend.status(handle).state == TaskState.RUNNING  # the grace period is not over

    def killed_when_overdue() -> bool:
        run.backend.kill_overdue()
        return run.backend.status(handle).state != TaskState.RUNNING

    wait_until(killed_when_overdue)
    status = run.backend.status(handle)
    assert (status.state, status.exit_code, status.signal) == (TaskState.EXITED, None, signal.SIGKILL)
    assert status.finished_at is not None and status.finished_at >= stopped_at + 1


def test_restarted_control_plane_enforces_the_deadline(run: Launcher) -> None:
    handle = run.launch(IGNORES_SIGTERM)
    wait_ready(run.backend, handle)
    run.backend.stop(handle, grace_seconds=0.5)
    restarted = run.restarted()  # knows nothing of the stop in memory
    time.sleep(0.6)
    restarted.kill_overdue()
    status = wait_for_end(restarted, handle)
    assert (status.exit_code, status.signal) == (None, signal.SIGKILL)


def test_stop_right_after_launch_is_not_lost(run: Launcher) -> None:
    handle = run.launch(SLEEPS)  # most likely still pending, or its supervisor starting
    run.backend.stop(handle, grace_seconds=30)
    status = wait_for_end(run.backend, handle)
    assert (status.state, status.exit_code, status.signal) == (TaskState.EXITED, None, signal.SIGTERM)


def test_stop_after_the_end_is_harmless(run: Launcher) -> None:
    handle = run.launch("raise SystemExit(4)")
    wait_for_end(run.backend, handle)
    run.backend.stop(handle, grace_seconds=0)
    run.backend.kill_overdue()
    assert run.backend.status(handle).exit_code == 4


# -- handing a node over ------------------------------------------------------------------------


def _slurm_state(run: Launcher, handle: Handle) -> str:
    return cluster_of(run.engine).slurm("squeue", "-h", "-j", str(handle["job_id"]), "-o", "%T").strip()


def test_a_finished_job_keeps_its_room_until_its_end_is_acknowledged(run: Launcher) -> None:
    run.backend.end_hold_s = 60  # type: ignore[attr-defined]  # as a served pool's (pools.py), longer
    handle = run.launch("raise SystemExit(3)")
    assert wait_for_end(run.backend, handle).exit_code == 3  # the end is known at once...
    assert _slurm_state(run, handle) == "RUNNING"  # ...while Slurm still holds the room
    run.backend.acknowledge_ends([handle])  # type: ignore[attr-defined]
    wait_until(lambda: _slurm_state(run, handle) != "RUNNING")  # well before the 60 s
    assert run.backend.status(handle).exit_code == 3


def test_a_stopped_job_does_not_wait_for_an_acknowledgement(run: Launcher) -> None:
    run.backend.end_hold_s = 60  # type: ignore[attr-defined]
    handle = run.launch(SAVES_ON_SIGTERM)
    wait_ready(run.backend, handle)
    run.backend.stop(handle, grace_seconds=10)
    assert wait_for_end(run.backend, handle).exit_code == 0
    wait_until(lambda: _slurm_state(run, handle) != "RUNNING", timeout=30)


# -- the control plane restarts ----------------------------------------------------------------


def test_new_backend_instance_adopts_running_and_finished_tasks(run: Launcher) -> None:
    running = run.launch(SLEEPS, index=0, devices=(1,))
    finishing = run.launch("print('done', flush=True); raise SystemExit(5)", index=1)
    wait_ready(run.backend, running)
    restarted = run.restarted()
    status = restarted.status(running)
    assert status.state == TaskState.RUNNING and status.devices is not None and len(status.devices) == 1
    assert "ready" in log_text(restarted, running)
    assert wait_for_end(restarted, finishing).exit_code == 5
    assert log_text(restarted, finishing) == "done\n"
    restarted.stop(running, grace_seconds=5)
    assert wait_for_end(restarted, running).signal == signal.SIGTERM


def test_launch_is_idempotent(run: Launcher) -> None:
    req = run.request("print('once')")
    first = run.backend.launch(req)
    run.handles.append(first)
    assert run.restarted().launch(req) == first
    wait_for_end(run.backend, first)
    assert log_text(run.backend, first) == "once\n"
    with pytest.raises(BackendError, match="another command"):
        run.backend.launch(run.request("print('twice')"))


def test_launch_after_a_crash_before_the_handle_was_written_finds_the_job(run: Launcher) -> None:
    req = run.request(SLEEPS)
    first = run.backend.launch(req)
    run.handles.append(first)
    Path(first["script_path"]).with_suffix(".handle.json").unlink()  # as if sbatch was the last act
    again = run.restarted().launch(req)
    assert again["job_id"] == first["job_id"]  # found in Slurm's queue, not submitted twice
    assert again["log_path"] == first["log_path"]


def test_status_of_many_tasks_reads_the_queue_once(run: Launcher, monkeypatch: pytest.MonkeyPatch) -> None:
    handles = [run.launch(SLEEPS, index=i, node=NODES[i % 2]) for i in range(4)]
    backend = cluster_of(run.engine).make_backend(run.home)
    backend.jobs.ttl_s = 30  # a slow machine must not turn one burst into two
    calls: list[float] = []
    jobs = backend.cli.jobs

    def counted_jobs() -> list[dict[str, Any]]:
        calls.append(time.time())
        return jobs()

    monkeypatch.setattr(backend.cli, "jobs", counted_jobs)
    assert all(backend.status(h).state == TaskState.RUNNING for h in handles)
    assert len(calls) == 1


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"node": "n9"}, "sbatch refused"),  # Slurm has no such node
        ({"devices": tuple(range(GPUS_PER_NODE + 1))}, "sbatch refused"),  # more GPUs than a node has
        ({"workload_id": "../escape"}, "cannot name a directory"),
        ({"command": []}, "empty command"),
    ],
)
def test_refused_launches_are_backend_errors(run: Launcher, change: dict[str, object], message: str) -> None:
    req = run.request("pass")
    fields = {f: getattr(req, f) for f in req.__slots__} | change
    with pytest.raises(BackendError, match=message):
        run.backend.launch(LaunchRequest(**fields))


# -- several nodes -----------------------------------------------------------------------------


def test_a_task_on_each_node_at_once(run: Launcher) -> None:
    # Each task waits for the other's mark: both finish only if Slurm ran them side by side.
    code = """
import os, pathlib, sys, time
here = pathlib.Path(os.environ["MARKS"])
(here / os.environ["SLURMD_NODENAME"]).touch()
deadline = time.time() + 20
while len(list(here.iterdir())) < 2:
    if time.time() > deadline:
        sys.exit(9)
    time.sleep(0.05)
"""
    marks = run.workdir / "marks"
    marks.mkdir()
    handles = [
        run.launch(code, node=node, index=i, env={"MARKS": str(marks)}) for i, node in enumerate(NODES)
    ]
    assert [wait_for_end(run.backend, h, timeout=30).exit_code for h in handles] == [0, 0]
    assert sorted(p.name for p in marks.iterdir()) == list(NODES)


def test_nodes_disappear_and_appear(run: Launcher) -> None:
    cluster = cluster_of(run.engine)
    victim = run.launch(SLEEPS, node="n2")
    wait_ready(run.backend, victim)
    cluster.remove_node("n2")
    try:
        assert [n.name for n in run.backend.inventory()] == ["n1"]
        # Lost with its node, not failed: the control plane runs it again without a failure.
        assert wait_for_end(run.backend, victim).state == TaskState.UNKNOWN
        assert run.restarted().status(victim).state == TaskState.UNKNOWN  # recorded, not guessed again
    finally:
        cluster.restart_node("n2")
    assert [n.name for n in run.backend.inventory()] == ["n1", "n2"]

    added = cluster.add_node()
    try:
        node = next(n for n in run.backend.inventory() if n.name == added)
        assert len(node.gpus) == GPUS_PER_NODE
        handle = run.launch("import os; print(os.environ['SLURMD_NODENAME'])", node=added, index=1)
        assert wait_for_end(run.backend, handle).exit_code == 0
        assert log_text(run.backend, handle) == f"{added}\n"
    finally:
        cluster.remove_node(added)
    assert added not in [n.name for n in run.backend.inventory()]


def test_unreachable_controller_then_recovery(run: Launcher) -> None:
    go = run.workdir / "go"  # the task ends only once the controller is back
    running = run.launch(
        f"""
import pathlib, sys, time
print("ready", flush=True)
deadline = time.time() + 60
while not pathlib.Path({str(go)!r}).exists() and time.time() < deadline:
    time.sleep(0.05)
sys.exit(7)
"""
    )
    finished = run.launch("raise SystemExit(6)", index=1)
    wait_ready(run.backend, running)
    assert wait_for_end(run.backend, finished).exit_code == 6
    stop_engine, start_engine = run.engine.stop_engine, run.engine.start_engine
    assert stop_engine is not None and start_engine is not None
    stop_engine()
    try:
        away = run.restarted()
        with pytest.raises(EngineUnavailable):
            away.inventory()
        with pytest.raises(EngineUnavailable):
            away.status(running)
        with pytest.raises(EngineUnavailable):
            away.launch(run.request("pass", index=2))
        assert away.status(finished).exit_code == 6  # recorded by its supervisor: no Slurm needed
        away.stop(finished, grace_seconds=0)
        away.kill_overdue()  # must not raise in the reconcile loop
    finally:
        start_engine()
    back = run.restarted()
    assert [n.name for n in back.inventory()] == list(NODES)
    assert back.status(running).state == TaskState.RUNNING  # it ran on while the controller was away
    go.touch()
    assert wait_for_end(back, running).exit_code == 7
    assert wait_for_end(back, run.launch("pass", index=3)).exit_code == 0


# -- a gang across two nodes ----------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_ddp_gang_across_two_nodes_ends_with_identical_weights(run: Launcher) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("mlxtend")
    out = run.workdir / "ranks"
    world = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2"}
    command = [PY, str(TRAIN), "--epochs", "1", "--out-dir", str(out)]
    handles = [
        run.launch(
            "",
            command=command,
            node=node,
            index=rank,
            env=world
            | {"RANK": str(rank), "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "OMP_NUM_THREADS": "1"},
        )
        for rank, node in enumerate(NODES)
    ]
    statuses = [wait_for_end(run.backend, h, timeout=120) for h in handles]
    assert [s.exit_code for s in statuses] == [0, 0], [log_text(run.backend, h)[-2000:] for h in handles]
    ranks = [json.loads((out / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]


def test_control_plane_env_does_not_steer_sbatch(run: Launcher, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SBATCH_PARTITION", "no-such-partition")  # would make sbatch fail
    monkeypatch.setenv("SLURM_JOB_ID", "12345")  # as if the control plane ran inside a job
    handle = run.launch("import os; print(os.environ['SLURM_JOB_ID'])")
    assert wait_for_end(run.backend, handle).exit_code == 0
    assert log_text(run.backend, handle).strip() == handle["job_id"]
    assert os.environ["SLURM_JOB_ID"] == "12345"
