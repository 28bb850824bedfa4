"""Reconcile (lost leases, lost messages), cancel and resubmit."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy import text, update
from sqlalchemy.engine import Connection
from store_factories import STUDY_ID, claim, expire_lease, make_result, queue_all, register

from orchestrator.contracts.errors import StoreError, StoreUnavailableError
from orchestrator.contracts.results import ErrorKind, RunStatus
from orchestrator.store import ReconcileReport, ResultStore, recovery
from orchestrator.store.models import RunRow
from orchestrator.store.sqltypes import db_now_plus

POSTGRESQL_ONLY = pytest.mark.parametrize(
    "store_url", [pytest.param("postgresql", marks=pytest.mark.integration)], indirect=True
)
"""Row locks exist only on PostgreSQL (SQLite has one writer holding the whole database)."""


@pytest.fixture
def queued(store: ResultStore) -> ResultStore:
    register(store, 10)
    queue_all(store)
    return store


def test_lease_expiry_is_judged_by_the_database_clock(queued: ResultStore) -> None:
    # Given a run claimed with a one-second lease and another with a long one
    short = claim(queued, 0, lease_s=1.0)
    long = claim(queued, 1, lease_s=3600)
    assert queued.reconcile(STUDY_ID).requeued == 0

    # When the short lease runs out in real time
    time.sleep(1.3)
    report = queued.reconcile(STUDY_ID)

    # Then only that run is requeued and handed back for publishing
    assert (report.requeued, report.failed_lost) == (1, 0)
    assert report.to_publish == [(next(queued.iter_runs(STUDY_ID)).spec, 1)]
    run = queued.find_run(STUDY_ID, 0)
    assert run is not None
    assert (run.status, run.lease_owner, run.attempts_used) == ("queued", None, 1)
    assert queued.heartbeat(short, 60) is False
    assert queued.heartbeat(long, 60) is True


def test_heartbeats_keep_a_run_alive(queued: ResultStore) -> None:
    held = claim(queued, 0, lease_s=0.6)
    for _ in range(3):
        time.sleep(0.3)
        assert queued.heartbeat(held, 0.6) is True
        assert queued.reconcile(STUDY_ID).requeued == 0


def test_lost_runs_fail_after_max_attempts(store: ResultStore) -> None:
    # Given a study that allows two attempts
    register(store, 3, max_attempts=2)
    queue_all(store)

    # When two workers in a row vanish holding run 0
    for worker in ("w1", "w2"):
        held = claim(store, 0, worker=worker)
        expire_lease(store, held)
        report = store.reconcile(STUDY_ID)

    # Then the second expiry fails the run as lost, with a reason, and nothing to publish
    assert (report.requeued, report.failed_lost, report.to_publish) == (0, 1, [])
    run = store.find_run(STUDY_ID, 0)
    assert run is not None
    assert (run.status, run.error_kind, run.error_type) == ("failed", "lost", "LeaseExpired")
    assert run.error_message is not None and "last allowed attempt" in run.error_message
    assert run.ended_at is not None
    history = [(a.attempt, a.worker, a.outcome) for a in store.iter_attempts(STUDY_ID)]
    assert history == [(1, "w1", "lost"), (2, "w2", "lost")]
    assert store.claim_run(STUDY_ID, 0, worker="w3", lease_s=60) is None
    assert [e.error_kind for e in store.top_errors(STUDY_ID)] == ["lost"]


def test_reconcile_touches_only_its_study(store: ResultStore) -> None:
    register(store, 2, study_id="study-a")
    register(store, 2, study_id="other")
    store.mark_queued("other", [0])
    queue_all(store)
    held = claim(store, 0)
    other = store.claim_run("other", 0, worker="w", lease_s=60)
    assert other is not None
    expire_lease(store, held)
    expire_lease(store, other)

    assert store.reconcile("study-a").requeued == 1
    assert store.count_by_status("other")["running"] == 1


def test_queued_runs_nobody_claims_are_republished_once_per_timeout(queued: ResultStore) -> None:
    # Given run 4 was queued long ago (its message was lost) and run 5 just now
    with queued.engine.begin() as connection:
        connection.execute(
            update(RunRow)
            .where(RunRow.study_id == STUDY_ID, RunRow.plan_index != 5)
            .values(queued_at=db_now_plus(-600))
        )
    for index in (0, 1, 2, 3, 6, 7, 8, 9):
        claim(queued, index)

    # When reconciling with a 5-minute queued timeout
    first = queued.reconcile(STUDY_ID, queued_timeout_s=300)
    second = queued.reconcile(STUDY_ID, queued_timeout_s=300)

    # Then run 4 is returned for re-publishing once, not on every pass
    assert (first.stale_queued, [(s.index, a) for s, a in first.to_publish]) == (1, [(4, 0)])
    assert first.changed is True
    assert (second.stale_queued, second.to_publish, second.changed) == (0, [], False)
    assert queued.reconcile(STUDY_ID).stale_queued == 0  # off unless asked for


def test_take_back_without_a_journal_requeues_runs_of_dead_holders_at_once(
    store: ResultStore,
) -> None:
    # Given runs held by a crashed process, a live one, and one on its last attempt
    register(store, 4)
    queue_all(store)
    dead = store.claim_runs(STUDY_ID, [0, 1], worker="embedded:host:111", lease_s=3600)
    live = claim(store, 2, worker="embedded:host:222")
    with store.engine.begin() as connection:  # run 1 has used up its attempts
        connection.execute(
            update(RunRow)
            .where(RunRow.study_id == STUDY_ID, RunRow.plan_index == 1)
            .values(max_attempts=1)
        )

    # When the restarted coordinator recovers orphans (leases still far from expiring)
    report = store.take_back_orphans(
        STUDY_ID, is_dead=lambda owner: owner.endswith(":111"), started_by=_no_journal
    )

    # Then the dead holder's runs are requeued or failed as lost; the live one is untouched
    assert (report.requeued, report.failed_lost) == (1, 1)
    assert [(spec.index, attempt) for spec, attempt in report.to_publish] == [(0, 1)]
    assert [run.status for run in store.iter_runs(STUDY_ID)] == [
        "queued",
        "failed",
        "running",
        "queued",
    ]
    # A late result of the requeued attempt still lands while nobody re-claimed the run (a
    # database outage longer than the lease must not make the agent run twice) ...
    assert store.heartbeat(dead[0], 60) is False
    assert store.finish_run(dead[0], make_result(dead[0])) is True
    assert store.find_run(STUDY_ID, 0).status == "success"  # type: ignore[union-attr]
    assert store.heartbeat(live, 60) is True
    assert store.take_back_orphans(STUDY_ID, is_dead=_any, started_by=_no_journal).requeued == 1
    nothing = store.take_back_orphans(STUDY_ID, is_dead=_none, started_by=_no_journal)
    assert (nothing.released, nothing.requeued, nothing.failed_lost) == (0, 0, 0)
    assert nothing.to_publish == []


def _no_journal(owner: str) -> None:
    """No start journal: every claim of a dead owner counts as started."""


def _any(owner: str) -> bool:
    return True


def _none(owner: str) -> bool:
    return False


def test_cancel_stops_everything_unfinished(queued: ResultStore) -> None:
    done = claim(queued, 0)
    queued.finish_run(done, make_result(done))
    running = claim(queued, 1)

    assert queued.cancel(STUDY_ID) == 9
    assert queued.cancel(STUDY_ID) == 0

    counts = queued.count_by_status(STUDY_ID)
    assert (counts["success"], counts["cancelled"]) == (1, 9)
    assert queued.heartbeat(running, 60) is False
    assert queued.finish_run(running, make_result(running)) is False
    assert queued.claim_run(STUDY_ID, 2, worker="w", lease_s=60) is None
    run = queued.find_run(STUDY_ID, 1)
    assert run is not None and run.error_kind == "cancelled"
    outcomes = [(a.index, a.outcome) for a in queued.iter_attempts(STUDY_ID)]
    assert outcomes == [(0, "success"), (1, "cancelled")]


def _finish_all(store: ResultStore) -> None:
    """Runs 0-3 fail with a timeout, 4-5 with a ValueError, the rest succeed."""
    for held in store.claim_runs(STUDY_ID, list(range(10)), worker="w", lease_s=60):
        if held.index < 4:
            result = make_result(
                held,
                RunStatus.FAILED,
                error_kind=ErrorKind.TIMEOUT,
                error_type="RunTimeoutError",
                error_message="exceeded 30 s",
            )
        elif held.index < 6:
            result = make_result(
                held, RunStatus.FAILED, error_type="ValueError", error_message="Content filter"
            )
        else:
            result = make_result(held)
        assert store.finish_run(held, result) is True


def test_resubmit_by_error_text(queued: ResultStore) -> None:
    _finish_all(queued)

    assert queued.requeue_for_resubmit(STUDY_ID, error_contains="TIMEOUT") == 4

    counts = queued.count_by_status(STUDY_ID)
    assert (counts["planned"], counts["failed"], counts["success"]) == (4, 2, 4)
    assert [spec.index for spec, _ in queued.queue_next(STUDY_ID)] == [0, 1, 2, 3]
    run = queued.find_run(STUDY_ID, 0)
    assert run is not None
    assert (run.attempt, run.attempts_used, run.error_kind, run.outputs) == (1, 0, None, None)
    # Their evaluations and events are gone; the attempt history stays.
    assert {e.index for e in queued.iter_evaluations(STUDY_ID)} == {4, 5, 6, 7, 8, 9}
    assert {e.index for e in queued.iter_events(STUDY_ID)} == {4, 5, 6, 7, 8, 9}
    assert len(list(queued.iter_attempts(STUDY_ID))) == 10


def test_resubmitted_runs_run_again_with_a_fresh_budget(store: ResultStore) -> None:
    register(store, 1, max_attempts=1)
    queue_all(store)
    held = claim(store, 0)
    expire_lease(store, held)
    assert store.reconcile(STUDY_ID).failed_lost == 1

    assert store.requeue_for_resubmit(STUDY_ID, error_contains="lost") == 1
    assert queue_all(store) == 1
    again = claim(store, 0)

    assert again.attempt == 2
    assert store.finish_run(held, make_result(held)) is False
    assert store.finish_run(again, make_result(again)) is True


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        ({"condition_id": "cond-aaaa"}, 3),  # failed runs 0, 2, 4
        ({"agent": "agent-y"}, 2),  # runs 2, 3
        ({"temperature": 0.7}, 3),  # runs 1, 3, 5 (a factor level, compared as JSON)
        ({"temperature": "0.7"}, 0),  # the string is another level
        ({"prompt": "short", "replicate": 2}, 2),  # runs 4, 5
        ({"run_id": ["run-0000", "run-0005", "run-0009"]}, 2),
        ({"error_type": "ValueError"}, 2),
    ],
)
def test_resubmit_filters(queued: ResultStore, where: dict[str, object], expected: int) -> None:
    _finish_all(queued)

    assert queued.requeue_for_resubmit(STUDY_ID, where=where) == expected


def test_resubmit_by_status(queued: ResultStore) -> None:
    _finish_all(queued)

    moved = queued.requeue_for_resubmit(STUDY_ID, statuses=["success", RunStatus.FAILED])

    assert moved == 10
    assert queued.count_by_status(STUDY_ID)["planned"] == 10


def test_unfinished_runs_cannot_be_resubmitted(queued: ResultStore) -> None:
    with pytest.raises(StoreError, match="Only finished runs"):
        queued.requeue_for_resubmit(STUDY_ID, statuses=["running"])
    with pytest.raises(ValueError):
        queued.requeue_for_resubmit(STUDY_ID, statuses=["bogus"])


def test_a_late_result_is_refused_once_the_run_was_claimed_again(store: ResultStore) -> None:
    # Given a run whose lease expired and that the reconcile loop requeued
    register(store, 1)
    queue_all(store)
    first = claim(store, 0, worker="w1")
    expire_lease(store, first)
    assert store.reconcile(STUDY_ID).requeued == 1

    # When another worker claims it before the first worker's result arrives
    second = claim(store, 0, worker="w2")

    # Then the first worker's late result is refused, and the second one's lands
    assert store.finish_run(first, make_result(first)) is False
    assert store.finish_run(second, make_result(second)) is True


@contextmanager
def frozen_session(store: ResultStore, sql: str, **params: object) -> Iterator[Connection]:
    """Another session that ran ``sql`` (taking its locks) and then went silent inside its
    transaction, as a worker stopped between a statement and its COMMIT; rolled back on exit.
    """
    with store.engine.connect() as connection:
        transaction = connection.begin()
        try:
            connection.execute(text(sql), {"s": STUDY_ID, **params})
            yield connection
        finally:
            transaction.rollback()


def _indices(report: ReconcileReport) -> list[int]:
    return [spec.index for spec, _ in report.to_publish]


@POSTGRESQL_ONLY
@pytest.mark.timeout(60)
def test_a_row_locked_by_a_frozen_worker_does_not_stall_the_expiry_of_the_others(
    queued: ResultStore,
) -> None:
    # Given three runs whose leases expired, one of them (run 1, on its last attempt) and
    # another (run 2) row-locked by sessions frozen inside their transactions
    for index in (0, 1, 2, 3):
        expire_lease(queued, claim(queued, index, worker=f"w{index}"))
    with queued.engine.begin() as connection:
        connection.execute(
            update(RunRow)
            .where(RunRow.study_id == STUDY_ID, RunRow.plan_index.in_([1, 3]))
            .values(max_attempts=1)
        )
    lock = "SELECT 1 FROM runs WHERE study_id = :s AND plan_index = :i FOR UPDATE"
    with frozen_session(queued, lock, i=1), frozen_session(queued, lock, i=2):
        # When the coordinator reconciles
        started = time.monotonic()
        report = queued.reconcile(STUDY_ID)
        elapsed = time.monotonic() - started

        # Then it returns at once, having requeued run 0 and failed run 3 (both unlocked);
        # the locked runs are left as they were
        assert elapsed < 2.0, f"reconcile waited {elapsed:.1f} s on a locked row"
        assert (report.requeued, report.failed_lost, _indices(report)) == (1, 1, [0])
        statuses = [run.status for run in queued.iter_runs(STUDY_ID)][:4]
        assert statuses == ["queued", "running", "running", "failed"]

    # And once the frozen sessions are gone, the next pass judges the runs they held
    later = queued.reconcile(STUDY_ID)
    assert (later.requeued, later.failed_lost, _indices(later)) == (1, 1, [2])
    history = sorted((a.index, a.outcome) for a in queued.iter_attempts(STUDY_ID))
    assert history == [(0, "lost"), (1, "lost"), (2, "lost"), (3, "lost")]


@POSTGRESQL_ONLY
@pytest.mark.timeout(60)
def test_a_stale_queued_row_locked_by_a_claim_in_progress_is_skipped(queued: ResultStore) -> None:
    # Given every run queued long ago (their messages presumably lost), and a worker frozen
    # in the middle of claiming run 4 (its row locked)
    with queued.engine.begin() as connection:
        connection.execute(
            update(RunRow).where(RunRow.study_id == STUDY_ID).values(queued_at=db_now_plus(-600))
        )
    lock = "UPDATE runs SET lease_owner = 'frozen' WHERE study_id = :s AND plan_index = :i"
    with frozen_session(queued, lock, i=4):
        # When the coordinator looks for stale queued runs
        started = time.monotonic()
        report = queued.reconcile(STUDY_ID, queued_timeout_s=300)

        # Then it returns at once with every stale run but the locked one
        assert time.monotonic() - started < 2.0
        assert _indices(report) == [0, 1, 2, 3, 5, 6, 7, 8, 9]
    # And the next pass past the timeout finds the one it skipped
    assert _indices(queued.reconcile(STUDY_ID, queued_timeout_s=300)) == [4]


@POSTGRESQL_ONLY
@pytest.mark.timeout(60)
def test_a_reconcile_waits_on_any_other_lock_no_longer_than_its_lock_timeout(
    queued: ResultStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a session that holds the whole runs table locked (a migration, a LOCK TABLE)
    monkeypatch.setattr(recovery, "RECONCILE_LOCK_TIMEOUT_MS", 200)
    expire_lease(queued, claim(queued, 0))
    with frozen_session(queued, "LOCK TABLE runs IN ACCESS EXCLUSIVE MODE"):
        # When the coordinator reconciles
        started = time.monotonic()
        # Then the pass fails as retryable after the lock timeout instead of hanging
        with pytest.raises(StoreUnavailableError, match="lock timeout"):
            queued.reconcile(STUDY_ID)
        assert time.monotonic() - started < 5.0
    # And the next pass, with the lock gone, does its work
    assert queued.reconcile(STUDY_ID).requeued == 1


@POSTGRESQL_ONLY
def test_the_lock_timeout_lasts_only_for_the_reconcile_transaction(store: ResultStore) -> None:
    register(store, 1)
    with store.engine.connect() as connection:
        # Given a reconcile pass in a transaction
        with connection.begin():
            recovery.reconcile(connection, STUDY_ID)
            # Then its statements run with the lock timeout
            assert connection.execute(text("SHOW lock_timeout")).scalar_one() == "5s"
        # And the connection, back in the pool, has the server's default (none) again
        assert connection.execute(text("SHOW lock_timeout")).scalar_one() == "0"
        connection.rollback()
