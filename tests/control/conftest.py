"""Database fixtures for the control plane's tests: every database test runs on SQLite and on
PostgreSQL, each in a fresh database of its own."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from sqlalchemy.engine import make_url

from aifab.control.db import sqlite_url

# The server every CI machine runs; AIFAB_TEST_PG_URL points the tests at another one.
PG_ADMIN_URL = os.environ.get("AIFAB_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")

_PG_DOWN = (
    "PostgreSQL is not reachable at {url} ({error}). The database tests need it on every machine. "
    "Start it with `pg_ctlcluster <version> main start` (`pg_lsclusters` shows the version), "
    "or point AIFAB_TEST_PG_URL at a server where this user may CREATE DATABASE."
)


def _pg_admin_connection() -> psycopg.Connection:
    try:
        # autocommit: CREATE/DROP DATABASE cannot run inside a transaction.
        return psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as error:
        reason = str(error).strip()
    # A failure, not a skip: a silently skipped backend is how PostgreSQL-only bugs ship.
    pytest.fail(_PG_DOWN.format(url=PG_ADMIN_URL, error=reason), pytrace=False)


def _url_for_database(name: str) -> str:
    return make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A new, empty PostgreSQL database for one test, dropped afterwards even if connections to
    it were left open."""
    name = f"aifab_test_{uuid.uuid4().hex}"
    with _pg_admin_connection() as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        try:
            yield _url_for_database(name)
        finally:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def sqlite_db_url(tmp_path: Path) -> str:
    """A SQLite file that does not exist yet, in a directory that does not exist yet."""
    return sqlite_url(tmp_path / "home" / "aifab.db")


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> str:
    """The URL of a fresh, empty database, once per backend."""
    fixture = "sqlite_db_url" if request.param == "sqlite" else "pg_url"
    url: str = request.getfixturevalue(fixture)
    return url
