"""Gangs: all tasks of one attempt reserved at once, as one Ray placement group.

The first task of a gang to launch creates the group: bundle *i* holds task *i*'s GPUs and is
pinned to the node aifab chose for it (``req.gang_nodes[i]``) by a bundle label selector on the
node's ``ray.io/node-id`` label, so Ray reserves exactly aifab's placement or nothing. The
strategy says the same in Ray's own terms: STRICT_SPREAD when the nodes are distinct,
STRICT_PACK when they are one; a mix (two tasks on one node, one elsewhere) can only be PACK,
which the pinned bundles make exact anyway.

The group is detached (it outlives the control plane) and named by (workload, attempt); its id
is kept in the GCS records so that every later launch of the gang finds it. It is removed once
every task of the gang has an end record (the last task to end does it; ``status`` retries),
or by ``RayBackend.release``. Removing it kills whatever still runs in it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping
from typing import Any

import ray
from ray._raylet import PlacementGroupID
from ray.exceptions import RayError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group

from aifab.backends.base import BackendError, LaunchRequest
from aifab.backends.ray.cluster import NODE_ID_LABEL, RayNode
from aifab.backends.ray.records import Records, gang_key, task_record

_POLL_S = 0.1
# A bundle must ask for something; a GPU-less task's bundle asks for one byte of memory, which
# every node has.
_TOKEN_BUNDLE = {"memory": 1.0}


def is_gang(req: LaunchRequest) -> bool:
    return len(req.gang_nodes) > 1


def bundle_gpus(req: LaunchRequest) -> tuple[int, ...]:
    """GPUs of every bundle; without ``gang_gpus``, each task is assumed to need what this one does."""
    if req.gang_gpus:
        if len(req.gang_gpus) != len(req.gang_nodes):
            raise BackendError(f"gang of {req.workload_id}: gang_gpus and gang_nodes differ in length")
        return tuple(req.gang_gpus)
    return (len(req.devices),) * len(req.gang_nodes)


def reserve(
    records: Records, req: LaunchRequest, nodes: Mapping[str, RayNode], timeout: float
) -> PlacementGroup:
    """The gang's placement group, created if needed and ready; BackendError if Ray cannot
    reserve it within ``timeout`` (the group is then dropped, so that a retry starts afresh)."""
    key = gang_key(req.workload_id, req.attempt)
    record = records.get(f"gang/{key}")
    if record is None:
        record = _create(records, req, nodes)
    group = _group(record)
    if not _wait_created(group, timeout):
        remove(records, key)
        raise BackendError(
            f"Ray could not reserve the gang of {req.workload_id} (attempt {req.attempt}) on "
            f"{', '.join(req.gang_nodes)} within {timeout:g} s (GPUs still held, or a node gone)"
        )
    return group


def _create(records: Records, req: LaunchRequest, nodes: Mapping[str, RayNode]) -> dict[str, Any]:
    missing = sorted({n for n in req.gang_nodes if n not in nodes})
    if missing:
        raise BackendError(f"gang of {req.workload_id}: no alive Ray node named {', '.join(missing)}")
    bundles = [{"GPU": float(g)} if g > 0 else dict(_TOKEN_BUNDLE) for g in bundle_gpus(req)]
    selectors = [{NODE_ID_LABEL: nodes[n].node_id} for n in req.gang_nodes]
    distinct = len(set(req.gang_nodes))
    strategy = (
        "STRICT_SPREAD" if distinct == len(req.gang_nodes) else "STRICT_PACK" if distinct == 1 else "PACK"
    )
    try:
        group = placement_group(
            bundles,
            strategy=strategy,
            name=f"aifab:{req.workload_id}:{req.attempt}",
            lifetime="detached",
            bundle_label_selector=selectors,
        )
    except (ValueError, RayError) as exc:
        raise BackendError(f"gang of {req.workload_id}: Ray refused the placement group: {exc}") from exc
    mine = {"pg": group.id.hex(), "size": len(bundles), "nodes": list(req.gang_nodes), "strategy": strategy}
    stored = records.add(f"gang/{gang_key(req.workload_id, req.attempt)}", mine)
    if stored["pg"] != mine["pg"]:  # a concurrent launch of a sibling won
        with contextlib.suppress(RayError):
            remove_placement_group(group)
    return stored


def _group(record: Mapping[str, Any]) -> PlacementGroup:
    return PlacementGroup(PlacementGroupID.from_hex(record["pg"]))


def _wait_created(group: PlacementGroup, timeout: float) -> bool:
    # Polls the GCS table rather than pg.wait(), which starts a worker process to find out.
    deadline = time.monotonic() + timeout
    while True:
        state = ray.util.placement_group_table(group).get("state")
        if state == "CREATED":
            return True
        if state == "REMOVED" or time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_S)


def release_if_done(records: Records, key: str) -> None:
    """Remove the gang's group once every one of its tasks has an end record."""
    record = records.get(f"gang/{key}")
    if record is None:
        return
    size = int(record["size"])
    if records.count([task_record(f"{key}/{i}", "exit") for i in range(size)]) == size:
        _remove(records, key, record)


def remove(records: Records, key: str) -> None:
    record = records.get(f"gang/{key}")
    if record is not None:
        _remove(records, key, record)


def _remove(records: Records, key: str, record: Mapping[str, Any]) -> None:
    with contextlib.suppress(RayError):  # already removed
        remove_placement_group(_group(record))
    records.delete(f"gang/{key}")
