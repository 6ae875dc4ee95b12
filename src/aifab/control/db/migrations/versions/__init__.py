"""Alembic revisions, oldest first by number. Written by hand, checked against the models by the
tests (``compare_metadata`` must find no difference on SQLite and PostgreSQL)."""
