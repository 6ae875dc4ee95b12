"""The control plane's database layer, on SQLite and on PostgreSQL (``db_url`` runs each test on
both): migrations reach head and agree with the models, every table round-trips through the ORM,
and SQLite is configured for a multi-threaded server (WAL, foreign keys, busy_timeout, real
transactions)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import func, inspect, select, text
from sqlalchemy.exc import IntegrityError

from aifab.control.db import (
    AuditRow,
    Base,
    Database,
    EventRow,
    MembershipRow,
    NodeRow,
    QueueRow,
    StateRow,
    TaskRunRow,
    TokenRow,
    UserRow,
    WorkloadRow,
    current_revision,
    downgrade,
    head_revision,
    make_engine,
    migrate,
)


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    """A migrated database; its connections are closed before the fixture drops it."""
    database = Database(db_url)
    database.migrate()
    yield database
    database.dispose()


@pytest.fixture
def sqlite_db(sqlite_db_url: str) -> Iterator[Database]:
    database = Database(sqlite_db_url)
    database.migrate()
    yield database
    database.dispose()


def _tables(database: Database) -> set[str]:
    return set(inspect(database.engine).get_table_names()) - {"alembic_version"}


def _workload(id: str, seq: int, project: str = "vision") -> WorkloadRow:
    return WorkloadRow(
        id=id,
        seq=seq,
        name=f"train-{seq}",
        project=project,
        spec={"tasks": [{"gpus": 1, "command": ["python", "train.py"]}], "image": None},
        phase="pending",
        priority=50,
        priority_class="train",
        preemptible=True,
        submit_time=3.5,
        queued_at=3.5,
        checkpoint_dir=f"/ckpt/{id}",
        updated_at=3.5,
    )


def _add_project_and_workload(database: Database) -> None:
    with database.session() as session:
        session.add(QueueRow(name="research", created_at=1.0))
        session.flush()  # the parent queue must exist before its child's foreign key is checked
        session.add(QueueRow(name="vision", parent="research", gpu_deserved=4000, created_at=1.0))
        session.flush()
        session.add(_workload("w1", seq=1))


# --- migrations ---------------------------------------------------------------------------------


def test_migrate_brings_an_empty_database_to_head(db_url: str) -> None:
    database = Database(db_url)
    try:
        assert database.current_revision() is None
        assert database.migrate() == head_revision() == "0002_project_policies"
        assert database.current_revision() == head_revision()
        assert _tables(database) == set(Base.metadata.tables)
    finally:
        database.dispose()


def test_migrate_is_idempotent_from_a_url_or_an_engine(db_url: str) -> None:
    assert migrate(db_url) == head_revision()
    assert migrate(db_url) == head_revision()
    engine = make_engine(db_url)
    try:
        assert migrate(engine) == head_revision()
        assert current_revision(engine) == head_revision()
    finally:
        engine.dispose()


def test_downgrade_to_base_removes_every_table_and_upgrade_restores_them(db: Database) -> None:
    assert downgrade(db.engine, "base") is None
    assert db.current_revision() is None
    assert _tables(db) == set()

    assert db.migrate() == head_revision()
    assert _tables(db) == set(Base.metadata.tables)


def test_migrations_and_models_agree(db: Database) -> None:
    """The guard that keeps migrations honest: a model change without a migration fails here."""
    with db.engine.connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"compare_type": True, "compare_server_default": True}
        )
        differences = compare_metadata(context, Base.metadata)
    assert differences == [], f"write a migration for: {differences}"


# --- the ORM ------------------------------------------------------------------------------------


def _one_row_per_table() -> list[Base]:
    """Rows in foreign-key order; JSON columns hold nested dicts and lists, None included."""
    return [
        QueueRow(name="research", created_at=1.0),
        QueueRow(
            name="vision",
            parent="research",
            priority=2,
            gpu_deserved=4000,
            gpu_weight=2.5,
            gpu_limit=8000,
            cpu_limit=None,
            node_pool="a100",
            created_at=1.25,
        ),
        NodeRow(
            name="node-0",
            pool="a100",
            cpu_milli=64000,
            memory_mib=512 * 1024,
            gpus=[{"index": 0, "model": "A100", "memory_mib": 81920}, {"index": 1, "model": "A100"}],
            labels={"zone": "eu-1", "spot": False},
            topology={"nvlink": [[0, 1]], "numa": {"0": [0, 1]}},
            updated_at=2.0,
        ),
        _workload("w1", seq=1),
        TaskRunRow(
            workload_id="w1",
            attempt=0,
            task_index=0,
            node="node-0",
            devices=[0, 1],
            gpu_milli=2000,
            state="bound",
            handle={"pid": 4242, "argv": ["python", "train.py"], "env": None},
        ),
        EventRow(workload_id="w1", time=3.5, kind="pending", message="submitted"),
        UserRow(name="alice", admin=True, created_at=1.0),
        MembershipRow(user="alice", project="vision", role="member"),
        TokenRow(user="alice", prefix="afb_1234", secret_hash="ab" * 32, created_at=1.0),
        AuditRow(time=4.0, actor="alice", action="submit", target="w1", detail={"ids": [1, 2.5, "x"]}),
        StateRow(key="next_seq", value={"seq": 2, "history": [1]}),
    ]


def _columns(row: Base) -> dict[str, Any]:
    return {attr.key: getattr(row, attr.key) for attr in inspect(row).mapper.column_attrs}


def _primary_key(row: Base) -> Any:
    return inspect(row).identity


def test_every_table_round_trips_through_the_orm(db: Database) -> None:
    rows = _one_row_per_table()
    assert {row.__table__.name for row in rows} == set(Base.metadata.tables), "a table has no row here"
    with db.session() as session:
        for row in rows:
            session.add(row)
            session.flush()  # one at a time: the self-referencing queue needs its parent first
    written = [(type(row), _primary_key(row), _columns(row)) for row in rows]

    with db.session() as session:
        for model, key, columns in written:
            read = session.get(model, key)
            assert read is not None, f"{model.__name__} {key} not found"
            assert _columns(read) == columns


def test_session_rolls_back_when_the_block_raises(db: Database) -> None:
    with pytest.raises(RuntimeError), db.session() as session:
        session.add(UserRow(name="bob", created_at=1.0))
        session.flush()
        raise RuntimeError("boom")
    with db.session() as session:
        assert session.get(UserRow, "bob") is None


def test_foreign_keys_are_enforced(db: Database) -> None:
    with pytest.raises(IntegrityError), db.session() as session:
        session.add(_workload("orphan", seq=1, project="no-such-project"))


def test_objects_stay_readable_after_the_session_commits(db: Database) -> None:
    with db.session() as session:
        user = UserRow(name="carol", created_at=1.0)
        session.add(user)
    assert user.name == "carol" and user.admin is False  # no DetachedInstanceError


def _run_in_threads(threads: int, work: Callable[[], None]) -> list[BaseException]:
    """Run ``work`` in ``threads`` threads released together; return what they raised."""
    start = threading.Barrier(threads)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            start.wait()
            work()
        except BaseException as error:
            errors.append(error)

    workers = [threading.Thread(target=run) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return errors


def test_read_modify_write_loses_no_update(db: Database) -> None:
    """The portable way to update a row from its own value: SELECT ... FOR UPDATE locks the row on
    PostgreSQL; SQLite ignores the clause and BEGIN IMMEDIATE serialises the transactions."""
    with db.session() as session:
        session.add(StateRow(key="counter", value={"n": 0}))

    def increment_25_times() -> None:
        for _ in range(25):
            with db.session() as session:
                row = session.scalars(
                    select(StateRow).where(StateRow.key == "counter").with_for_update()
                ).one()
                row.value = {"n": row.value["n"] + 1}

    assert _run_in_threads(2, increment_25_times) == []
    with db.session() as session:
        assert session.get_one(StateRow, "counter").value == {"n": 50}


# --- SQLite specifics ---------------------------------------------------------------------------


def test_sqlite_creates_the_parent_directory(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "aifab.db"
    database = Database(f"sqlite:///{path}")
    try:
        database.migrate()
    finally:
        database.dispose()
    assert path.is_file()


def test_sqlite_connection_settings(sqlite_db: Database) -> None:
    with sqlite_db.engine.connect() as connection:
        pragma = lambda name: connection.exec_driver_sql(f"PRAGMA {name}").scalar()  # noqa: E731
        assert pragma("journal_mode") == "wal"
        assert pragma("foreign_keys") == 1
        assert pragma("busy_timeout") == 30000
        assert pragma("synchronous") == 1  # NORMAL


def test_sqlite_reads_belong_to_the_transaction(sqlite_db: Database) -> None:
    """In the driver's legacy mode a SELECT runs outside any transaction (so a later write can be
    based on a stale read); our own BEGIN makes it part of the session's transaction."""
    with sqlite_db.session() as session:
        session.execute(select(UserRow))
        assert session.connection().connection.dbapi_connection.in_transaction  # type: ignore[union-attr]


def test_sqlite_concurrent_writers_wait_instead_of_failing(sqlite_db: Database) -> None:
    _add_project_and_workload(sqlite_db)

    def insert_50_events() -> None:
        name = threading.current_thread().name
        for i in range(50):
            with sqlite_db.session() as session:
                session.add(EventRow(workload_id="w1", time=float(i), kind="bind", message=name))

    assert _run_in_threads(2, insert_50_events) == []  # no "database is locked"
    with sqlite_db.session() as session:
        assert session.scalar(select(func.count()).select_from(EventRow)) == 100


# --- URLs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    ["postgresql://u:p@db.example:5433/aifab", "postgres://u:p@db.example:5433/aifab"],
)
def test_bare_postgres_urls_get_the_psycopg3_driver(url: str) -> None:
    engine = make_engine(url)  # makes no connection
    assert engine.url.drivername == "postgresql+psycopg"
    assert (engine.url.host, engine.url.port, engine.url.database) == ("db.example", 5433, "aifab")


def test_an_explicit_driver_is_kept() -> None:
    assert make_engine("postgresql+psycopg://u@h/d").url.drivername == "postgresql+psycopg"


def test_pg_database_is_really_postgresql(pg_url: str) -> None:
    """The PostgreSQL parameter must not quietly fall back to anything else."""
    engine = make_engine(pg_url)
    try:
        with engine.connect() as connection:
            assert connection.dialect.name == "postgresql"
            assert connection.execute(text("SELECT current_database()")).scalar() == engine.url.database
    finally:
        engine.dispose()


def test_a_read_session_does_not_wait_for_a_writer(tmp_path: Path) -> None:
    """Listings and the scheduler's snapshot read while a submission holds SQLite's write lock."""
    import threading
    import time

    db = Database(f"sqlite:///{tmp_path / 'r.db'}")
    db.migrate()
    with db.session() as s:
        s.add(StateRow(key="k", value={"v": 0}))
    locked, release = threading.Event(), threading.Event()

    def writer() -> None:
        with db.session() as s:
            row = s.get(StateRow, "k")
            assert row is not None
            row.value = {"v": 1}
            s.flush()
            locked.set()
            release.wait(10)

    t = threading.Thread(target=writer)
    t.start()
    assert locked.wait(10)
    started = time.monotonic()
    with db.read_session() as s:
        row = s.get(StateRow, "k")
        assert row is not None and row.value == {"v": 0}  # the last committed state
    assert time.monotonic() - started < 1.0
    release.set()
    t.join()
    db.dispose()
