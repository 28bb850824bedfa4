"""Alembic environment of the result store.

Normally run by :func:`orchestrator.store.schema.upgrade`, which hands over a connection that
is already inside a transaction (``config.attributes["connection"]``). Run by the ``alembic``
command line instead (developers writing a new revision), it connects to ``sqlalchemy.url``
or ``STUDYQ_DATABASE_URL``. ``render_as_batch`` lets future ALTERs work on SQLite.
"""

from __future__ import annotations

import os
from typing import Any

from alembic import context
from sqlalchemy.engine import Connection

from orchestrator.store.engine import DEFAULT_URL, create_engine_for, normalize_url
from orchestrator.store.models import Base
from orchestrator.store.schema import VERSION_TABLE

_OPTIONS: dict[str, Any] = {
    "target_metadata": Base.metadata,
    "version_table": VERSION_TABLE,
    "render_as_batch": True,
    "compare_type": True,
}


def _url() -> str:
    configured = context.config.get_main_option("sqlalchemy.url")
    return configured or os.environ.get("STUDYQ_DATABASE_URL", DEFAULT_URL)


def _migrate(connection: Connection) -> None:
    context.configure(connection=connection, **_OPTIONS)
    with context.begin_transaction():
        context.run_migrations()


def _main() -> None:
    if context.is_offline_mode():
        url = normalize_url(_url())
        context.configure(url=url, literal_binds=True, **_OPTIONS)
        with context.begin_transaction():
            context.run_migrations()
        return
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _migrate(connection)
        return
    engine = create_engine_for(_url())
    try:
        with engine.begin() as owned:
            _migrate(owned)
    finally:
        engine.dispose()


_main()
