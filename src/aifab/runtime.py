"""Helpers for a training script that runs under aifab. Standard library only; torch is optional.

A typical loop::

    from aifab import runtime

    runtime.install()                    # catch SIGTERM from the start
    runtime.apply_gpu_fraction()         # cap GPU memory if the job got a fraction of a GPU
    ckpt = runtime.checkpoint_dir()
    for step in range(start, steps):
        train_one_step()
        if step % 500 == 0 or runtime.preempted():
            save(ckpt / "model.pt")
            runtime.checkpoint_saved(step)
        if runtime.preempted():
            sys.exit(143)                # requeued by aifab; resumes from ckpt (any code will do)

Preemption and cancellation: the control plane sends SIGTERM, waits the job's
``checkpoint_grace`` seconds (30 by default), then sends SIGKILL. Once :func:`install` has run,
SIGTERM only sets a flag that :func:`preempted` reports, so the script decides when to save and
exit. ``checkpoint_saved`` tells the control plane how recent the last checkpoint is; when it must
evict something it prefers victims that lose the least work.

Environment set by the control plane: ``AIFAB_JOB_ID``, ``AIFAB_ATTEMPT`` (1 on the first run,
+1 per retry or preemption; 0 outside aifab), ``AIFAB_CHECKPOINT_DIR`` (kept across attempts) and
``AIFAB_GPU_FRACTION`` (only for fractional GPU jobs).
"""

from __future__ import annotations

import importlib
import json
import math
import os
import signal
import tempfile
import threading
import time
import warnings
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any, Final

from aifab.core.errors import ValidationError

ENV_JOB_ID: Final = "AIFAB_JOB_ID"
ENV_ATTEMPT: Final = "AIFAB_ATTEMPT"
ENV_CHECKPOINT_DIR: Final = "AIFAB_CHECKPOINT_DIR"
ENV_GPU_FRACTION: Final = "AIFAB_GPU_FRACTION"

DEFAULT_CHECKPOINT_DIR: Final = Path("checkpoints")
CHECKPOINT_STATE: Final = Path(".aifab") / "checkpoint.json"
"""Where :func:`checkpoint_saved` writes, relative to the checkpoint directory."""

# A plain bool, not a threading.Event: the handler runs between bytecodes of the main thread, and
# Event.set takes a lock that the interrupted code might hold.
_preempted = False
_installed = False


def job_id() -> str | None:
    """The aifab job id, or None when not running under aifab."""
    return os.environ.get(ENV_JOB_ID) or None


def attempt() -> int:
    """Which run of the job this is: 1 first, then 2, 3, ... after retries and preemptions (0
    outside aifab)."""
    raw = os.environ.get(ENV_ATTEMPT, "").strip()
    if not raw:
        return 0
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        # Set by the control plane, so garbage here is a bug worth hearing about, not a 0.
        raise ValidationError(f"must be a whole number >= 0, got {raw!r}", field=ENV_ATTEMPT)
    return value


def checkpoint_dir() -> Path:
    """The directory to save checkpoints in (created if missing); it survives preemption."""
    path = _checkpoint_root()
    path.mkdir(parents=True, exist_ok=True)
    return path


def checkpoint_saved(step: int | None = None) -> None:
    """Record that a checkpoint was just written (call it after the save has completed).

    Writes ``<checkpoint_dir>/.aifab/checkpoint.json`` atomically (temp file + rename), so the
    control plane never reads a half-written record even if the process is killed meanwhile.
    """
    # int(): a numpy integer step would not serialise.
    state = {"time": time.time(), "step": None if step is None else int(step), "attempt": attempt()}
    target = checkpoint_dir() / CHECKPOINT_STATE
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".checkpoint.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(state, f)
            f.flush()
            os.fsync(f.fileno())  # the rename must not land before the data on a crash
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def last_checkpoint(path: Path | None = None) -> dict[str, Any] | None:
    """The record of the last :func:`checkpoint_saved`, or None if there is none (or it is unreadable).

    ``path`` is a job's checkpoint directory (default: this process's, not created if missing).
    The control plane calls this on files a user program wrote, so it never raises for their
    content: a missing, corrupt or odd-shaped record reads as "no checkpoint".
    """
    root = _checkpoint_root() if path is None else Path(path)
    try:
        data = json.loads((root / CHECKPOINT_STATE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    saved_at = data.get("time")
    if isinstance(saved_at, bool) or not isinstance(saved_at, int | float) or not math.isfinite(saved_at):
        return None
    return data


def install() -> None:
    """Catch SIGTERM: from now on it sets the flag :func:`preempted` reports instead of killing.

    Must run in the main thread (a Python rule for signal handlers). A handler installed before,
    by the script or a framework, is still called after the flag is set.
    """
    global _installed
    if _installed:
        return
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("aifab.runtime.install() must be called from the main thread")
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        global _preempted
        _preempted = True
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGTERM, on_sigterm)
    _installed = True


def preempted() -> bool:
    """True once SIGTERM was received: save a checkpoint and exit within ``checkpoint_grace``.

    The first call installs the handler (see :func:`install`); call ``install()`` early instead if
    a SIGTERM could arrive before the first check.
    """
    install()
    return _preempted


def apply_gpu_fraction(torch_module: ModuleType | None = None) -> float | None:
    """Cap this process's GPU memory to ``AIFAB_GPU_FRACTION`` of the device; return the fraction.

    This is *soft* isolation: only memory is capped (allocations beyond the share fail with an
    out-of-memory error in this process instead of hurting the neighbours); compute is shared
    with the other jobs on the GPU. Returns None, without error, when the variable is unset or
    torch or CUDA is unavailable. ``torch_module`` replaces ``import torch`` (for tests).
    """
    fraction = _gpu_fraction()
    if fraction is None:
        return None
    torch = torch_module if torch_module is not None else _import_torch()
    if torch is None or not torch.cuda.is_available():
        return None
    torch.cuda.set_per_process_memory_fraction(fraction)
    return fraction


def _gpu_fraction() -> float | None:
    raw = os.environ.get(ENV_GPU_FRACTION, "").strip()
    if not raw:
        return None
    try:
        fraction = float(raw)
    except ValueError:
        fraction = math.nan
    if not 0 < fraction <= 1:
        # Not worth killing a training run over: run uncapped, but say so.
        warnings.warn(f"ignoring {ENV_GPU_FRACTION}={raw!r}: not a number in (0, 1]", stacklevel=3)
        return None
    return fraction


def _import_torch() -> ModuleType | None:
    try:
        return importlib.import_module("torch")
    except ImportError:
        return None


def _checkpoint_root() -> Path:
    return Path(os.environ.get(ENV_CHECKPOINT_DIR) or DEFAULT_CHECKPOINT_DIR)
