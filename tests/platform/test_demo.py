"""The README's main job, small: `aifab demo` starts the platform, runs the mix with a reclaim,
and prints the per-project summary."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

AIFAB = str(Path(sys.executable).parent / "aifab")


def test_demo_runs_to_the_summary() -> None:
    pytest.importorskip("torch")
    pytest.importorskip("mlxtend")
    r = subprocess.run(
        [AIFAB, "demo", "--gpus", "2", "--epochs", "2"], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "per project" in r.stdout and "demo finished" in r.stdout
    assert "Traceback" not in r.stdout + r.stderr
