"""The supervisor of one aifab task inside its Slurm batch job (standard library only).

The backend writes this file's source, behind a ``#!`` line naming a Python interpreter, as the
batch script of every task (``task-<i>.sbatch``), and submits it with the task's spec file as
its one argument. On the compute node it:

* records that it started, with the GPU indices Slurm gave the job (``SLURM_JOB_GPUS``), so
  ``status`` can report them without asking Slurm;
* runs the command in the process group it leads, with the job's environment (Slurm's
  ``CUDA_VISIBLE_DEVICES``, never the control plane's) under the request's variables. The
  group is shared, not the command's own, because Slurm ends a job on a failed node by killing
  the batch script's group: a command in a session of its own would outlive its job;
* relays SIGTERM/SIGINT to the rest of the group (``scancel --batch`` signals this process
  alone, so the command sees each signal once) and turns SIGUSR2 into SIGKILL for it: Slurm
  itself treats ``scancel --signal=KILL`` as a cancel (SIGTERM, then SIGKILL after KillWait);
* writes how the command ended (exit code or signal) to the exit file: Slurm forgets the job
  MinJobAge seconds after it ends, and without slurmdbd ``sacct`` cannot tell it later; then
  appends a byte to the backend's ends journal, so the control plane looks at once;
* then keeps the job (and its allocation) until the control plane acknowledges the end, at
  most ``hold_s`` seconds, unless it was told to stop. Slurm starts a queued batch job at its
  once-a-second scheduling pass, or at once when an ending job's node reports it done: only a
  job already queued then starts at once. The control plane acknowledges after it has queued
  what takes this room, so that job can start the moment this one is gone.

It exits with the command's code (128 + N after signal N), so Slurm's own record agrees.
Nothing here may import aifab: the compute node needs only a Python 3 and the shared folder.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

EXIT_CANNOT_RUN = 126  # the shell's codes, so users read them as they would from a shell
EXIT_NOT_FOUND = 127
SIGNAL_EXIT_BASE = 128
RELAYED = (signal.SIGTERM, signal.SIGINT)
KILL_NOW = signal.SIGUSR2
ACK_POLL_S = 0.003  # how often a finished supervisor looks for the control plane's acknowledgement
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def write_json_atomic(path: Path, data: dict[str, Any], *, replace: bool = True) -> None:
    """Readers see no file or the whole of it, never a torn write. With ``replace=False`` an
    existing file wins: the first recorded answer is the one every reader keeps."""
    # Unique across hosts: a node and the control plane may write the same record at once.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    if replace:
        os.replace(tmp, path)
        return
    try:
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        os.unlink(tmp)


def job_gpus(environ: dict[str, str]) -> list[int]:
    """The node-level GPU indices of the job (``SLURM_JOB_GPUS="0,2"``); empty when it has none."""
    raw = environ.get("SLURM_JOB_GPUS", "")
    return [int(part) for part in raw.split(",") if part.strip().isdigit()]


def task_environment(spec_env: dict[str, str], job_env: dict[str, str]) -> dict[str, str]:
    """The request's variables over the job's, except the GPU list: that is Slurm's choice
    (empty when the job has no GPU, so a task never sees the whole node)."""
    env = dict(job_env)
    env.update(spec_env)
    env["CUDA_VISIBLE_DEVICES"] = job_env.get("CUDA_VISIBLE_DEVICES", "")
    return env


def group_members(pgid: int, exclude: int) -> list[int]:
    """The pids in process group ``pgid`` but ``exclude`` (zombies included), from /proc."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == exclude:
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # the name may hold spaces or ")"
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and int(fields[2]) == pgid:
            members.append(int(entry))
    return members


def signal_group_but_me(signum: int) -> bool:
    """Send ``signum`` to every other process of our group; True if there was one."""
    me, group = os.getpid(), os.getpgrp()
    members = group_members(group, exclude=me)
    for pid in members:
        with contextlib.suppress(OSError):
            os.kill(pid, signum)
    return bool(members)


def die_with_parent_hook() -> Any:
    """A preexec hook that makes the command die when the supervisor is SIGKILLed alone (by
    the OOM killer): nobody would be left to record its end. None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)  # loaded before fork: no dlopen in the child
    except OSError:
        return None
    parent = os.getpid()

    def die_with_parent() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the supervisor died before prctl took effect
            os.kill(os.getpid(), signal.SIGKILL)

    return die_with_parent


class Supervisor:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.command = [str(a) for a in spec["command"]]
        self.workdir = str(spec["workdir"])
        self.env = {str(k): str(v) for k, v in spec["env"].items()}
        self.start_path = Path(spec["start_path"])
        self.exit_path = Path(spec["exit_path"])
        self.ends_path = spec.get("ends_path")  # aifab.backends.ends: the end, as a hint
        self.ack_path = spec.get("ack_path")  # written by the control plane once it has the end
        self.hold_s = float(spec.get("hold_s") or 0.0)
        self.signalled = False  # told to stop: the end is not waited over
        self.job_id = os.environ.get("SLURM_JOB_ID", "")
        self.child: subprocess.Popen[bytes] | None = None
        self.early_signals: list[int] = []

    def on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.signalled = True
        if self.child is None:
            self.early_signals.append(signum)
        elif signum == KILL_NOW:
            signal_group_but_me(signal.SIGKILL)
        else:
            self.relay(signum)

    @staticmethod
    def relay(signum: int) -> None:
        """Send ``signum`` to the whole group (the command's own children too), not to us."""
        handler = signal.signal(signum, signal.SIG_IGN)  # an ignored signal is discarded
        try:
            with contextlib.suppress(OSError):  # an error here must not end the wait unrecorded
                os.killpg(os.getpgrp(), signum)
        finally:
            signal.signal(signum, handler)

    def run(self) -> int:
        for signum in (*RELAYED, KILL_NOW):
            signal.signal(signum, self.on_signal)
        if os.getpgrp() != os.getpid():
            os.setpgid(0, 0)  # slurmstepd makes the batch script a group leader; be one anyway
        self.record_start()
        if self.early_signals:  # stopped before it started: do not start it
            return self.finish(-self.kill_signal(self.early_signals[0]))
        try:
            self.child = subprocess.Popen(
                self.command,
                cwd=self.workdir,
                env=task_environment(self.env, dict(os.environ)),
                stdin=subprocess.DEVNULL,
                preexec_fn=die_with_parent_hook(),
                close_fds=True,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            return self.finish(self.cannot_run(exc))
        for early in self.early_signals:  # arrived while the child was being created
            self.on_signal(early, None)
        return self.finish(self.child.wait())  # handlers run during the wait; it resumes

    @staticmethod
    def kill_signal(signum: int) -> int:
        return int(signal.SIGKILL) if signum == KILL_NOW else signum

    def record_start(self) -> None:
        write_json_atomic(
            self.start_path,
            {
                "job_id": self.job_id,
                "node": os.environ.get("SLURMD_NODENAME", ""),
                "devices": job_gpus(dict(os.environ)),
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
                "started_at": time.time(),
                "pid": os.getpid(),
            },
        )

    def cannot_run(self, exc: BaseException) -> int:
        if not Path(self.workdir).is_dir():
            code, reason = EXIT_CANNOT_RUN, f"working directory not found: {self.workdir}"
        elif isinstance(exc, FileNotFoundError):
            code, reason = EXIT_NOT_FOUND, "command not found"
        else:
            code, reason = EXIT_CANNOT_RUN, str(exc)
        sys.stderr.write(f"aifab: cannot run {self.command[0]!r}: {reason}\n")
        sys.stderr.flush()
        return code

    def finish(self, returncode: int) -> int:
        # What the command left in the group (dataloader workers, helpers) must not hold the
        # job's GPUs once its end is recorded; a straggler may fork while we sweep.
        for _ in range(3):
            if not signal_group_but_me(signal.SIGKILL):
                break
        # Not over an end the backend recorded first (Slurm reported the job gone, e.g. its
        # node failed, while this process still ran): answers must not change.
        write_json_atomic(
            self.exit_path,
            {
                "job_id": self.job_id,
                "exit_code": returncode if returncode >= 0 else None,
                "signal": -returncode if returncode < 0 else None,
                "finished_at": time.time(),
            },
            replace=False,
        )
        if self.ends_path:  # one byte, O_APPEND (the same as aifab.backends.ends.note_end)
            with contextlib.suppress(OSError), open(self.ends_path, "ab") as journal:
                journal.write(b".")
        self.await_ack()
        return returncode if returncode >= 0 else SIGNAL_EXIT_BASE - returncode

    def await_ack(self) -> None:
        """Hold the job until the control plane's acknowledgement (see the module docstring),
        at most ``hold_s``; not when told to stop, and not at all without a control plane."""
        if not self.ack_path or self.hold_s <= 0:
            return
        deadline = time.monotonic() + self.hold_s
        while not self.signalled and time.monotonic() < deadline and not os.path.exists(self.ack_path):
            time.sleep(ACK_POLL_S)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        sys.stderr.write("usage: <batch script> SPEC_JSON\n")
        return 2
    return Supervisor(json.loads(Path(argv[1]).read_text())).run()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
