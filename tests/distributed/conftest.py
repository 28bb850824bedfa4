"""Fixtures of the distributed tests: real PostgreSQL, a real broker, real ``celery worker``s.
The services come from tests/_services.py (the ``services`` fixture of tests/conftest.py).

* ``pg_url``: a throwaway database ``studyq_test_<pid>_dist``, migrated once, dropped at the
  end. Tests never clean it: each registers studies under ids of its own.
* ``store_url`` / ``store``: PostgreSQL, and SQLite where the behaviour under test is the
  same on both (the plain run function).
* ``live_broker``: the broker of the test's ``transport``, Redis database 15 or the session's
  RabbitMQ vhost: every test that uses it (through ``queue``, ``publisher``,
  ``worker_pair``...) runs on both, unless marked ``redis_only``. ``redis_db``: a client on
  Redis database 15, for the tests that read Redis itself (they are ``redis_only``).
* ``queue``: a queue name of the test's own, removed from the broker afterwards.
* ``worker_pair``: two real worker processes per transport (one started as ``celery -A
  workers.app worker``, one as ``studyq worker``), prefork, 2 slots each, shared by the tests
  of the session on one queue; stopped with SIGTERM (SIGKILL if needed) at the end.
* ``publisher``: the app the tests publish with (``create_app`` on the same settings).

Skipped with the reason when a service is down, failed instead when ``CI`` is set.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from _services import Broker, ServiceSupplier, Transport
from dist_services import REDIS_DB, WorkerPair, WorkerProcess
from dist_studies import TEST_GRACE_S, Sweep, make_sweep, worker_settings

from orchestrator.store import ResultStore, create_engine_for
from workers.app import StudyqCelery, create_app
from workers.runtime import WorkerRuntime

BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(scope="session")
def live_broker(services: ServiceSupplier, transport: Transport) -> Broker:
    return services.broker(transport, redis_db=REDIS_DB)


@pytest.fixture(scope="session")
def redis_db(services: ServiceSupplier) -> redis.Redis:
    return services.redis(REDIS_DB)


@pytest.fixture(scope="session")
def pg_url(services: ServiceSupplier) -> Iterator[str]:
    with services.pg_database("dist", migrate=True) as url:
        yield url


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("dist-template") / "template.db"
    ResultStore.open(f"sqlite:///{path}").close()
    return path


@pytest.fixture(params=BACKENDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        path = tmp_path / "studyq.db"
        shutil.copyfile(request.getfixturevalue("sqlite_template"), path)
        return f"sqlite:///{path}"
    url: str = request.getfixturevalue("pg_url")
    return url


@pytest.fixture
def store(store_url: str) -> Iterator[ResultStore]:
    opened = ResultStore(create_engine_for(store_url))
    yield opened
    opened.close()


@pytest.fixture
def pg_store(pg_url: str) -> Iterator[ResultStore]:
    opened = ResultStore(create_engine_for(pg_url))
    yield opened
    opened.close()


@pytest.fixture
def queue(live_broker: Broker) -> Iterator[str]:
    name = f"studyq-test-{uuid.uuid4().hex[:10]}"
    yield name
    live_broker.forget(name)


@pytest.fixture
def sweep(store: ResultStore) -> Callable[..., Sweep]:
    """``sweep(agents=[...], ...)`` registers a queued study in ``store``."""

    def build(**options: Any) -> Sweep:
        return make_sweep(store, **options)

    return build


@pytest.fixture
def runtime_for() -> Iterator[Callable[..., WorkerRuntime]]:
    """``runtime_for(store, **settings)``: a worker runtime on an existing store."""
    made: list[WorkerRuntime] = []

    def build(
        store: ResultStore, *, worker: str = "test@host:1", **overrides: Any
    ) -> WorkerRuntime:
        url = store.engine.url.render_as_string(hide_password=False)
        runtime = WorkerRuntime(worker_settings(url, **overrides), worker=worker, store=store)
        made.append(runtime)
        return runtime

    yield build


@pytest.fixture(scope="session")
def publisher(pg_url: str, live_broker: Broker) -> StudyqCelery:
    return create_app(worker_settings(pg_url, broker_url=live_broker.url))


@pytest.fixture(scope="session")
def worker_pair(
    live_broker: Broker, pg_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerPair]:
    queue = f"studyq-pair-{os.getpid()}"
    log_dir = tmp_path_factory.mktemp(f"worker-logs-{live_broker.kind}")
    env = {"STUDYQ_TIME_LIMIT_GRACE_S": str(TEST_GRACE_S), "STUDYQ_SHUTDOWN_GRACE_S": "1"}
    # The second worker gets the URL with a (ignored, trust auth) password to check masking.
    masked_url = pg_url.replace("postgres@", "postgres:hunter2@")
    workers = [
        WorkerProcess(
            f"pair-a-{os.getpid()}",
            queue=queue,
            database_url=pg_url,
            broker_url=live_broker.url,
            log_dir=log_dir,
            env=env,
        ),
        WorkerProcess(
            f"pair-b-{os.getpid()}",
            queue=queue,
            database_url=masked_url,
            broker_url=live_broker.url,
            log_dir=log_dir,
            env=env,
            via_cli=True,
        ),
    ]
    try:
        for worker in workers:
            worker.wait_ready()
        yield WorkerPair(queue, workers)
    finally:
        for worker in workers:
            worker.terminate()
        live_broker.forget(queue)


@pytest.fixture(autouse=True)
def fresh_agents() -> Iterator[None]:
    """The test agents' module state, reset around every test."""
    import dist_agents

    dist_agents.calls.clear()
    dist_agents.during.clear()
    dist_agents.gate.clear()
    yield
    dist_agents.gate.set()  # never leave a waiting agent behind
    dist_agents.during.clear()
