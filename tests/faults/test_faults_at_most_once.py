"""At most once: PostgreSQL killed -9 right after runs were claimed.

By default a claim commits asynchronously (no wait for the WAL flush: it is a worker's most
frequent write), so a database crash can forget the claims of its last moments; the runs are
then queued again and their agents run a second time. With ``at_most_once`` a claim is
durable before the agent starts, so the crash forgets nothing and no agent runs twice. Both
tests crash the same way; the first is the control that shows the second can fail.

The server's ``wal_writer_delay`` is 10 s, so asynchronously committed WAL stays in the
server's memory until the crash (no other write flushes it: the runs are all claimed, and
all still running, when it comes).
"""

from __future__ import annotations

from collections import Counter

import pytest
from fault_bed import Bed
from fault_services import OwnPostgres, pg_execute, wait_until
from fault_study import Shape

from orchestrator.store import upgrade

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

CRASH_SWEEP = Shape(arms=2, replicates=2, sleep_s=1.5)
"""Four runs of 1.5 s, all executing at once on one worker of four slots."""


@pytest.fixture
def lazy_wal_postgres() -> OwnPostgres:
    server = OwnPostgres("wal_writer_delay=10000")
    yield server
    server.close()


def crash_right_after_claims(server: OwnPostgres, make_bed, *, at_most_once: bool) -> Bed:
    """Submit the sweep, kill -9 PostgreSQL once all four runs are claimed and their agents
    started, start it again, and let the sweep finish."""
    url = server.url("studyq")
    pg_execute(server.port, 'CREATE DATABASE "studyq"')
    upgrade(url)
    bed: Bed = make_bed(database_url=url, shape=CRASH_SWEEP)
    # Leases far longer than the outage: only a forgotten claim can bring a run back.
    bed.workers.env.update(
        {"STUDYQ_LEASE_S": "60", "STUDYQ_AT_MOST_ONCE": "true" if at_most_once else "false"}
    )
    bed.workers.start(1, concurrency=4)
    bed.submit()
    wait_until(lambda: len(bed.running()) == 4, 30, "four runs claimed")
    wait_until(lambda: len(bed.calls()) == 4, 10, "four agents started")
    bed.store.engine.dispose()  # the test's own connections go with the server
    server.kill9()
    server.start()
    bed.wait(timeout_s=60)
    return bed


def test_without_at_most_once_a_crash_can_forget_claims_and_agents_run_again(
    lazy_wal_postgres: OwnPostgres, make_bed
):
    # Given a sweep whose claims commit asynchronously (the default)
    # When PostgreSQL is killed -9 right after the four runs were claimed
    bed = crash_right_after_claims(lazy_wal_postgres, make_bed, at_most_once=False)
    # Then the sweep completes, but the forgotten claims made agents run a second time
    assert bed.counts()["success"] == 4
    calls = Counter(bed.calls())
    assert max(calls.values()) == 2, calls


def test_with_at_most_once_no_agent_runs_twice_after_a_crash(
    lazy_wal_postgres: OwnPostgres, make_bed
):
    # Given a sweep on a worker with STUDYQ_AT_MOST_ONCE: claims are durable
    # When PostgreSQL is killed -9 right after the four runs were claimed
    bed = crash_right_after_claims(lazy_wal_postgres, make_bed, at_most_once=True)
    # Then every run succeeds on its first claim and every agent ran exactly once
    bed.audit()
    runs = list(bed.store.iter_runs(bed.study_id))
    assert {(run.status, run.attempt) for run in runs} == {("success", 1)}
    calls = Counter(bed.calls())
    assert sorted(calls) == sorted(run.seed for run in runs)
    assert set(calls.values()) == {1}, calls
