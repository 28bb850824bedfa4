"""Schema versions: apply the Alembic migrations, and tell whether a database is current.

Alembic runs programmatically from the scripts shipped in ``orchestrator/store/migrations``;
no ``alembic.ini`` is needed at runtime. The version is kept in its own table,
``studyq_alembic_version``, so a team database that other Alembic-managed applications share
is not confused.

Policy (applied by ``ResultStore.open``): an embedded SQLite file belongs to one user and is
upgraded automatically; a shared PostgreSQL database is upgraded only on purpose, with
``studyq db upgrade``, because workers of the old version may still be running against it.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, text
from sqlalchemy.engine import URL, Connection

from orchestrator.contracts.errors import StoreError
from orchestrator.store.columns import FINISH_COLUMNS
from orchestrator.store.engine import create_engine_for, mask_url, transaction

__all__ = [
    "MIGRATIONS_DIR",
    "VERSION_TABLE",
    "alembic_config",
    "current_revision",
    "ensure_current",
    "head_revision",
    "is_current",
    "upgrade",
]

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
VERSION_TABLE = "studyq_alembic_version"
_UPGRADE_LOCK = 0x57_75_64_79  # pg_advisory_xact_lock key: one upgrade at a time


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic config pointing at the packaged scripts, optionally bound to a connection
    (``env.py`` then migrates on it inside the caller's transaction)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """The revision this version of studyq expects."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:  # pragma: no cover - the package always ships a migration
        raise StoreError("No schema migrations are installed; reinstall studyq.")
    return head


def _with_engine(url_or_engine: str | URL | Engine) -> tuple[Engine, bool]:
    if isinstance(url_or_engine, Engine):
        return url_or_engine, False
    return create_engine_for(url_or_engine), True


def upgrade(url_or_engine: str | URL | Engine, revision: str = "head") -> str | None:
    """Apply migrations up to ``revision`` in one transaction; returns the new revision.

    Safe to run concurrently: SQLite serializes on its write lock, PostgreSQL on an advisory
    lock taken inside the transaction.
    """
    engine, owned = _with_engine(url_or_engine)
    try:
        with transaction(engine) as connection:
            if connection.dialect.name == "postgresql":
                connection.execute(text(f"SELECT pg_advisory_xact_lock({_UPGRADE_LOCK})"))
            _check_known(engine, _current(connection))
            command.upgrade(alembic_config(connection), revision)
            _grant_roles(connection)
            return _current(connection)
    finally:
        if owned:
            engine.dispose()


def _grant_roles(connection: Connection) -> None:
    """Grant studyq's roles their rights on the schema as it now is, when the database has
    them (``studyq_grant_roles()``, revision 0003; it does nothing without roles.sql's
    roles): an upgrade never leaves a role without the grants of a new table or view."""
    if connection.dialect.name != "postgresql":
        return
    grants = connection.execute(text("SELECT to_regprocedure('public.studyq_grant_roles()')"))
    if grants.scalar() is None:
        return
    connection.execute(text("SELECT public.studyq_grant_roles()"))
    # The result columns a worker writes are declared once (store/columns.py); a column added
    # after revision 0003 is granted here, so its migration need not replace the function.
    named = connection.execute(text("SELECT to_regprocedure('public.studyq_role_name(text)')"))
    if named.scalar() is None:
        return
    grant = connection.execute(
        text(
            "SELECT format('GRANT UPDATE (%s) ON runs TO %I', "
            "array_to_string(ARRAY(SELECT quote_ident(c) FROM unnest(CAST(:columns AS text[])) c),"
            " ', '), public.studyq_role_name('worker'))"
        ),
        {"columns": list(FINISH_COLUMNS)},
    ).scalar()
    connection.execute(text(str(grant)))


def _current(connection: Connection) -> str | None:
    context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
    return context.get_current_revision()


def current_revision(url_or_engine: str | URL | Engine) -> str | None:
    """The database's schema revision, or None when studyq's schema was never installed."""
    engine, owned = _with_engine(url_or_engine)
    try:
        with transaction(engine, readonly=True) as connection:
            return _current(connection)
    finally:
        if owned:
            engine.dispose()


def is_current(url_or_engine: str | URL | Engine) -> bool:
    """Whether the database is at the revision this studyq expects (``studyq check``)."""
    return current_revision(url_or_engine) == head_revision()


def ensure_current(engine: Engine) -> None:
    """Raise a StoreError that says what to run unless the schema is exactly current."""
    current = current_revision(engine)
    head = head_revision()
    if current == head:
        return
    where = mask_url(engine.url)
    if current is None:
        raise StoreError(
            f"The result store {where} has no studyq schema yet. "
            "Run `studyq db upgrade` (with STUDYQ_DATABASE_URL pointing at it) once, "
            "then start coordinators and workers."
        )
    _check_known(engine, current)
    raise StoreError(
        f"The result store {where} is at schema revision {current!r}; this studyq needs "
        f"{head!r}. Stop the workers, run `studyq db upgrade`, then restart them."
    )


def _check_known(engine: Engine, current: str | None) -> None:
    """Refuse a schema written by a newer studyq: migrating it down or up would fail."""
    if current is None:
        return
    scripts = ScriptDirectory.from_config(alembic_config())
    if current not in {script.revision for script in scripts.walk_revisions()}:
        raise StoreError(
            f"The result store {mask_url(engine.url)} is at schema revision {current!r}, "
            f"which this studyq does not know (it expects {head_revision()!r}): a newer "
            "studyq upgraded it. Upgrade studyq on this machine."
        )
