"""Cancelling a study in the store: what stops, what finishes, and no wait on a frozen worker.

``cancel_study`` without ``terminate`` cancels planned and queued runs and leaves running
ones to finish (their results are recorded, and nothing later undoes them); with
``terminate`` running runs are cancelled too. On PostgreSQL a row a (frozen) worker holds
locked is skipped and reported, never waited for; ``studyq cancel`` tries again, then says so.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Connection
from store_factories import STUDY_ID, claim, make_result, queue_all, register

from orchestrator import distributed
from orchestrator.cli import main as studyq_main
from orchestrator.contracts.settings import Settings
from orchestrator.store import Claim, ResultStore, create_engine_for
from orchestrator.store.engine import transaction
from orchestrator.store.recovery import CancelReport, cancel_study

ONLY_POSTGRES = pytest.mark.parametrize(
    "store_url", [pytest.param("postgresql", marks=pytest.mark.integration)], indirect=True
)


@dataclass
class Bed:
    """10 queued runs; run 0 finished, runs 1 and 2 running (their claims)."""

    store: ResultStore
    running: dict[int, Claim]


@pytest.fixture
def bed(store: ResultStore) -> Bed:
    register(store, 10)
    queue_all(store)
    done = claim(store, 0)
    assert store.finish_run(done, make_result(done))
    return Bed(store, {index: claim(store, index) for index in (1, 2)})


def _cancel(store: ResultStore, *, terminate: bool) -> CancelReport:
    with transaction(store.engine) as connection:
        return cancel_study(connection, STUDY_ID, terminate=terminate)


def test_cancel_leaves_running_runs_to_finish_and_records_their_results(bed: Bed) -> None:
    queued, running = bed.store, list(bed.running.values())
    # When the study is cancelled without terminate
    report = _cancel(queued, terminate=False)
    # Then the 7 queued runs are cancelled, the 2 running ones keep their lease
    assert (report.cancelled, report.running, report.locked, report.terminated) == (7, 2, 0, [])
    assert all(queued.heartbeat(claim, 60) for claim in running)
    assert queued.claim_run(STUDY_ID, 3, worker="w2", lease_s=60) is None
    # and their results are recorded when they finish, with their attempts
    assert queued.finish_run(running[0], make_result(running[0]))
    assert queued.finish_run(running[1], make_result(running[1], score=0.9))
    counts = queued.count_by_status(STUDY_ID)
    assert (counts["success"], counts["cancelled"], counts["running"]) == (3, 7, 0)
    assert len(list(queued.iter_evaluations(STUDY_ID))) == 3 * 2
    outcomes = sorted((a.index, a.outcome) for a in queued.iter_attempts(STUDY_ID))
    assert outcomes == [(0, "success"), (1, "success"), (2, "success")]


def test_nothing_after_a_cancel_brings_the_study_back(bed: Bed) -> None:
    """Reconcile (even with every queued run stale) publishes nothing, a second cancel
    changes nothing, and a run finished after the cancel stays recorded."""
    queued, running = bed.store, [bed.running[1]]
    _cancel(queued, terminate=False)
    assert queued.finish_run(running[0], make_result(running[0]))
    before = queued.count_by_status(STUDY_ID)
    report = queued.reconcile(STUDY_ID, queued_timeout_s=0)
    assert (report.changed, report.to_publish) == (False, [])
    assert _cancel(queued, terminate=False).cancelled == 0
    assert queued.queue_next(STUDY_ID) == []
    assert queued.count_by_status(STUDY_ID) == before
    run = queued.find_run(STUDY_ID, 1)
    assert run is not None and (run.status, run.error_kind) == ("success", None)


def test_terminate_cancels_running_runs_and_refuses_their_results(bed: Bed) -> None:
    queued, running = bed.store, list(bed.running.values())
    report = _cancel(queued, terminate=True)
    assert (report.cancelled, report.running, report.locked) == (9, 0, 0)
    assert [(spec.index, attempt) for spec, attempt in report.terminated] == [(1, 1), (2, 1)]
    assert not any(queued.heartbeat(claim, 60) for claim in running)
    assert queued.finish_run(running[0], make_result(running[0])) is False
    run = queued.find_run(STUDY_ID, 1)
    assert run is not None and (run.status, run.outputs) == ("cancelled", None)
    assert "while it ran" in (run.error_message or "")
    outcomes = sorted((a.index, a.outcome) for a in queued.iter_attempts(STUDY_ID))
    assert outcomes == [(0, "success"), (1, "cancelled"), (2, "cancelled")]


def test_terminate_without_a_broker_cancels_in_the_store_alone(bed: Bed, store_url: str) -> None:
    """An embedded study has no broker to revoke tasks on: the heartbeat stops its runs."""
    settings = Settings(database_url=store_url, broker_url=None)
    report = distributed.cancel(STUDY_ID, terminate=True, db=store_url, settings=settings)
    assert (report.cancelled, len(report.terminated), report.locked) == (9, 2, 0)
    assert not any(bed.store.heartbeat(claim, 60) for claim in bed.running.values())


# -- a frozen worker (PostgreSQL) ---------------------------------------------------------------


@pytest.fixture
def frozen(bed: Bed) -> Iterator[tuple[ResultStore, Connection]]:
    """A worker frozen between its UPDATE and its COMMIT, holding the rows of queued run 3
    (as a claim would) and of running run 1 (as a heartbeat would)."""
    engine = create_engine_for(bed.store.engine.url.render_as_string(hide_password=False))
    connection = engine.connect()
    transaction_ = connection.begin()
    connection.execute(
        text(
            "UPDATE runs SET lease_expires_at = lease_expires_at "
            "WHERE study_id = :study AND plan_index IN (1, 3)"
        ),
        {"study": STUDY_ID},
    )
    try:
        yield bed.store, connection
    finally:
        if transaction_.is_active:
            transaction_.rollback()
        connection.close()
        engine.dispose()


@ONLY_POSTGRES
@pytest.mark.parametrize("terminate", [False, True])
def test_cancel_skips_rows_a_frozen_worker_holds_and_reports_them(
    frozen: tuple[ResultStore, Connection], terminate: bool
) -> None:
    store, worker = frozen
    started = time.monotonic()
    report = _cancel(store, terminate=terminate)
    assert time.monotonic() - started < 2, "cancel waited on the frozen worker's lock"
    if terminate:
        assert (report.cancelled, report.locked, report.running) == (7, 2, 0)
    else:
        assert (report.cancelled, report.locked, report.running) == (6, 1, 2)
    # When the worker comes back (its transaction ends), cancelling again finishes the job
    worker.rollback()
    again = _cancel(store, terminate=terminate)
    assert (again.cancelled, again.locked) == ((2, 0) if terminate else (1, 0))


@ONLY_POSTGRES
@pytest.mark.usefixtures("frozen")
def test_distributed_cancel_retries_then_reports_what_stays_locked(store_url: str) -> None:
    started = time.monotonic()
    report = distributed.cancel(STUDY_ID, db=store_url, retry_s=0.6)
    assert 0.5 <= time.monotonic() - started < 3
    assert (report.cancelled, report.locked, report.running) == (6, 1, 2)


@ONLY_POSTGRES
def test_studyq_cancel_says_what_a_frozen_worker_holds_and_outlasts_a_short_lock(
    frozen: tuple[ResultStore, Connection],
    store_url: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, worker = frozen
    # A lock that stays (a frozen worker): exit 1, and the message says what to do
    monkeypatch.setattr(distributed, "CANCEL_RETRY_S", 0.5)
    assert studyq_main(["cancel", STUDY_ID, "--db", store_url]) == 1
    captured = capsys.readouterr()
    assert "6 runs cancelled; 2 running, left to finish" in captured.out
    assert "1 runs are not cancelled yet" in captured.err
    assert f"Run `studyq cancel {STUDY_ID}` again" in captured.err
    # A lock held for a moment (a worker between its UPDATE and COMMIT): the command waits
    # it out and cancels the run
    monkeypatch.setattr(distributed, "CANCEL_RETRY_S", 10.0)
    threading.Timer(0.7, worker.rollback).start()
    assert studyq_main(["cancel", STUDY_ID, "--db", store_url]) == 0
    assert "1 runs cancelled; 2 running, left to finish" in capsys.readouterr().out


def test_a_run_a_cancel_left_running_is_cancelled_when_it_comes_back_not_run_again(
    bed: Bed,
) -> None:
    # Given a cancel that left runs 1 and 2 running
    _cancel(bed.store, terminate=False)
    # When run 1's worker hands it back (a warm shutdown) and run 2's worker vanishes
    assert bed.store.release_run(bed.running[1])
    with transaction(bed.store.engine) as connection:
        connection.execute(
            text("UPDATE runs SET lease_expires_at = :past WHERE study_id = :s AND plan_index = 2"),
            {"past": "2000-01-01 00:00:00+00:00", "s": STUDY_ID},
        )
    # Then no delivery can claim run 1 again, and reconcile cancels both instead of
    # publishing them
    assert bed.store.claim_run(STUDY_ID, 1, worker="w9", lease_s=60) is None
    report = bed.store.reconcile(STUDY_ID, queued_timeout_s=0.0)
    assert report.to_publish == []
    statuses = {run.index: run.status for run in bed.store.iter_runs(STUDY_ID)}
    assert (statuses[1], statuses[2]) == ("cancelled", "cancelled")
    assert bed.store.count_by_status(STUDY_ID)["queued"] == 0
    # ...until a resubmit, after which the study's runs are claimed again
    assert bed.store.requeue_for_resubmit(STUDY_ID, statuses=["cancelled"]) == 9
    queue_all(bed.store)
    assert bed.store.claim_run(STUDY_ID, 1, worker="w9", lease_s=60) is not None
