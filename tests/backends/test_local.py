"""The local backend with real processes: exit codes, logs, the environment contract, stopping
with a grace period, and surviving a control-plane restart."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import psutil
import pytest

from aifab.backends.base import Backend, BackendError, Handle, LaunchRequest, TaskState, TaskStatus
from aifab.backends.local import LocalBackend, detect_inventory, task_env

NODE = "n1"
PY = sys.executable
# A child that says it is ready once its SIGTERM handling is in place, then waits.
SAVES_ON_SIGTERM = """
import signal, sys, time
def on_term(*_):
    print("saving", flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
print("ready", flush=True)
time.sleep(30)
"""
IGNORES_SIGTERM = """
import signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("ready", flush=True)
time.sleep(30)
"""
SLEEPS = "import time; time.sleep(30)"


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def wait_for_end(backend: Backend, handle: Handle, timeout: float = 5.0) -> TaskStatus:
    wait_until(lambda: backend.status(handle).state != TaskState.RUNNING, timeout)
    return backend.status(handle)


def request(
    workdir: Path, code: str, *, index: int = 0, env: Mapping[str, str] | None = None, attempt: int = 0
) -> LaunchRequest:
    return LaunchRequest(
        workload_id="wl-1",
        attempt=attempt,
        task_index=index,
        node=NODE,
        command=[PY, "-c", code],
        workdir=str(workdir),
        env=dict(env or {}),
    )


def log_text(backend: Backend, handle: Handle) -> str:
    return backend.read_log(handle)[0].decode()


def gone(pid: int) -> bool:
    """Dead, or a zombie (this machine's init may be slow to reap re-parented processes)."""
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def kill_leftovers(root: Path, backend: LocalBackend) -> None:
    """SIGKILL the process group of every task launched under ``root`` that is still ours."""
    handles = [json.loads(p.read_text()) for p in root.glob("runs/*/*/task-*.handle.json")]
    for handle in handles:
        try:
            ours = abs(psutil.Process(handle["pgid"]).create_time() - handle["create_time"]) < 1
        except psutil.NoSuchProcess:
            ours = True  # the leader is gone; members left in its group are ours
        if ours:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(handle["pgid"], signal.SIGKILL)
    for handle in handles:  # reaps the wrappers this test process started
        wait_for_end(backend, handle)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "aifab"


@pytest.fixture
def backend(root: Path) -> Iterator[LocalBackend]:
    b = LocalBackend(root, detect_inventory(NODE, gpus=2))
    yield b
    kill_leftovers(root, b)


# -- exit codes and logs -----------------------------------------------------------------------


@pytest.mark.parametrize("code", [0, 3])
def test_exit_code_is_recorded(backend: LocalBackend, tmp_path: Path, code: int) -> None:
    handle = backend.launch(request(tmp_path, f"raise SystemExit({code})"))
    json.dumps(handle)  # the control plane stores it as JSON
    status = wait_for_end(backend, handle)
    assert status.state == TaskState.EXITED
    assert (status.exit_code, status.signal) == (code, None)
    assert status.finished_at is not None and status.finished_at <= time.time()


def test_handle_names_the_process_and_its_files(backend: LocalBackend, tmp_path: Path) -> None:
    handle = backend.launch(request(tmp_path, "pass"))
    assert handle["pgid"] == handle["pid"] == os.getpgid(handle["pid"])
    assert handle["create_time"] == psutil.Process(handle["pid"]).create_time()
    assert handle["log_path"].endswith("logs/wl-1/0/task-0.log")
    assert handle["exit_path"].endswith("runs/wl-1/0/task-0.exit")
    wait_for_end(backend, handle)


def test_log_captures_stdout_and_stderr_with_offsets(backend: LocalBackend, tmp_path: Path) -> None:
    code = "import sys; print('to-out', flush=True); print('to-err', file=sys.stderr, flush=True)"
    handle = backend.launch(request(tmp_path, code))
    wait_for_end(backend, handle)
    data, end = backend.read_log(handle)
    assert b"to-out\n" in data and b"to-err\n" in data
    assert end == len(data)
    assert backend.read_log(handle, offset=2, limit=3) == (data[2:5], 5)
    assert backend.read_log(handle, offset=end) == (b"", end)


def test_log_path_of_the_request_is_used(backend: LocalBackend, tmp_path: Path) -> None:
    log = tmp_path / "elsewhere" / "my.log"
    req = request(tmp_path, "print('hello')")
    req = LaunchRequest(**{**{f: getattr(req, f) for f in req.__slots__}, "log_path": str(log)})
    handle = backend.launch(req)
    wait_for_end(backend, handle)
    assert log.read_text() == "hello\n"


# -- environment ---------------------------------------------------------------------------------


def test_environment_contract_reaches_the_child(backend: LocalBackend, tmp_path: Path) -> None:
    world: dict[str, str | int] = {
        "master_addr": "10.0.0.1",
        "master_port": 29500,
        "world_size": 4,
        "rank": 3,
        "local_rank": 1,
        "local_world_size": 2,
    }
    env = task_env("wl-1", 2, "/ckpt/wl-1", [1], 500, 8000, world) | {"USER_VAR": "x"}
    keys = [*env, "PATH"]
    code = f"import json, os; print(json.dumps({{k: os.environ.get(k) for k in {keys!r}}}))"
    handle = backend.launch(request(tmp_path, code, env=env))
    wait_for_end(backend, handle)
    seen = json.loads(log_text(backend, handle))
    assert seen == env | {"PATH": os.environ["PATH"]}  # the request over the inherited env
    assert seen["CUDA_VISIBLE_DEVICES"] == "1"
    assert seen["AIFAB_GPU_FRACTION"] == "0.5"
    assert (seen["RANK"], seen["WORLD_SIZE"], seen["MASTER_PORT"]) == ("3", "4", "29500")


def test_task_without_devices_sees_no_gpu(
    backend: LocalBackend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")  # the control plane's own view
    code = "import os; print(repr(os.environ['CUDA_VISIBLE_DEVICES']))"
    handle = backend.launch(request(tmp_path, code))
    wait_for_end(backend, handle)
    assert log_text(backend, handle) == "''\n"


def test_task_env_contract() -> None:
    env = task_env("wl", 0, "/ck", [0, 2], 2000, None, None)
    assert env == {
        "AIFAB_JOB_ID": "wl",
        "AIFAB_ATTEMPT": "0",
        "AIFAB_CHECKPOINT_DIR": "/ck",
        "CUDA_VISIBLE_DEVICES": "0,2",
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
    }
    assert task_env("wl", 0, "/ck", [], 0, None, None)["CUDA_VISIBLE_DEVICES"] == ""
    assert task_env("wl", 0, "/ck", [0], 250, 4096, None)["AIFAB_GPU_FRACTION"] == "0.25"
    with pytest.raises(BackendError, match="rank"):
        task_env("wl", 0, "/ck", [0], 1000, None, {"master_addr": "h", "master_port": 1})


# -- stopping ------------------------------------------------------------------------------------


def test_stop_lets_the_task_save_within_its_grace(backend: LocalBackend, tmp_path: Path) -> None:
    handle = backend.launch(request(tmp_path, SAVES_ON_SIGTERM))
    wait_until(lambda: "ready" in log_text(backend, handle))
    backend.stop(handle, grace_seconds=5)
    status = wait_for_end(backend, handle)
    assert (status.state, status.exit_code, status.signal) == (TaskState.EXITED, 0, None)
    assert log_text(backend, handle).count("saving") == 1  # SIGTERM arrived once, not relayed twice


def test_wrapper_relays_sigterm_sent_to_it_alone(backend: LocalBackend, tmp_path: Path) -> None:
    handle = backend.launch(request(tmp_path, SAVES_ON_SIGTERM))
    wait_until(lambda: "ready" in log_text(backend, handle))
    os.kill(handle["pid"], signal.SIGTERM)  # an operator's `kill <pid>`, not stop()
    status = wait_for_end(backend, handle)
    assert (status.exit_code, status.signal) == (0, None)
    assert log_text(backend, handle).count("saving") == 1


def test_task_ignoring_sigterm_is_killed_after_grace(backend: LocalBackend, tmp_path: Path) -> None:
    handle = backend.launch(request(tmp_path, IGNORES_SIGTERM))
    wait_until(lambda: "ready" in log_text(backend, handle))
    stopped_at = time.time()
    backend.stop(handle, grace_seconds=0.5)
    backend.kill_overdue()
    assert backend.status(handle).state == TaskState.RUNNING  # the grace period is not over

    def overdue_killed() -> bool:
        backend.kill_overdue()
        return backend.status(handle).state != TaskState.RUNNING

    wait_until(overdue_killed)
    status = backend.status(handle)
    assert (status.state, status.exit_code, status.signal) == (TaskState.EXITED, None, signal.SIGKILL)
    assert status.finished_at is not None and status.finished_at >= stopped_at + 0.5


def test_restarted_control_plane_enforces_the_deadline(
    root: Path, backend: LocalBackend, tmp_path: Path
) -> None:
    handle = backend.launch(request(tmp_path, IGNORES_SIGTERM))
    wait_until(lambda: "ready" in log_text(backend, handle))
    backend.stop(handle, grace_seconds=0.3)
    restarted = LocalBackend(root, backend.node)  # knows nothing of the stop in memory
    time.sleep(0.35)
    restarted.kill_overdue()
    status = wait_for_end(restarted, handle)
    assert (status.exit_code, status.signal) == (None, signal.SIGKILL)


def test_stop_right_after_launch_is_not_lost(backend: LocalBackend, tmp_path: Path) -> None:
    # Most likely lands while the wrapper's interpreter is still starting up.
    handle = backend.launch(request(tmp_path, "print('started', flush=True); import time; time.sleep(30)"))
    backend.stop(handle, grace_seconds=30)
    status = wait_for_end(backend, handle)
    assert (status.state, status.exit_code, status.signal) == (TaskState.EXITED, None, signal.SIGTERM)


def test_stop_after_the_end_is_harmless(backend: LocalBackend, tmp_path: Path) -> None:
    handle = backend.launch(request(tmp_path, "raise SystemExit(4)"))
    wait_for_end(backend, handle)
    backend.stop(handle, grace_seconds=0)
    backend.kill_overdue()
    assert backend.status(handle).exit_code == 4


# -- surviving the control plane -----------------------------------------------------------------

CONTROL_PLANE = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from aifab.backends.base import LaunchRequest
    from aifab.backends.local import LocalBackend, detect_inventory

    root, workdir = Path(sys.argv[1]), sys.argv[2]
    backend = LocalBackend(root, detect_inventory("n1", gpus=0))
    def launch(index, code):
        return backend.launch(LaunchRequest("wl-1", 0, index, "n1", [sys.executable, "-c", code], workdir, {}))
    handles = [launch(0, "import time; time.sleep(30)"), launch(1, "import time; time.sleep(0.5); raise SystemExit(5)")]
    print(json.dumps(handles), flush=True)
    time.sleep(60)
    """
)


def test_restarted_control_plane_adopts_running_and_finished_tasks(
    root: Path, backend: LocalBackend, tmp_path: Path
) -> None:
    control_plane = subprocess.Popen(
        [PY, "-c", CONTROL_PLANE, str(root), str(tmp_path)], stdout=subprocess.PIPE
    )
    try:
        assert control_plane.stdout is not None
        running, finishing = json.loads(control_plane.stdout.readline())
    finally:
        control_plane.kill()  # kill -9: no cleanup of any kind
        control_plane.wait()
    died_at = time.time()

    restarted = LocalBackend(root, backend.node)
    assert restarted.status(running).state == TaskState.RUNNING
    status = wait_for_end(restarted, finishing)
    assert (status.state, status.exit_code) == (TaskState.EXITED, 5)
    assert status.finished_at is not None and status.finished_at > died_at  # nobody was watching

    # A wrapper that is not our child dies silently: the end is inferred, and recorded.
    os.kill(running["pid"], signal.SIGKILL)
    status = wait_for_end(restarted, running)
    assert (status.state, status.exit_code, status.signal) == (TaskState.EXITED, None, signal.SIGKILL)
    assert json.loads(Path(running["exit_path"]).read_text())["inferred"] is True


def test_sigkilled_wrapper_is_not_running_and_takes_its_command_along(
    root: Path, backend: LocalBackend, tmp_path: Path
) -> None:
    handle = backend.launch(
        request(tmp_path, "import os, time; print(os.getpid(), flush=True); time.sleep(30)")
    )
    wait_until(lambda: log_text(backend, handle).strip().isdigit())
    command_pid = int(log_text(backend, handle))
    os.kill(handle["pid"], signal.SIGKILL)  # the wrapper alone, as the OOM killer would
    status = wait_for_end(LocalBackend(root, backend.node), handle)
    assert (status.state, status.exit_code, status.signal) == (TaskState.EXITED, None, signal.SIGKILL)
    wait_until(lambda: gone(command_pid))


@pytest.mark.parametrize("start_offset", [-100.0, 0.0])
def test_recycled_pid_is_not_mistaken_for_the_task(
    backend: LocalBackend, tmp_path: Path, start_offset: float
) -> None:
    stranger = subprocess.Popen([PY, "-c", SLEEPS], start_new_session=True)  # holds "our" pid now
    try:
        runs = tmp_path / "aifab" / "runs" / "old" / "0"
        fake = {
            "pid": stranger.pid,
            "pgid": stranger.pid,
            "create_time": psutil.Process(stranger.pid).create_time() + start_offset,
            "spec_path": str(runs / "task-0.spec.json"),
            "exit_path": str(runs / "task-0.exit"),
            "stop_path": str(runs / "task-0.stop"),
            "log_path": str(tmp_path / "task-0.log"),
        }
        assert backend.status(fake).state != TaskState.RUNNING
        backend.stop(fake, grace_seconds=0)
        backend.kill_overdue()
        time.sleep(0.1)
        assert stranger.poll() is None  # never signal someone else's process
    finally:
        stranger.kill()
        stranger.wait()


def test_a_stepped_system_clock_does_not_make_a_live_task_look_ended(
    backend: LocalBackend, tmp_path: Path
) -> None:
    """Wall-clock creation times move when the clock is stepped (psutil adds the boot time, which
    the kernel derives from the clock): a live wrapper is known by its start in ticks since boot."""
    handle = backend.launch(request(tmp_path, SLEEPS))
    try:
        stepped = {**handle, "create_time": handle["create_time"] + 30.0}  # as after a 30 s clock step
        assert backend.status(stepped).state == TaskState.RUNNING
        assert backend.status(handle).state == TaskState.RUNNING  # and nothing was signalled
        # A different process at that pid (a recycled number) is still a stranger.
        other = {k: str(tmp_path / f"other.{k}") for k in ("spec_path", "exit_path", "stop_path")}
        stranger = {**handle, **other, "start_ticks": handle["start_ticks"] + 1}
        assert backend.status(stranger).state != TaskState.RUNNING
    finally:
        backend.stop(handle, grace_seconds=0)
        wait_for_end(backend, handle)


def test_stragglers_are_killed_when_the_command_ends(backend: LocalBackend, tmp_path: Path) -> None:
    code = f"import subprocess; print(subprocess.Popen([{PY!r}, '-c', {SLEEPS!r}]).pid, flush=True)"
    handle = backend.launch(request(tmp_path, code))
    status = wait_for_end(backend, handle)
    assert status.exit_code == 0
    wait_until(lambda: gone(int(log_text(backend, handle))))


# -- launch errors and idempotence -------------------------------------------------------------


def test_launch_is_idempotent(backend: LocalBackend, tmp_path: Path) -> None:
    req = request(tmp_path, "print('once')")
    first = backend.launch(req)
    assert backend.launch(req) == first
    wait_for_end(backend, first)
    assert backend.launch(req) == first
    assert log_text(backend, first) == "once\n"
    with pytest.raises(BackendError, match="another command"):
        backend.launch(request(tmp_path, "print('twice')"))


def test_missing_command_fails_the_launch(backend: LocalBackend, tmp_path: Path) -> None:
    req = LaunchRequest("wl-1", 0, 0, NODE, ["no-such-program-xyz"], str(tmp_path), {})
    with pytest.raises(BackendError, match="no-such-program-xyz"):
        backend.launch(req)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"node": "other"}, "placed on node"),
        ({"workload_id": "../escape"}, "cannot name a directory"),
        ({"command": []}, "empty command"),
        ({"workdir": "/no/such/dir"}, "working directory not found"),
        ({"devices": (5,)}, "no GPU"),
    ],
)
def test_invalid_requests_are_refused(
    backend: LocalBackend, tmp_path: Path, change: dict[str, object], message: str
) -> None:
    base = request(tmp_path, "pass")
    fields = {f: getattr(base, f) for f in base.__slots__} | change
    with pytest.raises(BackendError, match=message):
        backend.launch(LaunchRequest(**fields))


def test_wrapper_reports_127_for_a_command_that_vanished(tmp_path: Path) -> None:
    spec = tmp_path / "spec.json"
    exit_path = tmp_path / "task.exit"
    spec.write_text(
        json.dumps(
            {
                "command": ["vanished-program-xyz"],
                "workdir": str(tmp_path),
                "env": {"PATH": os.environ["PATH"]},
                "exit_path": str(exit_path),
                "stop_path": str(tmp_path / "task.stop"),
            }
        )
    )
    done = subprocess.run(
        [PY, "-m", "aifab.backends.local.wrapper", str(spec)], capture_output=True, text=True, timeout=10
    )
    assert done.returncode == 127
    assert "vanished-program-xyz" in done.stderr and "command not found" in done.stderr
    assert json.loads(exit_path.read_text())["exit_code"] == 127


def test_malformed_handle_is_a_backend_error(backend: LocalBackend) -> None:
    with pytest.raises(BackendError, match="pid"):
        backend.status({"log_path": "/tmp/x"})


# -- inventory -----------------------------------------------------------------------------------


def test_inventory_declares_virtual_gpus() -> None:
    node = detect_inventory("n9", gpus=4, gpu_model="H100", gpu_memory_mib=81920)
    assert [g.index for g in node.gpus] == [0, 1, 2, 3]
    assert {(g.model, g.memory_mib) for g in node.gpus} == {("H100", 81920)}
    assert node.virtual_gpus and node.name == "n9"
    assert node.labels == {"aifab.io/backend": "local"}
    assert node.cpu_milli >= 1000 and node.memory_mib > 0


def test_inventory_detection_without_gpus_does_not_fail() -> None:
    node = detect_inventory()
    assert node.name == socket.gethostname()
    assert not node.virtual_gpus
    try:
        import pynvml  # noqa: F401
    except ImportError:
        assert node.gpus == ()


class FakeNvml:
    """Stands in for nvidia-ml-py (no GPU here): the only way to exercise the NVML path."""

    class NVMLError(Exception):
        pass

    def __init__(self, names: list[str | bytes], fail_init: bool = False) -> None:
        self.names, self.fail_init, self.shut_down = names, fail_init, False

    def nvmlInit(self) -> None:
        if self.fail_init:
            raise self.NVMLError("Driver Not Loaded")

    def nvmlShutdown(self) -> None:
        self.shut_down = True

    def nvmlDeviceGetCount(self) -> int:
        return len(self.names)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetName(self, handle: int) -> str | bytes:
        return self.names[handle]

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> object:
        return type("Memory", (), {"total": 143771 * 1024 * 1024})()


def test_inventory_reads_gpus_from_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = FakeNvml(["NVIDIA H200", b"NVIDIA H200"])  # old releases return bytes
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    node = detect_inventory("n1")
    assert [(g.index, g.model, g.memory_mib) for g in node.gpus] == [
        (0, "NVIDIA H200", 143771),
        (1, "NVIDIA H200", 143771),
    ]
    assert not node.virtual_gpus and nvml.shut_down


def test_inventory_without_a_driver_has_no_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(["x"], fail_init=True))
    assert detect_inventory("n1").gpus == ()


def test_backend_reports_its_node(backend: LocalBackend) -> None:
    assert backend.name == "local"
    assert backend.inventory() == [backend.node]
    assert len(backend.node.gpus) == 2
