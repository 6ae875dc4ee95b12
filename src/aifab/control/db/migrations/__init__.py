"""Alembic migrations of the control plane's schema (run through ``aifab.control.db.migrate``)."""
