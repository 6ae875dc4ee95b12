"""The agents: one small detached actor per Ray node, which submits the tasks placed on its node.

A task submitted by a driver (the control plane) belongs to it: Ray kills it when that driver
exits, and the control plane must be able to restart under running tasks. A task submitted by a
detached actor outlives every driver, so the backend hands each task to the agent of its node,
which submits it as a plain Ray task (``runner.py``) and watches it:

* a task whose worker died without recording its end (``ray.kill`` of the worker, the OOM
  killer, a forced cancel) is recorded here as killed by SIGKILL, as its command was with it;
* an end that the runner could not record (the GCS away too long) is recorded here.

If the agent itself dies, Ray ends the tasks it submitted (their owner is gone); the runner
records their start with the agent's actor id, so ``status`` tells them from those of the next
agent of the node. An agent also reads a task's log on its node for a control plane that does
not share the log folder. Agents are shared by every aifab namespace on the cluster (they hold
no state but what is in flight) and live as long as their node.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

import ray
from ray._raylet import PlacementGroupID
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util.placement_group import PlacementGroup
from ray.util.scheduling_strategies import (
    NodeAffinitySchedulingStrategy,
    PlacementGroupSchedulingStrategy,
)

from aifab.backends.base import BackendError, EngineUnavailable
from aifab.backends.ray import runner
from aifab.backends.ray.records import Records, task_record

AGENT_NAMESPACE = "aifab-agents"
AGENT_VERSION = 2  # in the name: a new protocol gets new agents, old ones keep their tasks
_CONCURRENCY = 16  # submits, cancels and log reads must not wait behind one another
_RECORD_PATIENCE_S = 120.0
_ERROR_CHARS = 500
_ACK_CHECK_S = 0.5

_remote_run: Any = None
_remote_agent: Any = None
_lock = threading.Lock()


def agent_name(node_id: str) -> str:
    return f"aifab-agent-v{AGENT_VERSION}:{node_id}"


def agent_options(node_id: str) -> dict[str, Any]:
    return {
        "name": agent_name(node_id),
        "namespace": AGENT_NAMESPACE,
        "lifetime": "detached",
        "get_if_exists": True,
        "num_cpus": 0,
        "max_restarts": 0,
        "max_task_retries": 0,
        "max_concurrency": _CONCURRENCY,
        "scheduling_strategy": NodeAffinitySchedulingStrategy(node_id, soft=False),
    }


def agent_class() -> Any:
    global _remote_agent
    with _lock:
        if _remote_agent is None:
            _remote_agent = ray.remote(Agent)
        return _remote_agent


def _run_task() -> Any:
    global _remote_run
    with _lock:
        if _remote_run is None:
            # Zero CPUs: aifab accounts for them. max_calls=0: the worker serves task after task
            # (Ray would otherwise retire a GPU task's worker after one call; the runner itself
            # never touches a GPU).
            _remote_run = ray.remote(num_cpus=0, num_gpus=0, max_retries=0, max_calls=0)(runner.run)
        return _remote_run


@dataclass
class _Submitted:
    launch_id: str
    ref: Any  # ray.ObjectRef
    spec: dict[str, Any]


class Agent:
    """One node's agent (see the module docstring)."""

    def __init__(self) -> None:
        self.id = ray.get_runtime_context().get_actor_id()
        self._lock = threading.Lock()
        self._tasks: dict[tuple[str, str], _Submitted] = {}
        self._ended: queue.Queue[tuple[tuple[str, str], _Submitted, concurrent.futures.Future[Any]]]
        self._ended = queue.Queue()
        threading.Thread(target=self._record_ends, name="aifab-ends", daemon=True).start()

    def submit(self, spec: dict[str, Any]) -> str:
        """Submit the task once per launch (a repeated launch may send it again); returns this
        agent's actor id. ``spec``: what ``runner.run`` takes, plus name, num_gpus and the
        placement: node_id, or placement_group (hex id) and bundle."""
        ident = (str(spec["namespace"]), str(spec["key"]))
        with self._lock:
            known = self._tasks.get(ident)
            if known is not None and known.launch_id == spec["launch_id"]:
                return str(self.id)
            ref = (
                _run_task()
                .options(num_gpus=spec["num_gpus"], scheduling_strategy=_strategy(spec), name=spec["name"])
                .remote({**spec, "agent": self.id})
            )
            submitted = _Submitted(str(spec["launch_id"]), ref, spec)
            self._tasks[ident] = submitted
        ref.future().add_done_callback(lambda f: self._ended.put((ident, submitted, f)))
        return str(self.id)

    def cancel(self, namespace: str, key: str) -> bool:
        """Kill the task's worker (and its command with it); False if this agent has no such
        task in flight."""
        with self._lock:
            submitted = self._tasks.get((namespace, key))
        if submitted is None:
            return False
        with contextlib.suppress(Exception):  # ended meanwhile
            ray.cancel(submitted.ref, force=True)
        return True

    def read_log(self, path: str, offset: int, limit: int) -> tuple[bytes, int]:
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                data = f.read(limit)
        except FileNotFoundError:
            return b"", offset  # not written yet
        return data, offset + len(data)

    def _record_ends(self) -> None:
        while True:
            ident, submitted, future = self._ended.get()
            with self._lock:
                if self._tasks.get(ident) is submitted:
                    del self._tasks[ident]
            try:
                result = future.result()
            except Exception as exc:  # the worker died, or the task was cancelled or failed
                self._record_death(submitted.spec, exc)
            else:
                if isinstance(result, dict) and not result.get("recorded", True):
                    end = {k: v for k, v in result.items() if k != "recorded"}
                    self._record(submitted.spec, end)

    def _record_death(self, spec: dict[str, Any], exc: BaseException) -> None:
        """Recorded unless the runner did so, or the task was released meanwhile."""
        end = {
            "exit_code": None,
            "signal": 9,
            "finished_at": time.time(),
            "inferred": True,
            "error": f"{type(exc).__name__}: {exc}"[:_ERROR_CHARS],
        }
        self._record(spec, end)

    def _record(self, spec: dict[str, Any], end: dict[str, Any]) -> None:
        records = Records(spec["namespace"], float(spec["record_timeout"]))
        handle_key = task_record(spec["key"], "handle")
        deadline = time.monotonic() + _RECORD_PATIENCE_S
        while time.monotonic() < deadline:
            try:
                handle = records.get(handle_key)
                if handle is None or handle.get("launch_id") != spec["launch_id"]:
                    return
                records.claim(task_record(spec["key"], "exit"), end)
                return
            except EngineUnavailable:
                time.sleep(0.5)
            except Exception:  # a record this agent cannot read: nothing it could add
                return


def _strategy(spec: dict[str, Any]) -> Any:
    if spec.get("placement_group"):
        group = PlacementGroup(PlacementGroupID.from_hex(spec["placement_group"]))
        return PlacementGroupSchedulingStrategy(
            group, placement_group_bundle_index=int(spec["bundle"]), placement_group_capture_child_tasks=False
        )
    return NodeAffinitySchedulingStrategy(spec["node_id"], soft=False)


class Agents:
    """The driver's side: a handle on each node's agent, created on demand. Submitting does not
    wait for the agent's answer (a node's agent may be slow to get the CPU, and waiting was most
    of a launch): a failed answer is noticed by a later submit to the node, which then creates a
    new agent, and the backend's ``status`` hands a task that does not start over again."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._lock = threading.Lock()
        self._handles: dict[str, Any] = {}  # node id → actor handle
        # node id → (the answer to a recent submit sent there, when it was sent)
        self._acks: dict[str, tuple[Any, float]] = {}

    def ensure(self, node_id: str) -> Any:
        """The node's agent, created if it has none (not waited for). Call after a GCS call
        that has a timeout: creating a named actor has none."""
        with self._lock:
            handle = self._handles.get(node_id)
        if handle is None:
            handle = agent_class().options(**agent_options(node_id)).remote()
            with self._lock:
                self._handles[node_id] = handle
        return handle

    def keep(self, node_ids: set[str]) -> None:
        with self._lock:
            for node_id in [n for n in self._handles if n not in node_ids]:
                self._handles.pop(node_id, None)
                self._acks.pop(node_id, None)

    def drop_unless(self, node_id: str, actor_id: str | None) -> None:
        """Forget the node's agent handle unless it is the agent ``actor_id`` (now alive)."""
        with self._lock:
            handle = self._handles.get(node_id)
            if handle is not None and handle._actor_id.hex() != actor_id:
                self._handles.pop(node_id, None)
                self._acks.pop(node_id, None)

    def submit(self, spec: dict[str, Any]) -> None:
        node_id = str(spec["node_id"])
        now = time.monotonic()
        with self._lock:
            ack, sent = self._acks.get(node_id, (None, now))
        # The last answer is looked at only now and then: a look costs a millisecond.
        if ack is not None and now - sent >= _ACK_CHECK_S and _failed(ack):
            self.drop_unless(node_id, None)
            ack = None
        handle = self.ensure(node_id)
        reply = handle.submit.remote(spec)
        with self._lock:
            if ack is None or now - sent >= _ACK_CHECK_S:
                self._acks[node_id] = (reply, now)

    def live(self, node_id: str) -> Any:
        """The node's agent if it has one (none is created); call after a GCS call with a
        timeout."""
        with self._lock:
            handle = self._handles.get(node_id)
        if handle is None:
            with contextlib.suppress(ValueError):
                handle = ray.get_actor(agent_name(node_id), namespace=AGENT_NAMESPACE)
        return handle

    def cancel(self, node_id: str, namespace: str, key: str) -> None:
        """Have the node's agent kill the task's worker, if it still has the task."""
        handle = self.live(node_id)
        if handle is not None:
            with contextlib.suppress(RayActorError, GetTimeoutError):
                ray.get(handle.cancel.remote(namespace, key), timeout=self.timeout)

    def read_log(self, node_id: str, path: str, offset: int, limit: int) -> tuple[bytes, int] | None:
        """The file as the node's agent reads it; None if the node has no agent."""
        handle = self.live(node_id)
        if handle is None:
            return None
        try:
            data, end = ray.get(handle.read_log.remote(path, offset, limit), timeout=self.timeout)
        except (RayActorError, GetTimeoutError) as exc:
            raise BackendError(f"the aifab agent of node {node_id} did not send {path}") from exc
        return bytes(data), int(end)


def _failed(ref: Any) -> bool:
    ready, _ = ray.wait([ref], timeout=0)
    if not ready:
        return False
    try:
        ray.get(ref, timeout=0)
    except RayActorError:
        return True
    except Exception:  # the agent is there; this one submit failed
        return False
    return False
