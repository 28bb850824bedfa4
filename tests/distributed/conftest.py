"""Fixtures of the distributed tests: real Redis, real PostgreSQL, real ``celery worker``s.

* ``pg_url``: a throwaway database ``studyq_dist_<pid>``, migrated once, dropped at the end.
  Tests never clean it: each registers studies under ids of its own.
* ``store_url`` / ``store``: PostgreSQL, and SQLite where the behaviour under test is the
  same on both (the plain run function).
* ``queue``: a Redis queue name of the test's own, deleted afterwards with kombu's binding.
* ``worker_pair``: two real worker processes (one started as ``celery -A workers.app
  worker``, one as ``studyq worker``), prefork, 2 slots each, shared by the tests of the
  session on one queue; stopped with SIGTERM (SIGKILL if needed) at the end.
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
from dist_services import (
    WorkerPair,
    WorkerProcess,
    create_pg_database,
    drop_pg_database,
    redis_client,
)
from dist_studies import TEST_GRACE_S, Sweep, make_sweep, worker_settings

from orchestrator.store import ResultStore, create_engine_for, upgrade
from workers.app import StudyqCelery, create_app
from workers.runtime import WorkerRuntime

BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(scope="session")
def redis_db() -> redis.Redis:
    return redis_client()


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    name = f"studyq_dist_{os.getpid()}"
    url = create_pg_database(name)
    upgrade(url)
    yield url
    drop_pg_database(name)


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


def _delete_queue(client: redis.Redis, name: str) -> None:
    """The queue and the binding tables kombu keeps for it; nothing else."""
    client.delete(name, f"_kombu.binding.{name}", f"_kombu.binding_permanent.{name}")


@pytest.fixture
def queue(redis_db: redis.Redis) -> Iterator[str]:
    name = f"studyq-test-{uuid.uuid4().hex[:10]}"
    yield name
    _delete_queue(redis_db, name)


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
def publisher(pg_url: str) -> StudyqCelery:
    return create_app(worker_settings(pg_url))


@pytest.fixture(scope="session")
def worker_pair(
    redis_db: redis.Redis, pg_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerPair]:
    queue = f"studyq-pair-{os.getpid()}"
    log_dir = tmp_path_factory.mktemp("worker-logs")
    env = {"STUDYQ_TIME_LIMIT_GRACE_S": str(TEST_GRACE_S), "STUDYQ_SHUTDOWN_GRACE_S": "1"}
    # The second worker gets the URL with a (ignored, trust auth) password to check masking.
    masked_url = pg_url.replace("postgres@", "postgres:hunter2@")
    workers = [
        WorkerProcess(
            f"pair-a-{os.getpid()}", queue=queue, database_url=pg_url, log_dir=log_dir, env=env
        ),
        WorkerProcess(
            f"pair-b-{os.getpid()}",
            queue=queue,
            database_url=masked_url,
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
        _delete_queue(redis_db, queue)


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
