"""The MNIST example driven through the CLI like a user: a DDP gang with torch.distributed (gloo)
on CPU, and preemption by reclaim with the loss curve continuing from the checkpoint in the
next attempt, followed live with ``aifab logs -f``."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

from .test_cli_e2e import AIFAB, Env, _submitted_id, env  # noqa: F401

TRAIN = str(Path(__file__).parents[2] / "examples" / "mnist" / "train.py")
EPOCH = re.compile(r"^epoch (\d+) loss ([0-9.]+) accuracy ([0-9.]+) attempt (\d+)", re.M)


def _train(user: Env, project: str, epochs: int, pause: float, *extra: str) -> str:
    cmd = [sys.executable, TRAIN, "--epochs", str(epochs), "--sleep-per-epoch", str(pause), *extra]
    out = user.cli("run", "-p", project, "--gpus", "1", "-o", "json", "--", *cmd).stdout
    return _submitted_id(out)


def test_preempted_training_resumes_its_loss_curve(env: Env) -> None:  # noqa: F811
    env.cli("admin", "project", "a", "--deserved", "1")
    env.cli("admin", "project", "b", "--deserved", "1")
    # a borrows b's idle GPU with a second training.
    mine = [_train(env, "a", 5, 2.0) for _ in range(2)]
    for wid in mine:
        env.wait_phase(wid, "running", timeout=60)
    # b takes its GPU back: one of a's trainings is preempted after an epoch is on disk.
    deadline = time.time() + 120
    while not all(EPOCH.search(env.cli("logs", w).stdout) for w in mine):
        assert time.time() < deadline, "no epoch finished in time"
        time.sleep(0.5)
    reclaimer = _train(env, "b", 1, 0.0)
    env.wait_phase(reclaimer, "succeeded", timeout=120)
    described = [json.loads(env.cli("describe", w, "-o", "json").stdout) for w in mine]
    victims = [d for d in described if any(e["kind"] == "preempted" for e in d["events"])]
    assert len(victims) == 1
    victim = victims[0]["id"]
    # Follow the resumed attempt live until it ends.
    followed = subprocess.run(
        [AIFAB, "logs", "-f", victim], env=env.env, capture_output=True, text=True, timeout=180
    ).stdout
    d = env.wait_phase(victim, "succeeded", timeout=60)
    assert d["attempt"] == 2
    first = env.cli("logs", victim, "--attempt", "1").stdout
    before = [(int(e), float(loss)) for e, loss, _, _ in EPOCH.findall(first)]
    after = [(int(e), float(loss)) for e, loss, _, _ in EPOCH.findall(followed)]
    assert before and after, (first, followed)
    saved = before[-1][0]
    assert f"resumed from epoch {saved} attempt 2" in followed
    # The curve continues: attempt 2 starts at the next epoch and every epoch is trained once.
    assert [e for e, _ in before + after] == list(range(1, 6))
    assert after[-1][1] < before[0][1]  # the loss kept falling across the preemption
    assert float(re.findall(r"final accuracy ([0-9.]+)", followed)[-1]) >= 0.85


def test_ddp_gang_through_apply(env: Env, tmp_path: Path) -> None:  # noqa: F811
    env.cli("admin", "project", "vision", "--deserved", "2")
    out = tmp_path / "out"
    spec = tmp_path / "ddp.yaml"
    spec.write_text(
        "kind: job\nname: mnist-ddp\nproject: vision\n"
        f"command: [{sys.executable}, {TRAIN}, --epochs, '2', --out-dir, {out}]\n"
        "replicas: 2\nresources: {gpus: 1}\n"
    )
    wid = _submitted_id(env.cli("apply", "-f", str(spec), "-o", "json").stdout)
    d = env.wait_phase(wid, "succeeded", timeout=180)
    assert len(d["tasks"]) == 2
    ranks = [json.loads((out / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world_size"] == 2 and ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]
    assert "epoch 2 loss" in env.cli("logs", wid, "--task", "1").stdout
