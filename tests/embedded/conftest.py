"""Fixtures of the embedded-sweep tests (``studyq run`` on this machine).

* ``db_url``: a SQLite file in the test's own temporary directory, migrated up front so a
  test may poll it while a ``studyq run`` child writes to it.
* ``store_url``: the same on SQLite and on a throwaway PostgreSQL database
  ``studyq_test_<pid>_embedded`` (127.0.0.1:5432, migrated once per session, emptied around
  each test, dropped at the end), the store tests' pattern. The PostgreSQL case is marked
  ``integration``; it is skipped with the reason when PostgreSQL cannot be reached, unless
  ``CI`` is set: then it fails.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from orchestrator.store import ResultStore, create_engine_for, upgrade
from orchestrator.store.models import Base

PG_HOST = "127.0.0.1"
PG_PORT = int(os.environ.get("STUDYQ_TEST_PG_PORT", "5432"))
PG_ADMIN_URL = f"postgresql+psycopg://postgres@{PG_HOST}:{PG_PORT}/postgres"
BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)]


def _pg_admin(statement: str) -> None:
    engine = create_engine(
        PG_ADMIN_URL, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3}
    )
    try:
        with engine.connect() as connection:
            connection.execute(text(statement))
    finally:
        engine.dispose()


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A migrated throwaway PostgreSQL database for this session's embedded tests."""
    name = f"studyq_test_{os.getpid()}_embedded"
    try:
        _pg_admin(f'DROP DATABASE IF EXISTS "{name}"')
        _pg_admin(f'CREATE DATABASE "{name}"')
    except Exception as error:  # any failure to reach the server means "no PostgreSQL here"
        reason = f"PostgreSQL at {PG_HOST}:{PG_PORT} is not usable: {error}".splitlines()[0]
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (CI is set, so PostgreSQL tests must run)")
        pytest.skip(reason)
    url = f"postgresql+psycopg://postgres@{PG_HOST}:{PG_PORT}/{name}"
    upgrade(url)
    yield url
    _pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _empty(url: str) -> None:
    engine = create_engine_for(url)
    try:
        with engine.begin() as connection:
            for table in reversed(Base.metadata.sorted_tables):
                connection.execute(table.delete())
    finally:
        engine.dispose()


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    """A migrated SQLite store in the test's temporary directory."""
    url = f"sqlite:///{tmp_path / 'studyq.db'}"
    ResultStore.open(url).close()
    return url


@pytest.fixture(params=BACKENDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty, migrated store on each backend."""
    if request.param == "sqlite":
        yield request.getfixturevalue("db_url")
        return
    url: str = request.getfixturevalue("pg_url")
    _empty(url)
    yield url
    _empty(url)
