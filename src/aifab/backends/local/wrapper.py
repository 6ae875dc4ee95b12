"""The supervisor of one local task: ``python -m aifab.backends.local.wrapper SPEC_JSON``.

The control plane may be killed at any moment, so it cannot be the one that waits for a task.
This small process does: it leads the task's own session and process group, runs the command
in it, relays SIGTERM/SIGINT, and records how the command ended in a JSON file that any later
control-plane process can read. It exits with the command's code (128 + N after signal N).

The spec file (written by the executor, mode 0600 because ``env`` may hold secrets) holds
``command``, ``workdir``, ``env``, ``exit_path`` and ``stop_path``.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from aifab.backends.ends import note_end
from aifab.backends.local.executor import exit_record, write_json_atomic
from aifab.backends.local.processes import group_members

EXIT_CANNOT_RUN = 126  # the shell's codes, so users read them as they would from a shell
EXIT_NOT_FOUND = 127
SIGNAL_EXIT_BASE = 128
_RELAYED = (signal.SIGTERM, signal.SIGINT)
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


@dataclass(frozen=True, slots=True)
class Spec:
    command: list[str]
    workdir: str
    env: dict[str, str]
    exit_path: Path
    stop_path: Path
    ends_path: str | None = None  # the backend's ends journal (specs written before it had none)

    @classmethod
    def load(cls, path: Path) -> Spec:
        raw = json.loads(path.read_text())
        return cls(
            command=[str(a) for a in raw["command"]],
            workdir=str(raw["workdir"]),
            env={str(k): str(v) for k, v in raw["env"].items()},
            exit_path=Path(raw["exit_path"]),
            stop_path=Path(raw["stop_path"]),
            ends_path=raw.get("ends_path"),
        )


def _die_with_parent_hook() -> Callable[[], None] | None:
    """A preexec hook that makes the command die when the wrapper dies (Linux only).

    Without it, a SIGKILLed wrapper would leave the command running with nobody left to
    record its end; with it, "wrapper gone without a record" reliably means "killed"."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)  # loaded before fork: no dlopen in the child
    except OSError:
        return None
    parent = os.getpid()

    def die_with_parent() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the wrapper died before prctl took effect
            os.kill(os.getpid(), signal.SIGKILL)

    return die_with_parent


class Supervisor:
    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        self.child: subprocess.Popen[bytes] | None = None
        self.signals_before_start: list[int] = []

    def on_signal(self, signum: int, _frame: FrameType | None) -> None:
        # The wrapper never dies of SIGTERM/SIGINT itself: it waits for the command to end.
        if self.child is None:
            self.signals_before_start.append(signum)
        elif not self.spec.stop_path.exists():
            self.relay(signum)
        # else: the executor's stop() wrote stop_path, then signalled the whole group, so the
        # command already has this signal; a second copy could interrupt its checkpointing.

    def relay(self, signum: int) -> None:
        """Send ``signum`` to the whole group (the command's own children too), not to us."""
        handler = signal.signal(signum, signal.SIG_IGN)  # an ignored signal is discarded
        try:
            with contextlib.suppress(OSError):  # an error here must not end the wait unrecorded
                os.killpg(os.getpgrp(), signum)
        finally:
            signal.signal(signum, handler)

    def run(self) -> int:
        for signum in _RELAYED:
            signal.signal(signum, self.on_signal)
        # The executor started us with these blocked, so one sent while Python was starting up
        # waited for the handler instead of killing us without a record; it runs now.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _RELAYED)
        if self.signals_before_start:  # stopped before it started: do not start it
            return self.finish(-self.signals_before_start[0])
        try:
            self.child = self.spawn()
        except (OSError, subprocess.SubprocessError) as exc:
            return self.finish(self.cannot_run(exc))
        for early in self.signals_before_start:  # arrived while the child was being created
            self.relay(early)
        return self.finish(self.child.wait())

    def spawn(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            self.spec.command,
            cwd=self.spec.workdir,
            env=self.spec.env,
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent_hook(),
            close_fds=True,
        )

    def cannot_run(self, exc: BaseException) -> int:
        """Say in the log why the command could not start; return the shell's exit code."""
        program = self.spec.command[0]
        if not Path(self.spec.workdir).is_dir():
            code, reason = EXIT_CANNOT_RUN, f"working directory not found: {self.spec.workdir}"
        elif isinstance(exc, FileNotFoundError):
            code, reason = EXIT_NOT_FOUND, "command not found"
        else:
            code, reason = EXIT_CANNOT_RUN, str(exc)
        sys.stderr.write(f"aifab: cannot run {program!r}: {reason}\n")
        sys.stderr.flush()
        return code

    def finish(self, returncode: int) -> int:
        _kill_stragglers()
        write_json_atomic(self.spec.exit_path, exit_record(returncode))
        note_end(self.spec.ends_path)
        return returncode if returncode >= 0 else SIGNAL_EXIT_BASE - returncode


def _kill_stragglers() -> None:
    """SIGKILL what the command left behind in the group (background helpers, dataloader
    workers): once the task is recorded as ended, it must hold no GPU or memory. Processes that
    escaped into their own session (setsid) are out of reach, as with a shell."""
    me, group = os.getpid(), os.getpgrp()
    for _ in range(3):  # a straggler may fork while we sweep
        members = group_members(group, exclude=me)
        for pid in members:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                continue
        if not members:
            return


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.stderr.write("usage: python -m aifab.backends.local.wrapper SPEC_JSON\n")
        return 2
    if os.getpgrp() != os.getpid():
        # Started by hand rather than by the executor: lead a group of our own first, or the
        # relay and the straggler sweep would hit whoever started us.
        os.setsid()
    return Supervisor(Spec.load(Path(args[0]))).run()


if __name__ == "__main__":
    sys.exit(main())
