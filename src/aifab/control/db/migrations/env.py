"""Alembic's entry point, configured in code by ``aifab.control.db.engine.alembic_config``.

In-process callers (``migrate``) pass their open connection in ``config.attributes["connection"]``
so that the migration runs inside their transaction, on their engine with its SQLite settings.
Without one (the ``alembic`` command line with ``-x url=...`` or ``sqlalchemy.url``), an engine is
made here the same way the control plane makes it.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, text

from aifab.control.db.engine import make_engine, normalise_url
from aifab.control.db.models import Base

# Any constant works; it only has to be the same for every aifab process sharing a database.
_PG_MIGRATION_LOCK = 0x41494641  # "AIFA"


def _url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url") or context.config.get_main_option(
        "sqlalchemy.url"
    )
    if not url:
        raise RuntimeError("no database: pass a connection, -x url=..., or set sqlalchemy.url")
    return url


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        compare_type=True,
        # SQLite cannot ALTER most things; batch mode rewrites the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
    )


def _run(connection: Connection) -> None:
    _configure(connection)
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            # Two servers starting at once must not both run the same migration; the second waits
            # here, then finds the database already at head. (SQLite: BEGIN IMMEDIATE does this.)
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK})
        context.run_migrations()


def run_online() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = make_engine(_url())
    try:
        with engine.connect() as own_connection:
            _run(own_connection)
            own_connection.commit()
    finally:
        engine.dispose()


def run_offline() -> None:
    """``alembic upgrade --sql``: print the DDL for a DBA instead of running it."""
    context.configure(url=normalise_url(_url()), target_metadata=Base.metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
