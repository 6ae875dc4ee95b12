"""A baseline git revision checked out next to this tree, for benchmarks that compare the two
side by side on the same machine at the same moment (these machines' speed varies up to 3x
between sessions; a ratio measured in one run does not)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def revision(rev: str) -> str:
    """The short hash of ``rev``."""
    return subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", rev], check=True, capture_output=True, text=True
    ).stdout.strip()


def dirty_src() -> bool:
    """Whether src/ has uncommitted changes (then "this tree" is more than HEAD)."""
    out = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "src"], capture_output=True, text=True
    ).stdout
    return bool(out.strip())


@contextmanager
def checked_out(rev: str) -> Iterator[Path]:
    """``rev`` in a temporary worktree (removed afterwards); yields its root."""
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "baseline"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(tree), rev], check=True
        )
        try:
            yield tree
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=True)


def start_child(code: str, pythonpath: list[Path], *args: str) -> subprocess.Popen[str]:
    """Run ``code`` (a Python program that prints one JSON line last) with these paths first on
    PYTHONPATH: one revision's src/, and the benchmark helpers where it needs them."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in pythonpath)}
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, stdout=subprocess.PIPE, text=True)


def child_result(proc: subprocess.Popen[str], what: str) -> dict[str, object]:
    """The JSON a child printed last; exits naming ``what`` if it failed."""
    out, _ = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed with exit code {proc.returncode}")
    got: dict[str, object] = json.loads(out.strip().splitlines()[-1])
    return got


def write_results(stem: str, payload: dict[str, object], md: list[str]) -> Path:
    """bench/results/<stem>.json and .md; returns the markdown file's path."""
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{stem}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (results / f"{stem}.md").write_text("\n".join(md))
    return results / f"{stem}.md"
