"""Connecting this process to an existing Ray cluster, and what its nodes look like to aifab.

A process can be the driver of one Ray cluster only (``ray.init`` is process-wide): every
RayBackend of the process shares the connection, and one naming another cluster is refused.

Node names: a node started with the label ``aifab.io/node=<name>`` (``ray start --labels``) is
called by that name; others by their Ray node id. Other labels aifab reads:
``aifab.io/gpu-model``, ``aifab.io/gpu-memory-mib`` and ``aifab.io/virtual-gpus=true``.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import RayError

from aifab.backends.base import BackendError, EngineUnavailable, GpuInfo, NodeInfo
from aifab.backends.ray.records import gcs_client

NAME_LABEL = "aifab.io/node"
GPU_MODEL_LABEL = "aifab.io/gpu-model"
GPU_MEMORY_LABEL = "aifab.io/gpu-memory-mib"
VIRTUAL_GPUS_LABEL = "aifab.io/virtual-gpus"
NODE_ID_LABEL = "ray.io/node-id"  # every Ray node carries it
_ACCELERATOR_PREFIX = "accelerator_type:"
_ALIVE = 0  # GcsNodeInfo.GcsNodeState.ALIVE (the generated module has no type stubs)
_MIB = 1 << 20

_connect_lock = threading.Lock()
_checked: set[str] = set()  # addresses found to be the one this process is connected to


def connect(address: str, namespace: str, timeout: float) -> None:
    """``ray.init`` once per process. ``ray.init`` itself retries an unreachable address for
    minutes, so the GCS port is probed first and a refusal is reported at once."""
    with _connect_lock:
        if ray.is_initialized():
            if address in _checked:
                return  # called before every backend call: no name look-ups on this path
            current = ray.get_runtime_context().gcs_address
            if address != "auto" and _endpoint(address) != _endpoint(current):
                raise BackendError(
                    f"this process is already connected to the Ray cluster at {current}; "
                    f"a process can drive one Ray cluster only, not also {address}"
                )
            _checked.add(address)
            return
        _checked.clear()
        if address.startswith("ray://"):
            raise BackendError("Ray Client addresses (ray://) are not supported: give the GCS host:port")
        if address != "auto":
            _probe(address, timeout)
        in_main_thread = threading.current_thread() is threading.main_thread()
        sigterm = signal.getsignal(signal.SIGTERM) if in_main_thread else None
        try:
            ray.init(
                address=address,
                namespace=namespace,
                log_to_driver=False,  # task output goes to its log file, not to the control plane's
                logging_level=logging.WARNING,
            )
        except (ConnectionError, RuntimeError, RayError) as exc:
            raise EngineUnavailable(f"cannot connect to the Ray cluster at {address}: {exc}") from exc
        finally:
            if in_main_thread:
                # ray.init makes SIGTERM a sys.exit(); the control plane keeps its own shutdown.
                signal.signal(signal.SIGTERM, sigterm)


def _endpoint(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    try:
        return socket.gethostbyname(host or "127.0.0.1"), int(port)
    except (OSError, ValueError) as exc:
        raise BackendError(f"not a Ray address (host:port): {address!r}") from exc


def _probe(address: str, timeout: float) -> None:
    host, port = _endpoint(address)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        raise EngineUnavailable(f"the Ray cluster at {address} cannot be reached: {exc}") from exc


@dataclass(frozen=True, slots=True)
class RayNode:
    name: str
    node_id: str  # hex
    address: str
    resources: Mapping[str, float]
    labels: Mapping[str, str]


def alive_nodes(timeout: float) -> dict[str, RayNode]:
    """The alive nodes by aifab name. Two alive nodes claiming one name (a replacement that
    joined before the old one was declared dead): the newer one wins."""
    try:
        infos = gcs_client().get_all_node_info(timeout=timeout)
    except RayError as exc:
        raise EngineUnavailable(f"Ray's GCS did not list its nodes: {exc}") from exc
    newest: dict[str, tuple[int, RayNode]] = {}
    for info in infos.values():
        if info.state != _ALIVE:
            continue
        node = _node(info)
        if node.name not in newest or info.start_time_ms > newest[node.name][0]:
            newest[node.name] = (info.start_time_ms, node)
    return {name: node for name, (_, node) in newest.items()}


def _node(info: Any) -> RayNode:
    node_id = info.node_id.hex()
    labels = {str(k): str(v) for k, v in info.labels.items()}
    return RayNode(
        name=labels.get(NAME_LABEL) or node_id,
        node_id=node_id,
        address=info.node_manager_address,
        resources={str(k): float(v) for k, v in info.resources_total.items()},
        labels=labels,
    )


def node_info(node: RayNode, pool: str) -> NodeInfo:
    gpus = int(node.resources.get("GPU", 0.0))
    model = node.labels.get(GPU_MODEL_LABEL) or _accelerator(node.resources) or "ray-gpu"
    try:
        memory = int(node.labels.get(GPU_MEMORY_LABEL, "0"))
    except ValueError:
        memory = 0
    return NodeInfo(
        name=node.name,
        cpu_milli=int(node.resources.get("CPU", 0.0) * 1000),
        memory_mib=int(node.resources.get("memory", 0.0) // _MIB),
        gpus=tuple(GpuInfo(index=i, model=model, memory_mib=memory) for i in range(gpus)),
        pool=pool,
        labels={**node.labels, "aifab.io/backend": "ray"},
        virtual_gpus=node.labels.get(VIRTUAL_GPUS_LABEL, "").lower() == "true",
        address=node.address,
    )


def _accelerator(resources: Mapping[str, float]) -> str | None:
    for key in resources:
        if key.startswith(_ACCELERATOR_PREFIX):
            return key[len(_ACCELERATOR_PREFIX) :]
    return None
