"""Fixtures of the fault tests: a test bed per test, and the fault-free reference per session.

* ``references``: the embedded ``run_study`` of each fault study, exported once per session.
* ``pg_template``: a migrated database on the shared PostgreSQL, copied for each test.
* ``make_bed``: a :class:`Bed` on given services (the shared ones by default, or a test's own
  Redis / PostgreSQL), with a database and a queue of its own; its workers, store and Redis
  keys are cleaned up when the test ends, whatever happened.
* ``own_redis`` / ``own_postgres``: private servers for the tests that restart them.

Skipped with the reason when a service is missing, failed instead when ``CI`` is set.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from fault_agents import CALLS_DIR_ENV
from fault_bed import Bed, forget_queue
from fault_services import (
    SHARED_PG_PORT,
    OwnPostgres,
    OwnRedis,
    Workers,
    check_shared_pg,
    pg_execute,
    pg_url,
    shared_broker_url,
    shared_redis,
)
from fault_study import FAULT_SWEEP, Shape, run_reference

from orchestrator.store import ResultStore, upgrade

_databases = itertools.count(1)


@pytest.fixture(scope="session")
def pg_template() -> Iterator[str]:
    """A migrated database on the shared server, the template of every test's database."""
    check_shared_pg()
    name = f"studyq_faults_template_{os.getpid()}"
    pg_execute(SHARED_PG_PORT, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)',
               f'CREATE DATABASE "{name}"')  # fmt: skip
    upgrade(pg_url(SHARED_PG_PORT, name))
    yield name
    pg_execute(SHARED_PG_PORT, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def _database_from(template: str) -> Iterator[str]:
    name = f"studyq_faults_{os.getpid()}_{next(_databases)}"
    pg_execute(SHARED_PG_PORT, f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    try:
        yield pg_url(SHARED_PG_PORT, name)
    finally:
        pg_execute(SHARED_PG_PORT, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def references(
    tmp_path_factory: pytest.TempPathFactory, pg_template: str
) -> Callable[[Shape], Path]:
    """``references(shape)``: the fault-free artifacts of that study, computed once per
    session by the embedded ``run_study`` on PostgreSQL, the store the sweeps use (the
    embedded default, SQLite, exports some values differently: see
    test_faults_reference.py)."""
    made: dict[Shape, Path] = {}
    lock = threading.Lock()

    def get(shape: Shape) -> Path:
        with lock:
            if shape not in made:
                with _database_from(pg_template) as url:
                    made[shape] = run_reference(shape, tmp_path_factory.mktemp("reference"), url)
            return made[shape]

    return get


@pytest.fixture
def shared_database(pg_template: str) -> Iterator[str]:
    """A fresh, migrated database of this test's own on the shared PostgreSQL."""
    with _database_from(pg_template) as url:
        yield url


@pytest.fixture
def own_redis() -> Iterator[OwnRedis]:
    server = OwnRedis()
    yield server
    server.close()


@pytest.fixture
def own_postgres() -> Iterator[OwnPostgres]:
    server = OwnPostgres()
    yield server
    server.close()


@pytest.fixture
def make_bed(
    request: pytest.FixtureRequest, tmp_path: Path, references: Callable[[Shape], Path]
) -> Iterator[Callable[..., Bed]]:
    """``make_bed(database_url=None, broker_url=None, shape=FAULT_SWEEP)``: a test bed. A
    database of its own on the shared PostgreSQL unless ``database_url`` names one (a test's
    own server), the shared Redis unless ``broker_url`` names one.

    Teardown, whatever happened: a coordinator thread still waiting is ended by cancelling
    the study, the workers are stopped, the store closed, then the database and the queue's
    Redis keys are removed."""
    beds: list[Bed] = []
    with contextlib.ExitStack() as cleanups:

        def build(
            *,
            database_url: str | None = None,
            broker_url: str | None = None,
            shape: Shape = FAULT_SWEEP,
        ) -> Bed:
            reference = references(shape)
            queue = f"studyq-faults-{uuid.uuid4().hex[:10]}"
            if database_url is None:
                template = request.getfixturevalue("pg_template")
                database_url = cleanups.enter_context(_database_from(template))
            if broker_url is None:
                client = shared_redis()
                broker_url = shared_broker_url()
                cleanups.callback(_quietly, forget_queue, client, queue)
            calls_dir = tmp_path / "calls"
            calls_dir.mkdir(exist_ok=True)
            workers = Workers(
                queue=queue,
                database_url=database_url,
                broker_url=broker_url,
                log_dir=tmp_path,
                env={CALLS_DIR_ENV: str(calls_dir)},
            )
            bed = Bed(
                shape=shape,
                database_url=database_url,
                broker_url=broker_url,
                queue=queue,
                tmp=tmp_path,
                workers=workers,
                store=test_store(database_url),
                reference=reference,
                calls_dir=calls_dir,
            )
            cleanups.callback(bed.close)
            beds.append(bed)
            return bed

        yield build


def test_store(database_url: str) -> ResultStore:
    """The test's own view of the store. Its statements give up instead of waiting forever
    on a lock (a frozen worker can hold one), so the test process itself never hangs in a
    database call, where pytest-timeout's signal cannot reach it."""
    return ResultStore.open(
        database_url,
        connect_args={"options": "-c lock_timeout=10000 -c statement_timeout=30000"},
    )


def _quietly(function: Callable[..., object], *args: object) -> None:
    with contextlib.suppress(redis.RedisError):
        function(*args)


@pytest.fixture
def bed(make_bed: Callable[..., Bed]) -> Bed:
    """A test bed of the standard fault study on the shared PostgreSQL and Redis."""
    return make_bed()
