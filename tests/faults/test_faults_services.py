"""The services restarting mid-sweep: a Redis without persistence (every queued message is
lost) and PostgreSQL (every connection is cut and refused for a while). Each test runs its own
server on a free port, so the machine's shared ones are never touched.

Also here: kombu's way of losing Redis under a consuming connection, replayed step by step on
a real Redis, which killed workers before ``workers/redis_clients.py`` worked around it.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import kombu
import pytest
from fault_bed import Bed
from fault_services import OwnPostgres, OwnRedis, Worker, pg_execute
from kombu.common import ignore_errors
from kombu.transport import redis as kombu_redis

from orchestrator.store import upgrade
from workers.redis_clients import patch_redis_channel

pytestmark = [pytest.mark.integration]


def finish(bed: Bed, coordinator: dict, timeout: float) -> list[str]:
    """Wait for the coordinator thread. If it died, or is still stuck, say so, and finish
    the sweep with a new ``wait`` (what an operator would do) so the audit still runs."""
    coordinator["thread"].join(timeout)
    problems = []
    if coordinator["thread"].is_alive():
        problems.append(f"the coordinator's wait was still running after {timeout} s")
    elif "error" in coordinator:
        error = coordinator["error"]
        problems.append(
            f"the coordinator's wait died mid-sweep with {type(error).__name__}: {error}"
        )
    if problems:
        bed.wait(timeout_s=60)
    return problems


@pytest.mark.redis_only("restarts a Redis of its own")
@pytest.mark.timeout(120)
def test_a_redis_restart_mid_sweep_loses_messages_the_coordinator_publishes_again(
    own_redis: OwnRedis, make_bed
):
    # Given a sweep running on two workers through a Redis of the test's own
    bed: Bed = make_bed(broker_url=own_redis.url)
    workers = bed.workers.start(2)
    bed.submit()
    coordinator = bed.wait_in_background(timeout_s=100)
    bed.wait_for_successes(bed.shape.runs // 4)
    # When Redis is killed and restarted empty (no persistence: every queued message is lost)
    own_redis.restart(down_s=1.0)
    restarted_at = datetime.now(UTC)
    assert bed.broker_backlog() == (0, 0)
    # Then the same two worker processes carry the sweep to its end, with no supervisor:
    # none exits and none is replaced; each lost the broker, reconnected and took runs again
    survive_until_done(workers, coordinator, timeout=90)
    assert bed.workers.started == workers
    for worker in workers:
        assert "Connection to broker lost" in worker.log, f"{worker.name} never lost Redis"
        assert took_runs_since(bed, worker, restarted_at), (
            f"{worker.name} took no run after the restart:\n{worker.log[-3000:]}"
        )
    # Then the coordinator published the runs that were queued again (after
    # queued_timeout_s), survived the restart, and the audit passes
    problems = finish(bed, coordinator, timeout=0)
    bed.audit()
    assert not problems, problems
    report = coordinator["report"]
    assert report.complete and report.republished > 0, report


def survive_until_done(workers: list[Worker], coordinator: dict, timeout: float) -> None:
    """Wait for the coordinator's ``wait``, failing at once if a worker stops: a worker's
    main process that is alive is the one started (its pid is not reaped, so not reused)."""
    deadline = time.monotonic() + timeout
    while True:
        for worker in workers:
            log = worker.log
            assert worker.alive() and "Unrecoverable error" not in log, (
                f"{worker.name} stopped on the Redis restart:\n{log[-4000:]}"
            )
        if not coordinator["thread"].is_alive() or time.monotonic() >= deadline:
            return
        coordinator["thread"].join(0.5)


def took_runs_since(bed: Bed, worker: Worker, since: datetime) -> bool:
    return any(
        worker.owns(attempt.worker) and attempt.started_at > since
        for attempt in bed.store.iter_attempts(bed.study_id)
    )


@dataclass
class LostRedis:
    """A kombu connection left as Celery's consumer leaves it when Redis dies under it."""

    connection: kombu.Connection
    consuming: Any  # the default channel: it holds the unacknowledged messages
    messages: list[kombu.Message]


def lose_redis_under_a_consuming_connection(own_redis: OwnRedis) -> LostRedis:
    """The sequence that killed workers on kombu 5.7.0 (workers/redis_clients.py).

    Two channels consume, as a worker's do (its task queue; the remote-control queue), both
    waiting on ``BRPOP``, and the first holds two messages it has not acknowledged. Redis is
    SIGKILLed, and the connection is ``collect()``-ed as Celery's consumer does on a lost
    connection: closing the first channel fails in ``_brpop_read``, closing the second fails
    the same way and stops ``close_connection``, and the transport is detached anyway.
    """
    connection = kombu.Connection(own_redis.url)
    work = kombu.Queue("work", kombu.Exchange("work", "direct"), routing_key="work")
    idle = kombu.Queue("idle", kombu.Exchange("idle", "direct"), routing_key="idle")
    producer = connection.Producer(serializer="json")
    for number in range(2):
        producer.publish({"n": number}, exchange=work.exchange, routing_key="work", declare=[work])
    consuming = connection.default_channel
    messages: list[kombu.Message] = []
    kombu.Consumer(consuming, [work], callbacks=[lambda _, m: messages.append(m)]).consume()
    second = connection.channel()
    kombu.Consumer(second, [idle], callbacks=[lambda _, m: None]).consume()
    deadline = time.monotonic() + 10
    while len(messages) < 2 and time.monotonic() < deadline:
        connection.drain_events(timeout=1)
    with pytest.raises(socket.timeout):
        connection.drain_events(timeout=0.2)  # leaves both channels waiting on BRPOP
    assert len(messages) == 2 and consuming._in_poll and second._in_poll
    own_redis.kill()
    with contextlib.suppress(Exception):  # as Celery's consumer does
        connection.collect(socket_timeout=1)
    assert not consuming.closed and consuming.connection.client is None
    return LostRedis(connection, consuming, messages)


@pytest.mark.timeout(60)
def test_a_channel_left_open_by_a_lost_connection_closes_with_a_connection_error(
    own_redis: OwnRedis,
):
    # Given the patches workers run with, and a connection that lost Redis as a worker's does
    assert patch_redis_channel() is True
    lost = lose_redis_under_a_consuming_connection(own_redis)
    # When Celery's consumer closes it (ignoring connection errors only)
    ignore_errors(lost.connection, lost.connection.close)
    # Then the channel left open is closed, and an acknowledgement sent on it later fails
    # with a connection error that Celery logs, not an AttributeError that stops the worker
    assert lost.consuming.closed
    errors = kombu_redis.Transport.connection_errors
    with pytest.raises(errors, match="broker connection was closed"):
        lost.messages[0].ack()
    lost.messages[1].ack_log_error(logging.getLogger("test"), errors)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("reuse_sync_clients", [True, False], ids=["client-reused", "kombu-own"])
def test_kombu_still_fails_to_close_that_channel_without_the_workaround(
    own_redis: OwnRedis, monkeypatch: pytest.MonkeyPatch, reuse_sync_clients: bool
):
    """When this fails, kombu fixed it: drop ``refuse_detached_pools`` (redis_clients.py)."""
    # Given kombu's own _connparams (and, once, its own _create_client too: the bug is not
    # studyq's client reuse)
    patch_redis_channel()
    channel_cls: Any = kombu_redis.Channel
    monkeypatch.setattr(channel_cls, "_connparams", channel_cls._connparams.__wrapped__)
    if not reuse_sync_clients:
        monkeypatch.setattr(channel_cls, "_create_client", channel_cls._create_client.__wrapped__)
    lost = lose_redis_under_a_consuming_connection(own_redis)
    # When Celery's consumer closes the connection, then kombu 5.7.0 reads the detached
    # transport's client to build a pool for restoring the unacknowledged messages
    try:
        ignore_errors(lost.connection, lost.connection.close)
    except AttributeError as error:
        assert "hostname" in str(error), error
    else:
        pytest.fail(f"kombu {kombu.__version__} closes the channel: the workaround can go")


@pytest.mark.timeout(120)
def test_a_postgresql_restart_mid_sweep_loses_no_result(own_postgres: OwnPostgres, make_bed):
    # Given a sweep running on two workers against a PostgreSQL of the test's own
    own_postgres_url = own_postgres.url("studyq")
    pg_execute(own_postgres.port, 'CREATE DATABASE "studyq"')
    upgrade(own_postgres_url)
    bed: Bed = make_bed(database_url=own_postgres_url)
    workers = bed.workers.start(2)
    bed.submit()
    coordinator = bed.wait_in_background(timeout_s=100)
    bed.wait_for_successes(bed.shape.runs // 4)
    # When PostgreSQL is restarted (fast shutdown: every session terminated), down for 2 s
    own_postgres.restart(down_s=2.0, mode="fast")
    # Then the workers' writes are retried until they succeed (never by running the agent
    # again), the workers and the coordinator ride out the outage, the sweep completes and
    # the audit passes
    problems = bed.replace_dead_workers(workers)
    problems += finish(bed, coordinator, timeout=90)
    bed.audit()
    assert "database reachable again" in bed.workers.log, bed.workers.tail()
    assert not problems, problems
