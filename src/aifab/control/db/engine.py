"""Engines, sessions and migrations for the control plane's database.

One code path for both backends: embedded SQLite (the single-node default, a file under
``AIFAB_HOME``) and PostgreSQL (production, psycopg 3). Alembic owns the schema; nothing here
calls ``metadata.create_all``.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

# Milliseconds a SQLite connection waits for another writer's lock before "database is locked".
SQLITE_BUSY_TIMEOUT_MS = 30000  # a writer may wait behind a long scheduler write under load

# Driver names that mean "PostgreSQL, pick the driver for me"; ``postgres://`` is what Heroku-style
# environments hand out and SQLAlchemy no longer accepts it.
_BARE_POSTGRES_DRIVERS = {"postgres", "postgresql"}


READ_ONLY = "aifab_read_only"


def normalise_url(url: str | URL) -> URL:
    """Parse ``url``; a bare ``postgresql://`` (or ``postgres://``) URL gets the psycopg 3 driver,
    because SQLAlchemy's default PostgreSQL driver is psycopg2, which aifab does not install."""
    parsed = make_url(url)
    if parsed.drivername in _BARE_POSTGRES_DRIVERS:
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def sqlite_url(path: str | Path) -> str:
    """The URL of the SQLite database file at ``path``."""
    return f"sqlite:///{Path(path)}"


def make_engine(url: str | URL) -> Engine:
    """An engine for ``url``. SQLite files get their parent directory and the per-connection
    settings the control plane relies on (see ``_configure_sqlite``)."""
    parsed = normalise_url(url)
    if parsed.get_backend_name() == "sqlite":
        _create_sqlite_parent(parsed)
        engine = create_engine(parsed, pool_pre_ping=True)
        _configure_sqlite(engine)
        return engine
    return create_engine(parsed, pool_pre_ping=True)


def _create_sqlite_parent(url: URL) -> None:
    database = url.database
    # In-memory databases and ``file:`` URIs have no plain parent directory to create.
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)


def _configure_sqlite(engine: Engine) -> None:
    """Per-connection SQLite settings, and real transactions.

    * WAL: readers never block the writer and the writer never blocks readers.
    * foreign_keys: SQLite ignores FOREIGN KEY clauses unless asked, per connection.
    * busy_timeout: a second writer waits for the lock instead of failing at once.
    * synchronous=NORMAL: safe with WAL (a power cut can lose the last commits, never corrupt).

    The stdlib driver's "legacy transaction control" only emits BEGIN before INSERT/UPDATE/
    DELETE, so reads earlier in a session are not part of its transaction (lost updates), DDL is
    autocommitted and SAVEPOINT is broken. We switch that off and emit BEGIN ourselves.
    IMMEDIATE takes the write lock at the start of the transaction: a session that reads, decides
    and then writes (the scheduler binding a task) cannot have its snapshot overtaken by another
    writer, which in WAL mode fails with SQLITE_BUSY at once, without waiting out busy_timeout.
    The price is that transactions are serialised; they are short and the control plane is the
    only writer, so that is the right trade for the embedded default.
    """

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # the driver must not emit BEGIN on its own
        cursor = dbapi_connection.cursor()
        try:
            # busy_timeout first, so that switching the file to WAL waits for a busy lock too.
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        # AUTOCOMMIT (e.g. for VACUUM) must stay outside any transaction.
        if connection.get_execution_options().get("isolation_level") == "AUTOCOMMIT":
            return
        # A read-only unit of work (listings, the scheduler's snapshot) must not take the write
        # lock: with WAL it reads a consistent snapshot while writers go on.
        read_only = connection.get_execution_options().get(READ_ONLY, False)
        connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions whose objects stay readable after commit: the control loops hand rows to code that
    runs after the session has closed, and a reload per attribute access would be a query each."""
    return sessionmaker(bind=engine, expire_on_commit=False)


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic configuration built in code (aifab ships no alembic.ini). With ``connection``,
    the migrations run on it, inside the caller's transaction (see ``migrations/env.py``)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("path_separator", "os")
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """The newest revision the shipped migrations know."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:
        raise RuntimeError(f"no migrations found under {MIGRATIONS_DIR}")
    return head


def migrate(engine_or_url: Engine | str | URL, revision: str = "head") -> str:
    """Upgrade the database to ``revision`` (default: the newest) and return the revision it is at.
    Safe to call on every start: an up-to-date database is left alone."""
    with _engine_for(engine_or_url) as engine, engine.begin() as connection:
        command.upgrade(alembic_config(connection), revision)
        reached = _revision_on(connection)
    if reached is None:  # only possible if someone "upgrades" to base
        raise RuntimeError(f"upgrade to {revision!r} left the database without a revision")
    return reached


def downgrade(engine_or_url: Engine | str | URL, revision: str = "base") -> str | None:
    """Downgrade the database to ``revision``; ``base`` removes every table. For tests and
    operators backing out an upgrade; returns the revision it is at (None at base)."""
    with _engine_for(engine_or_url) as engine, engine.begin() as connection:
        command.downgrade(alembic_config(connection), revision)
        return _revision_on(connection)


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at; None for a database Alembic has never touched."""
    with engine.connect() as connection:
        return _revision_on(connection)


def _revision_on(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


@contextmanager
def _engine_for(engine_or_url: Engine | str | URL) -> Iterator[Engine]:
    """Use the caller's engine as is; an engine made from a URL here is disposed here."""
    if isinstance(engine_or_url, Engine):
        yield engine_or_url
        return
    engine = make_engine(engine_or_url)
    try:
        yield engine
    finally:
        engine.dispose()


class Database:
    """The control plane's handle on its database: one engine, one session factory."""

    def __init__(self, url: str | URL) -> None:
        self.engine: Engine = make_engine(url)
        self.sessions: sessionmaker[Session] = session_factory(self.engine)
        # SQLite has one writer at a time. Left to themselves, this process's writers would queue
        # for it in SQLite's busy handler, which polls by sleeping (1, 2, 5, ... 100 ms): under
        # load the lock sits free while every waiter sleeps (submissions ran at ~90/s). Taking
        # turns on a mutex first hands the lock over at once. Other processes still meet
        # busy_timeout. PostgreSQL has row locks and needs none of this.
        self._writer: threading.Lock | None = (
            threading.Lock() if self.engine.dialect.name == "sqlite" else None
        )

    @property
    def url(self) -> URL:
        return self.engine.url

    def migrate(self) -> str:
        """Bring the schema to the newest revision; returns it."""
        return migrate(self.engine)

    def current_revision(self) -> str | None:
        return current_revision(self.engine)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A unit of work: committed when the block ends normally, rolled back if it raises.

        On SQLite it waits for this process's other writers first (see ``__init__``); a wait longer
        than ``SQLITE_BUSY_TIMEOUT_MS`` fails like a busy database does (OperationalError)."""
        with self._write_turn(), self.sessions() as session, session.begin():
            yield session

    @contextmanager
    def _write_turn(self) -> Iterator[None]:
        lock = self._writer
        if lock is None:
            yield
            return
        # A plain Lock, not an RLock: the API enters and leaves a request's unit of work on
        # worker threads that need not be the same one.
        if not lock.acquire(timeout=SQLITE_BUSY_TIMEOUT_MS / 1000):
            raise OperationalError(
                "BEGIN IMMEDIATE", None, sqlite3.OperationalError("database is locked (by this process)")
            )
        try:
            yield
        finally:
            lock.release()

    @contextmanager
    def read_session(self) -> Iterator[Session]:
        """A read-only unit of work: never takes SQLite's write lock; always rolled back.

        Closing the session rolls its transaction back and detaches what it loaded, which stays
        readable. (``Session.rollback()`` would first expire every loaded object: 60 ms for the
        schedule loop's 10,000 queued workloads, for nothing.)"""
        with self.sessions() as session:
            session.connection(execution_options={READ_ONLY: True})
            yield session

    def dispose(self) -> None:
        """Close every pooled connection (at shutdown, and before a test drops its database)."""
        self.engine.dispose()

    def __enter__(self) -> Database:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.dispose()
