"""What a Ray-backend handle holds, and the checks and conversions around requests and handles."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from aifab.backends.base import BackendError, Handle, LaunchRequest
from aifab.backends.ray import gang
from aifab.backends.ray.records import task_key

HANDLE_VERSION = 2  # 1: the task was a runner actor (aifab before the switch to Ray tasks)
_SAFE_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")  # ids become task names, keys and log folders
_HANDLE_KEYS = ("name", "namespace", "node", "node_id", "workload_id", "attempt", "task_index", "log_path")


@dataclass(frozen=True, slots=True)
class TaskRef:
    """The parts of a handle this backend relies on."""

    name: str
    node: str
    node_id: str
    key: str
    gang: str | None
    log_path: str
    requested: tuple[int, ...]
    launched_at: float

    @classmethod
    def of(cls, handle: Handle, namespace: str) -> TaskRef:
        missing = [k for k in _HANDLE_KEYS if k not in handle]
        if missing or handle.get("backend") != "ray":
            raise BackendError(f"not a Ray-backend handle (it lacks {', '.join(missing) or 'backend=ray'})")
        if handle.get("version") != HANDLE_VERSION:
            raise BackendError(
                f"a handle of version {handle.get('version')} of the Ray backend, this is version "
                f"{HANDLE_VERSION}: its task cannot be followed any more"
            )
        if handle["namespace"] != namespace:
            raise BackendError(f"handle of namespace {handle['namespace']!r}, this backend is {namespace!r}")
        try:
            return cls(
                name=str(handle["name"]),
                node=str(handle["node"]),
                node_id=str(handle["node_id"]),
                key=task_key(str(handle["workload_id"]), int(handle["attempt"]), int(handle["task_index"])),
                gang=handle.get("gang"),
                log_path=str(handle["log_path"]),
                requested=tuple(int(d) for d in handle.get("requested_devices") or ()),
                launched_at=float(handle.get("launched_at") or 0.0),
            )
        except (TypeError, ValueError) as exc:
            raise BackendError(f"malformed Ray-backend handle: {exc}") from exc


def task_name(req: LaunchRequest) -> str:
    return f"aifab:{req.workload_id}:{req.attempt}:{req.task_index}"


def describe(req: LaunchRequest) -> str:
    return f"task {req.task_index} of {req.workload_id} (attempt {req.attempt})"


def check_request(req: LaunchRequest) -> None:
    if not _SAFE_ID.fullmatch(req.workload_id):
        raise BackendError(f"workload id {req.workload_id!r} cannot name a Ray task and a log folder")
    if req.attempt < 0 or req.task_index < 0:
        raise BackendError(f"{describe(req)}: attempt and task index must be >= 0")
    if not req.command:
        raise BackendError(f"{describe(req)} has an empty command")
    if gang.is_gang(req) and (
        req.task_index >= len(req.gang_nodes) or req.gang_nodes[req.task_index] != req.node
    ):
        raise BackendError(
            f"{describe(req)}: its node {req.node!r} is not its place in the gang {req.gang_nodes}"
        )


def num_gpus(req: LaunchRequest) -> float:
    """What the runner asks Ray for: whole devices, or a fraction of one."""
    if len(req.devices) == 1 and 0 < req.gpu_milli < 1000:
        return req.gpu_milli / 1000
    return float(len(req.devices))


def same_command(handle: Handle, req: LaunchRequest) -> Handle:
    if handle.get("command") != list(req.command):
        raise BackendError(f"{describe(req)} was already launched with another command")
    return handle


def reported_devices(task: TaskRef, record: dict[str, Any] | None) -> tuple[int, ...] | None:
    """Ray's GPU ids (from a start or exit record), when they are not the ones aifab chose."""
    found = (record or {}).get("devices") or ()
    if not found or not all(isinstance(d, int) for d in found):
        return None
    devices = tuple(int(d) for d in found)
    return devices if devices != task.requested else None


def read_file(path: str, offset: int, limit: int) -> tuple[bytes, int]:
    """Raises FileNotFoundError if the file is not there (not here, or not yet)."""
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(limit)
    return data, offset + len(data)
