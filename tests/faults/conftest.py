"""Fixtures of the fault tests: a test bed per test, and the fault-free reference per session.

* ``references``: the embedded ``run_study`` of each fault study, exported once per session.
* ``pg_template``: a migrated database on the shared PostgreSQL, copied for each test.
* ``live_broker``: the broker of the test's ``transport`` (tests/conftest.py): Redis database 14
  or the session's RabbitMQ vhost, from tests/_services.py.
* ``make_bed``: a :class:`Bed` on given services (the shared PostgreSQL and the ``live_broker`` by
  default, or a test's own Redis / PostgreSQL), with a database and a queue of its own; its
  workers, store and broker keys are cleaned up when the test ends, whatever happened. Every
  test on a bed runs on both transports, unless marked ``redis_only``.
* ``own_redis`` / ``own_postgres``: private servers for the tests that restart them.

Skipped with the reason when a service is missing, failed instead when ``CI`` is set.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from _services import Broker, ServiceSupplier, Transport, pg_database, pg_name
from fault_agents import CALLS_DIR_ENV
from fault_bed import Bed
from fault_services import REDIS_DB, OwnPostgres, OwnRedis, Workers
from fault_study import FAULT_SWEEP, Shape, run_reference

from orchestrator.store import ResultStore

_databases = itertools.count(1)


@pytest.fixture(scope="session")
def live_broker(services: ServiceSupplier, transport: Transport) -> Broker:
    return services.broker(transport, redis_db=REDIS_DB)


@pytest.fixture(scope="session")
def pg_template(services: ServiceSupplier) -> Iterator[str]:
    """A migrated database on the shared server, the template of every test's database."""
    with services.pg_database("faults_template", migrate=True):
        yield pg_name("faults_template")


def _database_from(template: str) -> contextlib.AbstractContextManager[str]:
    return pg_database(f"faults_{next(_databases)}", template=template)


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
    request: pytest.FixtureRequest,
    tmp_path: Path,
    references: Callable[[Shape], Path],
    live_broker: Broker,
) -> Iterator[Callable[..., Bed]]:
    """``make_bed(database_url=None, broker_url=None, shape=FAULT_SWEEP)``: a test bed. A
    database of its own on the shared PostgreSQL unless ``database_url`` names one (a test's
    own server), the test's ``live_broker`` unless ``broker_url`` names a Redis (a test's own).

    Teardown, whatever happened: a coordinator thread still waiting is ended by cancelling
    the study, the workers are stopped, the store closed, then the database and the queue's
    broker keys are removed."""
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
            bed_broker = live_broker if broker_url is None else Broker.redis(broker_url)
            if broker_url is None:
                cleanups.callback(live_broker.forget, queue)
            calls_dir = tmp_path / "calls"
            calls_dir.mkdir(exist_ok=True)
            workers = Workers(
                queue=queue,
                database_url=database_url,
                broker_url=bed_broker.url,
                log_dir=tmp_path,
                env={CALLS_DIR_ENV: str(calls_dir)},
            )
            bed = Bed(
                shape=shape,
                database_url=database_url,
                broker=bed_broker,
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


@pytest.fixture
def bed(make_bed: Callable[..., Bed]) -> Bed:
    """A test bed of the standard fault study on the shared PostgreSQL and the broker."""
    return make_bed()
