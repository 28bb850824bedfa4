"""Migrations: upgrade from empty, models match the scripts, and the open() policy."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text
from store_pg import create_pg_database, drop_pg_database

from orchestrator.contracts.errors import StoreError
from orchestrator.store import (
    ResultStore,
    create_engine_for,
    current_revision,
    head_revision,
    is_current,
    upgrade,
)
from orchestrator.store.engine import transaction
from orchestrator.store.models import Base
from orchestrator.store.schema import VERSION_TABLE, alembic_config

TABLES = {"studies", "conditions", "runs", "run_attempts", "evaluations", "events"}


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database with nothing in it."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'empty.db'}"
        return
    name = f"studyq_test_{os.getpid()}_empty"
    yield create_pg_database(name)
    drop_pg_database(name)


def test_upgrade_from_empty_reaches_head(empty_url: str) -> None:
    assert current_revision(empty_url) is None
    assert is_current(empty_url) is False

    assert upgrade(empty_url) == head_revision()

    assert current_revision(empty_url) == head_revision()
    assert is_current(empty_url) is True
    assert upgrade(empty_url) == head_revision()  # idempotent
    engine = create_engine_for(empty_url)
    try:
        with engine.connect() as connection:
            assert TABLES | {VERSION_TABLE} <= set(inspect(connection).get_table_names())
    finally:
        engine.dispose()


def test_downgrade_to_base_and_back(empty_url: str) -> None:
    upgrade(empty_url)
    engine = create_engine_for(empty_url)
    try:
        with transaction(engine) as connection:
            command.downgrade(alembic_config(connection), "base")
        with engine.connect() as connection:
            assert not TABLES & set(inspect(connection).get_table_names())
        assert current_revision(engine) is None
        assert upgrade(engine) == head_revision()
    finally:
        engine.dispose()


def test_models_match_the_migrations(store_url: str) -> None:
    # If this fails, a model changed without a migration: write one (alembic revision
    # --autogenerate with script_location orchestrator/store/migrations).
    engine = create_engine_for(store_url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(
                connection, opts={"compare_type": True, "version_table": VERSION_TABLE}
            )
            differences = compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()
    assert differences == []


def test_open_creates_an_embedded_store(tmp_path: Path) -> None:
    path = tmp_path / "new" / "dir" / "studyq.db"

    with ResultStore.open(f"sqlite:///{path}") as store:
        assert store.list_studies() == []
        assert store.url == f"sqlite:///{path}"

    assert is_current(f"sqlite:///{path}")


@pytest.mark.integration
def test_open_refuses_a_postgres_database_without_the_schema() -> None:
    name = f"studyq_test_{os.getpid()}_noschema"
    url = create_pg_database(name)
    try:
        with pytest.raises(StoreError, match="studyq db upgrade") as caught:
            ResultStore.open(url)
        assert "no studyq schema" in str(caught.value)
        assert current_revision(url) is None  # and it did not migrate behind our back
    finally:
        drop_pg_database(name)


def test_open_refuses_a_schema_from_a_newer_studyq(store_url: str) -> None:
    engine = create_engine_for(store_url)
    try:
        with transaction(engine) as connection:
            connection.execute(text(f"UPDATE {VERSION_TABLE} SET version_num = 'ffff'"))
        # Neither the SQLite auto-upgrade nor the PostgreSQL check may touch it.
        with pytest.raises(StoreError, match="newer studyq"):
            ResultStore.open(store_url)
        with pytest.raises(StoreError, match="Upgrade studyq"):
            upgrade(store_url)
        assert current_revision(store_url) == "ffff"
    finally:
        with transaction(engine) as connection:
            connection.execute(
                text(f"UPDATE {VERSION_TABLE} SET version_num = :v"), {"v": head_revision()}
            )
        engine.dispose()


def test_open_postgres_at_head_works(store_url: str) -> None:
    with ResultStore.open(store_url) as store:
        assert store.list_studies() == []
