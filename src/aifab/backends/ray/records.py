"""Task records kept in the Ray cluster's own key-value store (the GCS): the whole state of a task
that the backend, the task itself and its node's agent share. Keys, inside the KV namespace
``aifab/<namespace>``::

    task/<workload>/<attempt>/<task>/handle   the handle launch() returned (the launch's claim),
                                              with the spec the task is submitted with
    task/<workload>/<attempt>/<task>/start    written once by whoever starts it: the task (where,
                                              which GPUs, which agent) or the backend settling a
                                              task that never started
    task/<workload>/<attempt>/<task>/stop     a stop request: the SIGKILL deadline
    task/<workload>/<attempt>/<task>/exit     how it ended: exit_code, signal, finished_at, ...
    gang/<workload>/<attempt>                 the gang's placement group and its size

``start`` and ``exit`` are written with "add" (first writer wins, decided by the GCS), so every
reader gets the same answer. Every call has a timeout: an unreachable GCS is reported as
``EngineUnavailable``, never waited for. (It also guards the Ray calls that have no timeout of
their own, such as ``ray.get_actor``: callers make a KV call first.)
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

from ray.exceptions import RayError
from ray.experimental.internal_kv import internal_kv_get_gcs_client

from aifab.backends.base import BackendError, EngineUnavailable

_RETRY_PAUSE_S = 0.5
_MULTI_GET_CHUNK = 1000  # keys per round trip


def gcs_client() -> Any:
    """This process's GCS client (driver or worker): the only Ray client whose calls all take a
    timeout."""
    client = internal_kv_get_gcs_client()  # type: ignore[no-untyped-call]
    if client is None:
        raise EngineUnavailable("not connected to a Ray cluster")
    return client


def task_key(workload_id: str, attempt: int, task_index: int) -> str:
    return f"{workload_id}/{attempt}/{task_index}"


def gang_key(workload_id: str, attempt: int) -> str:
    return f"{workload_id}/{attempt}"


ENDS_KEY = "ends"  # the last task end recorded: changes at every end (see aifab.backends.ends)


def task_record(key: str, kind: str) -> str:
    """The key of one of a task's records: kind is handle, start, stop or exit."""
    return f"task/{key}/{kind}"


def task_prefix(key: str) -> str:
    return f"task/{key}/"  # the trailing slash: task 1's prefix must not cover task 10


def _decode(key: str, raw: bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise BackendError(f"unreadable record {key}: {exc}") from exc
    if not isinstance(data, dict):
        raise BackendError(f"unreadable record {key}: not a JSON object")
    return data


class Records:
    """JSON objects in the GCS key-value store, one namespace per aifab installation."""

    def __init__(self, namespace: str, timeout: float) -> None:
        self.kv_namespace = f"aifab/{namespace}".encode()
        self.timeout = timeout

    def get(self, key: str) -> dict[str, Any] | None:
        try:
            raw = gcs_client().internal_kv_get(key.encode(), self.kv_namespace, timeout=self.timeout)
        except RayError as exc:
            raise EngineUnavailable(f"Ray's GCS did not answer: {exc}") from exc
        return None if raw is None else _decode(key, raw)

    def get_many(self, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The records of ``keys`` that exist (one round trip per thousand keys)."""
        found: dict[str, dict[str, Any]] = {}
        for i in range(0, len(keys), _MULTI_GET_CHUNK):
            chunk = [k.encode() for k in keys[i : i + _MULTI_GET_CHUNK]]
            try:
                raw = gcs_client().internal_kv_multi_get(chunk, self.kv_namespace, timeout=self.timeout)
            except RayError as exc:
                raise EngineUnavailable(f"Ray's GCS did not answer: {exc}") from exc
            for k, v in raw.items():
                key = k.decode()
                found[key] = _decode(key, v)
        return found

    def claim(self, key: str, value: Mapping[str, Any]) -> bool:
        """Store ``value`` unless the key holds one already; True if this call stored it."""
        try:
            added = gcs_client().internal_kv_put(
                key.encode(), json.dumps(value).encode(), False, self.kv_namespace, timeout=self.timeout
            )
        except RayError as exc:
            raise EngineUnavailable(f"Ray's GCS did not answer: {exc}") from exc
        return bool(added)

    def add(self, key: str, value: Mapping[str, Any]) -> dict[str, Any]:
        """``claim``, returning whichever value is stored: every reader sees the first answer."""
        if self.claim(key, value):
            return dict(value)
        stored = self.get(key)
        return stored if stored is not None else dict(value)

    def put(self, key: str, value: Mapping[str, Any]) -> None:
        try:
            gcs_client().internal_kv_put(
                key.encode(), json.dumps(value).encode(), True, self.kv_namespace, timeout=self.timeout
            )
        except RayError as exc:
            raise EngineUnavailable(f"Ray's GCS did not answer: {exc}") from exc

    def add_persistently(self, key: str, value: Mapping[str, Any], patience_s: float) -> bool:
        """``add``, retried while the GCS is briefly away (it may be restarting). Used by tasks
        and agents, which have nobody to report an error to; False if it never got through."""
        deadline = time.monotonic() + patience_s
        while True:
            try:
                self.claim(key, value)
                return True
            except EngineUnavailable:
                if time.monotonic() >= deadline:
                    return False
                time.sleep(_RETRY_PAUSE_S)

    def delete(self, key: str, *, prefix: bool = False) -> None:
        try:
            gcs_client().internal_kv_del(key.encode(), prefix, self.kv_namespace, timeout=self.timeout)
        except RayError as exc:
            raise EngineUnavailable(f"Ray's GCS did not answer: {exc}") from exc

    def count(self, keys: list[str]) -> int:
        """How many of ``keys`` hold a record (one round trip)."""
        try:
            found = gcs_client().internal_kv_multi_get(
                [k.encode() for k in keys], self.kv_namespace, timeout=self.timeout
            )
        except RayError as exc:
            raise EngineUnavailable(f"Ray's GCS did not answer: {exc}") from exc
        return len(found)
