"""The training-side helpers: SIGTERM handling, checkpoint records, environment parsing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from aifab import runtime
from aifab.core.errors import ValidationError

SRC = Path(__file__).resolve().parents[1] / "src"

needs_sigterm = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


def _start(script: str, tmp_path: Path, **env: str) -> subprocess.Popen[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("AIFAB_")}
    environ["PYTHONPATH"] = os.pathsep.join([str(SRC), environ.get("PYTHONPATH", "")])
    environ.update(env)
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=tmp_path,
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_ready(proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline()  # the script prints once its handler is in place
    assert line.strip() == "ready", proc.stderr.read() if proc.stderr else line


@needs_sigterm
def test_sigterm_lets_the_script_checkpoint_and_exit_cleanly(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    proc = _start(
        """
        import sys, time
        from aifab import runtime

        assert not runtime.preempted()  # the first call installs the handler
        print("ready", flush=True)
        deadline = time.monotonic() + 30
        while not runtime.preempted():
            if time.monotonic() > deadline:
                sys.exit(3)
            time.sleep(0.01)
        runtime.checkpoint_saved(step=7)
        sys.exit(0)
        """,
        tmp_path,
        AIFAB_CHECKPOINT_DIR=str(ckpt),
        AIFAB_ATTEMPT="2",
    )
    try:
        _wait_ready(proc)
        before = time.time()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    record = json.loads((ckpt / ".aifab" / "checkpoint.json").read_text())
    assert record["step"] == 7
    assert record["attempt"] == 2
    assert before <= record["time"] <= time.time()
    assert runtime.last_checkpoint(ckpt) == record
    assert [p.name for p in (ckpt / ".aifab").iterdir()] == ["checkpoint.json"]  # no temp files left


@needs_sigterm
def test_a_previous_sigterm_handler_still_runs(tmp_path: Path) -> None:
    proc = _start(
        """
        import os, signal
        from aifab import runtime

        seen = []
        signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
        runtime.install()
        runtime.install()  # idempotent: must not chain to itself
        os.kill(os.getpid(), signal.SIGTERM)
        print("ready", flush=True)
        print(runtime.preempted(), seen == [signal.SIGTERM], flush=True)
        """,
        tmp_path,
    )
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert out.split() == ["ready", "True", "True"]


def test_attempt_and_job_id_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AIFAB_ATTEMPT", raising=False)
    monkeypatch.delenv("AIFAB_JOB_ID", raising=False)
    assert runtime.attempt() == 0
    assert runtime.job_id() is None
    monkeypatch.setenv("AIFAB_ATTEMPT", " 3 ")
    monkeypatch.setenv("AIFAB_JOB_ID", "j-42")
    assert runtime.attempt() == 3
    assert runtime.job_id() == "j-42"
    monkeypatch.setenv("AIFAB_JOB_ID", "")
    assert runtime.job_id() is None


@pytest.mark.parametrize("raw", ["x", "-1", "1.5"])
def test_attempt_refuses_garbage(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv("AIFAB_ATTEMPT", raw)
    with pytest.raises(ValidationError) as info:
        runtime.attempt()
    assert info.value.field == "AIFAB_ATTEMPT"


def test_checkpoint_dir_defaults_to_checkpoints_and_creates_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("AIFAB_CHECKPOINT_DIR", raising=False)
    assert runtime.checkpoint_dir().resolve() == tmp_path / "checkpoints"
    assert (tmp_path / "checkpoints").is_dir()
    monkeypatch.setenv("AIFAB_CHECKPOINT_DIR", str(tmp_path / "a" / "b"))
    assert runtime.checkpoint_dir() == tmp_path / "a" / "b"
    assert (tmp_path / "a" / "b").is_dir()


def test_checkpoint_saved_in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIFAB_CHECKPOINT_DIR", str(tmp_path))
    monkeypatch.delenv("AIFAB_ATTEMPT", raising=False)
    assert runtime.last_checkpoint() is None
    runtime.checkpoint_saved()
    first = runtime.last_checkpoint()
    assert first is not None and first["step"] is None and first["attempt"] == 0
    runtime.checkpoint_saved(step=12)
    second = runtime.last_checkpoint(tmp_path)
    assert second is not None and second["step"] == 12 and second["time"] >= first["time"]


@pytest.mark.parametrize(
    "content", ["{not json", "[1, 2]", '{"step": 3}', '{"time": "now"}', '{"time": true}']
)
def test_last_checkpoint_reads_a_bad_record_as_none(tmp_path: Path, content: str) -> None:
    (tmp_path / ".aifab").mkdir()
    (tmp_path / ".aifab" / "checkpoint.json").write_text(content)
    assert runtime.last_checkpoint(tmp_path) is None


def _fake_torch(available: bool) -> tuple[Any, list[float]]:
    calls: list[float] = []
    cuda = SimpleNamespace(is_available=lambda: available, set_per_process_memory_fraction=calls.append)
    return SimpleNamespace(cuda=cuda), calls


def test_apply_gpu_fraction(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AIFAB_GPU_FRACTION", raising=False)
    torch, calls = _fake_torch(available=True)
    assert runtime.apply_gpu_fraction(torch) is None  # not a fractional job
    monkeypatch.setenv("AIFAB_GPU_FRACTION", "0.5")
    assert runtime.apply_gpu_fraction(torch) == 0.5
    assert calls == [0.5]
    no_cuda, no_calls = _fake_torch(available=False)
    assert runtime.apply_gpu_fraction(no_cuda) is None
    assert no_calls == []


def test_apply_gpu_fraction_without_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIFAB_GPU_FRACTION", "0.25")
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    assert runtime.apply_gpu_fraction() is None


@pytest.mark.parametrize("raw", ["half", "0", "1.5", "nan"])
def test_apply_gpu_fraction_ignores_a_bad_value_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, raw: str
) -> None:
    monkeypatch.setenv("AIFAB_GPU_FRACTION", raw)
    torch, calls = _fake_torch(available=True)
    with pytest.warns(UserWarning, match="AIFAB_GPU_FRACTION"):
        assert runtime.apply_gpu_fraction(torch) is None
    assert calls == []
