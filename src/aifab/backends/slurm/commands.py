"""Slurm's command-line clients, run as subprocesses with a timeout and this backend's
``SLURM_CONF``, their failures sorted into "the controller cannot be reached" (transient:
:class:`EngineUnavailable`) and "Slurm said no" (:class:`BackendError`)."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from aifab.backends.base import BackendError, EngineUnavailable

# What Slurm's clients print when slurmctld is down, restarting or overloaded.
_UNREACHABLE_MARKS = (
    "unable to contact slurm controller",
    "connection refused",
    "connect failure",
    "socket timed out",
    "zero bytes were transmitted or received",
    "transport endpoint is not connected",
    "slurm temporarily unable to accept job",
    "slurmctld is not responding",
    "communication connection failure",
)
# Variables that would change what the clients do (``SBATCH_PARTITION``, the ``SLURM_JOB_ID``
# of a control plane that itself runs in a Slurm job) or what GPUs a task sees.
_CLIENT_ENV_PREFIXES = ("SLURM_", "SBATCH_", "SALLOC_", "SRUN_", "SQUEUE_", "SINFO_", "SCANCEL_")
_GPU_VARIABLES = ("CUDA_VISIBLE_DEVICES", "GPU_DEVICE_ORDINAL", "ROCR_VISIBLE_DEVICES")


class SlurmTimeout(EngineUnavailable):
    """A command did not finish in time: what it asked for may or may not have happened."""


def client_env(slurm_conf: str | None, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of every Slurm command, and so of every job (sbatch exports it): the
    control plane's own, without what would steer the clients or give a task the control
    plane's view of the GPUs; ``SLURM_CONF`` names this backend's cluster."""
    source = os.environ if base is None else base
    conf = slurm_conf if slurm_conf is not None else source.get("SLURM_CONF")
    env = {
        k: v for k, v in source.items() if not k.startswith(_CLIENT_ENV_PREFIXES) and k not in _GPU_VARIABLES
    }
    if conf:
        env["SLURM_CONF"] = conf
    return env


def is_unreachable(message: str) -> bool:
    text = message.lower()
    return any(mark in text for mark in _UNREACHABLE_MARKS)


class SlurmCli:
    def __init__(self, slurm_conf: str | None, timeout_s: float = 30.0) -> None:
        self.slurm_conf = slurm_conf
        self.timeout_s = timeout_s

    def run(self, args: Sequence[str]) -> subprocess.CompletedProcess[str]:
        """Run one command. Raises EngineUnavailable when it names an unreachable controller
        or does not finish in time; other failures are left to the caller (``returncode``)."""
        try:
            done = subprocess.run(
                list(args),
                env=client_env(self.slurm_conf),
                capture_output=True,
                text=True,
                timeout=self.timeout_s,
                stdin=subprocess.DEVNULL,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise SlurmTimeout(f"{args[0]} did not answer within {self.timeout_s:g}s") from exc
        except FileNotFoundError as exc:
            raise BackendError(f"Slurm's {args[0]} is not installed (or not on PATH)") from exc
        if done.returncode != 0 and is_unreachable(done.stderr + done.stdout):
            raise EngineUnavailable(f"{args[0]}: slurmctld cannot be reached: {_last_line(done.stderr)}")
        return done

    def json(self, args: Sequence[str]) -> dict[str, Any]:
        """The JSON output of ``sinfo --json`` / ``squeue --json``. Slurm 22.05 exits 0 with an
        ``errors`` list (and stderr) when the controller is down: that is EngineUnavailable."""
        done = self.run(args)
        if done.returncode != 0:
            raise BackendError(f"{' '.join(args)} failed: {_last_line(done.stderr)}")
        try:
            data = json.loads(done.stdout)
        except ValueError as exc:
            raise BackendError(f"{' '.join(args)} printed no JSON: {done.stdout[:200]!r}") from exc
        errors = data.get("errors") or []
        if errors:
            described = "; ".join(_error_text(e) for e in errors)
            stderr = f": {_last_line(done.stderr)}" if done.stderr.strip() else ""
            raise EngineUnavailable(f"{args[0]}: slurmctld cannot be reached ({described}){stderr}")
        return dict(data)

    def nodes(self) -> list[dict[str, Any]]:
        return list(self.json(["sinfo", "--json"]).get("nodes", []))

    def jobs(self) -> list[dict[str, Any]]:
        # 22.05 ignores squeue's filters with --json: this is every job slurmctld remembers,
        # finished ones included for MinJobAge seconds.
        return list(self.json(["squeue", "--json"]).get("jobs", []))

    def submit(self, options: Sequence[str], script: str, args: Sequence[str]) -> str:
        done = self.run(["sbatch", "--parsable", *options, script, *args])
        if done.returncode != 0:
            raise BackendError(f"sbatch refused the job: {done.stderr.strip() or done.stdout.strip()}")
        job_id = done.stdout.strip().split(";")[0]  # "<id>" or "<id>;<cluster>"
        if not job_id.isdigit():
            raise BackendError(f"sbatch printed no job id: {done.stdout.strip()!r}")
        return job_id

    def cancel(self, job_ids: Sequence[str], *, signal_name: str | None = None, batch: bool = False) -> bool:
        """``scancel``: without a signal, Slurm's own cancel (SIGTERM to every process of the
        job, SIGKILL after KillWait); with one and ``batch``, that signal to the batch script
        alone. False when Slurm refused (e.g. the job has ended meanwhile)."""
        if not job_ids:
            return True
        options = [f"--signal={signal_name}"] if signal_name else []
        if batch:
            options.append("--batch")
        return self.run(["scancel", *options, *job_ids]).returncode == 0

    def show_job(self, job_id: str) -> str:
        done = self.run(["scontrol", "show", "job", "-d", job_id])
        return done.stdout if done.returncode == 0 else ""


NOT_READ_YET: dict[str, Any] = {}  # lookup(): the table was read before the job was submitted


class JobTable:
    """One ``squeue --json`` answers every ``status`` call of a burst (the control plane asks
    about all its tasks in one reconcile pass): the table is reused for ``ttl_s`` seconds. A job
    missing from it is looked up again at once, unless it was submitted after the table was
    read (then :data:`NOT_READ_YET`): with jobs submitted on every pass, re-reading for each new
    one meant a ``squeue --json`` (and parsing Slurm's verbose JSON) on nearly every pass."""

    def __init__(self, cli: SlurmCli, ttl_s: float = 2.0) -> None:
        self.cli = cli
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._jobs: dict[str, dict[str, Any]] = {}
        self._read_at = float("-inf")
        self._read_wall = float("-inf")  # time.time() just before the last read

    def lookup(self, job_id: str, submitted_at: float | None = None) -> dict[str, Any] | None:
        with self._lock:
            fresh = False
            if time.monotonic() - self._read_at > self.ttl_s:
                self._refresh()
                fresh = True
            job = self._jobs.get(job_id)
            if job is None and not fresh:
                if submitted_at is not None and submitted_at > self._read_wall:
                    return NOT_READ_YET
                self._refresh()
                job = self._jobs.get(job_id)
            return job

    def find(self, *, script: str) -> dict[str, Any] | None:
        """The job whose batch script is ``script`` (a fresh read). Slurm reports the script
        with its arguments after it."""
        with self._lock:
            self._refresh()
            for job in self._jobs.values():
                command = str(job.get("command") or "")
                if command == script or command.startswith(f"{script} "):
                    return job
            return None

    def _refresh(self) -> None:
        self._read_wall = time.time()
        jobs = self.cli.jobs()
        self._jobs = {str(j["job_id"]): j for j in jobs if "job_id" in j}
        self._read_at = time.monotonic()


def _error_text(error: Any) -> str:
    """One item of the ``errors`` list of Slurm's JSON output, for a person: 22.05 writes
    ``{"error": "Unspecified error", "errno": -1}``, later versions add a source and a description."""
    if not isinstance(error, dict):
        return str(error)
    text = str(error.get("description") or error.get("error") or f"error {error.get('errno')}")
    return f"{error['source']}: {text}" if error.get("source") else text


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no message)"
