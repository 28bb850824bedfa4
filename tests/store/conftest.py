"""Fixtures for the result-store tests: the same tests on SQLite and on real PostgreSQL.

``store`` is parametrized over both backends (optuna's StorageSupplier pattern). SQLite gets a
fresh file per test, copied from a template migrated once. PostgreSQL gets a throwaway
database ``studyq_test_<pid>_store`` on 127.0.0.1:5432 (from tests/_services.py), created and
migrated once per session, emptied before and after every test, and dropped at the end. When
PostgreSQL cannot be reached the PostgreSQL cases are skipped with the reason, unless ``CI``
is set: then they fail (dramatiq's conftest does the same), so CI can never go green by
silently skipping them.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from _services import ServiceSupplier
from sqlalchemy import Engine

from orchestrator.store import ResultStore, create_engine_for, upgrade
from orchestrator.store.models import Base

BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)]


@pytest.fixture(scope="session")
def pg_url(services: ServiceSupplier) -> Iterator[str]:
    """A migrated throwaway PostgreSQL database for this test session."""
    with services.pg_database("store", migrate=True) as url:
        yield url


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite file migrated once; each test copies it (faster than migrating each time)."""
    path = tmp_path_factory.mktemp("store-template") / "template.db"
    engine = create_engine_for(f"sqlite:///{path}")
    upgrade(engine)
    engine.dispose()  # closing the last connection folds the WAL into the main file
    assert not path.with_name("template.db-wal").exists()
    return path


def _clean(engine: Engine) -> None:
    with engine.begin() as connection:
        for table in reversed(Base.metadata.sorted_tables):
            connection.execute(table.delete())


@pytest.fixture(params=BACKENDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """URL of an empty, migrated store on each backend."""
    if request.param == "sqlite":
        path = tmp_path / "studyq.db"
        shutil.copyfile(request.getfixturevalue("sqlite_template"), path)
        yield f"sqlite:///{path}"
        return
    url: str = request.getfixturevalue("pg_url")
    engine = create_engine_for(url)
    try:
        _clean(engine)
        yield url
        _clean(engine)
    finally:
        engine.dispose()


@pytest.fixture
def store(store_url: str) -> Iterator[ResultStore]:
    """An empty result store on each backend."""
    opened = ResultStore(create_engine_for(store_url))
    yield opened
    opened.close()


@pytest.fixture
def other_store(store_url: str) -> Iterator[ResultStore]:
    """A second store on the same database with its own engine: another process's view."""
    opened = ResultStore(create_engine_for(store_url))
    yield opened
    opened.close()
