"""Fixtures of the embedded-sweep tests (``studyq run`` on this machine).

* ``db_url``: a SQLite file in the test's own temporary directory, migrated up front so a
  test may poll it while a ``studyq run`` child writes to it.
* ``store_url``: the same on SQLite and on a throwaway PostgreSQL database
  ``studyq_test_<pid>_embedded`` (127.0.0.1:5432, from tests/_services.py; migrated once per
  session, emptied around each test, dropped at the end), the store tests' pattern. The
  PostgreSQL case is marked ``integration``; it is skipped with the reason when PostgreSQL
  cannot be reached, unless ``CI`` is set: then it fails.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from _services import ServiceSupplier

from orchestrator.store import ResultStore, create_engine_for
from orchestrator.store.models import Base

BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)]


@pytest.fixture(scope="session")
def pg_url(services: ServiceSupplier) -> Iterator[str]:
    """A migrated throwaway PostgreSQL database for this session's embedded tests."""
    with services.pg_database("embedded", migrate=True) as url:
        yield url


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
