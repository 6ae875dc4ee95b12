"""Group commit for workload submissions: the busiest write of the API.

Each ``POST /v1/workloads`` is handed to one writer thread, which stores every submission that
arrived meanwhile in one transaction: one BEGIN, one sequence-number read, three multi-row
INSERTs (workloads, their ``pending`` events, their audit records) and one COMMIT, instead of
all of that per request, and no SQLite write-lock hand-over between request threads. A request
is answered only after the transaction that holds it committed, so "201" still means stored.

Each submission keeps its own semantics: it is authenticated (inside the transaction, so a
revoked token or a removed role counts at once), validated and limit-checked on its own, and a
refusal answers only that request. If the shared transaction itself fails (the store is busy,
or on PostgreSQL another server took the same sequence numbers), each of its submissions is
retried in a transaction of its own, as a lone request would be.

The writer thread starts with the first submission and ends after a few idle seconds.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic_core import to_json
from sqlalchemy.orm import Session

from aifab.control.db import Database
from aifab.control.services import auth, workloads

# At most this many submissions share one transaction (bounds how long it holds the write lock).
MAX_BATCH = 256
IDLE_EXIT_S = 5.0

Check = Callable[[Any], dict[str, Any]]


@dataclass
class _Request:
    token: str | None
    body: Any
    source: str
    future: Future[bytes] = field(default_factory=Future)


class Submissions:
    """Stores submissions in shared transactions; :meth:`submit` returns the JSON answer's
    future (the workload's summary), or the error that refuses it.

    ``check`` turns a parsed request body into the spec dict (or raises the API's 422): it runs
    after authentication, in the order a lone request would see the errors.
    """

    def __init__(
        self, db: Database, checkpoints_root: Path, check: Check, on_stored: Callable[[], None]
    ) -> None:
        self.db = db
        self.checkpoints_root = checkpoints_root
        self.check = check
        self.on_stored = on_stored
        self._cond = threading.Condition()
        self._queue: list[_Request] = []
        self._running = False

    def submit(self, token: str | None, body: Any, source: str) -> Future[bytes]:
        req = _Request(token, body, source)
        with self._cond:
            self._queue.append(req)
            if self._running:
                self._cond.notify()
            else:
                self._running = True
                threading.Thread(target=self._run, name="aifab-submissions", daemon=True).start()
        return req.future

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    if not self._cond.wait(IDLE_EXIT_S) and not self._queue:
                        self._running = False
                        return
                batch, self._queue[:MAX_BATCH] = self._queue[:MAX_BATCH], []
            live = [r for r in batch if r.future.set_running_or_notify_cancel()]
            try:
                self._store(live)
            except BaseException as exc:  # never leave a request waiting
                for r in live:
                    if not r.future.done():
                        r.future.set_exception(exc)

    def _store(self, batch: list[_Request]) -> None:
        if not batch:
            return
        try:
            with self.db.session() as s:
                answers = self._prepare_and_store(s, batch)
        except Exception as exc:
            if len(batch) == 1:
                batch[0].future.set_exception(exc)
                return
            for r in batch:  # one at a time, each in its own transaction
                self._store([r])
            return
        self.on_stored()
        for r, answer in zip(batch, answers, strict=True):
            if isinstance(answer, BaseException):
                r.future.set_exception(answer)
            else:
                r.future.set_result(answer)

    def _prepare_and_store(self, s: Session, batch: list[_Request]) -> list[bytes | BaseException]:
        principals: dict[str | None, auth.Principal] = {}
        queues: dict[str, Any] = {}
        answers: list[bytes | BaseException | None] = []
        ready: list[workloads.NewWorkload] = []
        for r in batch:
            try:
                p = principals.get(r.token)
                if p is None:
                    p = principals[r.token] = auth.authenticate(s, r.token)
                ready.append(workloads.prepare(s, p, self.check(r.body), r.source, queues))
                answers.append(None)
            except Exception as exc:  # refused: answers this request only, writes nothing
                answers.append(exc)
        stored = iter(workloads.store(s, ready, self.checkpoints_root))
        return [to_json(next(stored)) if a is None else a for a in answers]
