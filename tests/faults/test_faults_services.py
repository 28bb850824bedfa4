"""The services restarting mid-sweep: a Redis without persistence (every queued message is
lost) and PostgreSQL (every connection is cut and refused for a while). Each test runs its own
server on a free port, so the machine's shared ones are never touched.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest
from fault_bed import Bed
from fault_services import OwnPostgres, OwnRedis, pg_execute

from orchestrator.store import upgrade

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


@pytest.mark.xfail(
    strict=False,
    reason="kombu 5.7.0 can kill a worker while it closes the lost Redis channel "
    "(AttributeError in kombu/transport/redis.py _connparams); the test replaces the worker "
    "but the run is flaky until kombu is fixed or pinned",
)
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
    # Then the same workers reconnect and take runs again (a worker that died instead is
    # reported, and replaced so the sweep can finish), the coordinator publishes the runs
    # that were queued again (after queued_timeout_s), the sweep completes, the audit passes
    time.sleep(3)  # reconnecting takes a second or two; dying on it takes less
    problems = bed.replace_dead_workers(workers)
    problems += finish(bed, coordinator, timeout=90)
    bed.audit()
    assert not problems, problems
    report = coordinator["report"]
    assert report.complete and report.republished > 0, report
    for worker in workers:
        assert any(
            worker.owns(attempt.worker) and attempt.started_at > restarted_at
            for attempt in bed.store.iter_attempts(bed.study_id)
        ), f"{worker.name} took no run after the restart:\n{worker.log[-3000:]}"


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
