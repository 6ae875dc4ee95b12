"""Units of work: this process's SQLite writers take turns on a mutex; read sessions detach."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from aifab.control.db import Database, StateRow, engine
from aifab.control.services import auth


@pytest.fixture
def sqlite_db(tmp_path: Path) -> Database:
    db = Database(f"sqlite:///{tmp_path / 'aifab.db'}")
    db.migrate()
    return db


def test_writers_take_turns_and_lose_no_update(sqlite_db: Database) -> None:
    with sqlite_db.session() as s:
        s.add(StateRow(key="n", value={"n": 0}))

    def bump() -> None:
        for _ in range(40):
            with sqlite_db.session() as s:
                row = s.get(StateRow, "n")
                assert row is not None
                row.value = {"n": row.value["n"] + 1}

    threads = [threading.Thread(target=bump) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with sqlite_db.read_session() as s:
        row = s.get(StateRow, "n")
        assert row is not None and row.value == {"n": 160}
    sqlite_db.dispose()


def test_a_writer_waits_for_its_turn_no_longer_than_a_busy_store(
    sqlite_db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine, "SQLITE_BUSY_TIMEOUT_MS", 200)
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with sqlite_db.session() as s:
            s.get(StateRow, "x")
            holding.set()
            release.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    assert holding.wait(10)
    started = time.monotonic()
    with pytest.raises(OperationalError, match="locked"), sqlite_db.session() as s:
        s.get(StateRow, "x")
    assert time.monotonic() - started < 5
    release.set()
    t.join()
    with sqlite_db.session() as s:  # the turn was given back
        s.add(StateRow(key="x", value={}))
    sqlite_db.dispose()


def test_what_a_read_session_loaded_stays_readable(sqlite_db: Database) -> None:
    with sqlite_db.session() as s:
        s.add(StateRow(key="k", value={"v": 1}))
    with sqlite_db.read_session() as s:
        rows = list(s.scalars(select(StateRow)))
    assert [(r.key, r.value) for r in rows] == [("k", {"v": 1})]  # detached, not expired
    sqlite_db.dispose()


def test_one_statement_authenticates_with_every_role(sqlite_db: Database) -> None:
    from aifab.control.services import projects

    with sqlite_db.session() as s:
        for name in ("a", "b"):
            projects.create_queue(s, auth.SYSTEM, projects.QueueSpec(name=name))
        auth.create_user(s, "carol")
        auth.set_role(s, "carol", "a", auth.Role.MEMBER)
        auth.set_role(s, "carol", "b", auth.Role.VIEWER)
        auth.create_user(s, "dave")
        carol, dave = auth.issue_token(s, "carol"), auth.issue_token(s, "dave")
    with sqlite_db.read_session() as s:
        assert auth.authenticate(s, carol) == auth.Principal(
            "carol", False, {"a": auth.Role.MEMBER, "b": auth.Role.VIEWER}
        )
        assert auth.authenticate(s, dave) == auth.Principal("dave", False, {})
        for bad in ("", None, carol + "x"):
            with pytest.raises(auth.AuthenticationError):
                auth.authenticate(s, bad)
    with sqlite_db.session() as s:
        auth.revoke_tokens(s, "carol")
    with sqlite_db.read_session() as s, pytest.raises(auth.AuthenticationError, match="revoked"):
        auth.authenticate(s, carol)
    sqlite_db.dispose()
