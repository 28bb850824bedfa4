"""The plain run function (``workers.runtask.run_delivery``), without Celery, on real stores.

Tests that execute the run on the main thread arm ``SIGALRM`` there, as a prefork child does;
pytest-timeout's default method uses the same signal, so they use its thread method.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime
from typing import Any

import dist_agents
import pytest
from dist_services import PG_PORT, TcpLink
from dist_studies import Sweep, make_sweep
from sqlalchemy import update

from orchestrator.store import ResultStore, create_engine_for
from orchestrator.store.models import RunRow
from workers.runtask import MessageMismatch, Outcome, record_hard_kill, run_delivery

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]
on_main_thread = pytest.mark.timeout(60, method="thread")

COUNTING = {"agents": {"counting": "dist_agents:counting"}}
WAITING = {"agents": {"waiting": "dist_agents:waiting"}}


def deliver(runtime: Any, sweep: Sweep, index: int = 0) -> Outcome:
    return run_delivery(runtime, sweep.specs[index].to_message(), 0)


def in_thread(call: Any) -> tuple[threading.Thread, list[Any]]:
    """Run ``call`` on another thread (as the threads pool does): nothing can interrupt it."""
    box: list[Any] = []
    thread = threading.Thread(target=lambda: box.append(call()), daemon=True)
    thread.start()
    return thread, box


def wait_until(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


@on_main_thread
def test_a_delivery_is_claimed_executed_and_recorded(store: ResultStore, sweep, runtime_for):
    # Given a queued run of the demo no-op agent
    study = sweep(agents=["noop"])
    runtime = runtime_for(store)
    # When it is delivered
    outcome = deliver(runtime, study)
    # Then it ran once, under this worker's first attempt, and its result is recorded
    assert outcome is Outcome.SUCCESS
    run = store.find_run(study.study_id, 0)
    assert run is not None
    assert (run.status, run.attempt, run.attempts_used) == ("success", 1, 1)
    assert run.lease_owner == "test@host:1"
    assert run.outputs == {"seed": study.specs[0].seed}
    attempts = list(store.iter_attempts(study.study_id))
    assert [(a.attempt, a.outcome, a.worker) for a in attempts] == [(1, "success", "test@host:1")]


@on_main_thread
def test_a_duplicate_delivery_is_acknowledged_and_counted_never_executed(
    store: ResultStore, sweep, runtime_for, caplog: pytest.LogCaptureFixture
):
    # Given a run that a first delivery recorded
    study = sweep(agents=["counting"], bindings=COUNTING)
    runtime = runtime_for(store)
    assert deliver(runtime, study) is Outcome.SUCCESS
    # When the same message is delivered again (redelivery, republish)
    with caplog.at_level(logging.INFO, logger="studyq.worker"):
        outcome = deliver(runtime, study)
    # Then it is acknowledged as a duplicate, counted and logged, and the agent is not called
    assert outcome is Outcome.DUPLICATE
    assert runtime.counters[Outcome.DUPLICATE] == 1
    assert dist_agents.calls == [study.specs[0].seed]
    assert "not claimable" in caplog.text
    assert len(list(store.iter_attempts(study.study_id))) == 1


def test_a_delivery_of_a_live_leased_run_is_not_executed(store: ResultStore, sweep, runtime_for):
    # Given a run another worker holds under a live lease
    study = sweep(agents=["counting"], bindings=COUNTING)
    held = store.claim_run(study.study_id, 0, worker="other@host:9", lease_s=60)
    assert held is not None
    # When its message is delivered here
    outcome = deliver(runtime_for(store), study)
    # Then nothing runs and the other worker still owns it
    assert outcome is Outcome.DUPLICATE
    assert dist_agents.calls == []
    run = store.find_run(study.study_id, 0)
    assert run is not None and (run.status, run.lease_owner) == ("running", "other@host:9")


def test_a_stale_attempt_write_is_refused(store: ResultStore, sweep, runtime_for):
    # Given worker A executing attempt 1 of a run (on a thread nothing can interrupt)
    study = sweep(agents=["waiting"], bindings=WAITING)
    runtime_a = runtime_for(store, worker="a@host:1")
    thread, box = in_thread(lambda: deliver(runtime_a, study))
    wait_until(lambda: dist_agents.calls)
    # And its lease expired, the coordinator re-queued the run and worker B claimed attempt 2
    with store.engine.begin() as connection:
        connection.execute(
            update(RunRow)
            .where(RunRow.study_id == study.study_id, RunRow.plan_index == 0)
            .values(lease_expires_at=datetime(2000, 1, 1, tzinfo=UTC))
        )
    assert store.reconcile(study.study_id).requeued == 1
    claim_b = store.claim_run(study.study_id, 0, worker="b@host:2", lease_s=60)
    assert claim_b is not None and claim_b.attempt == 2
    # When A's agent returns and A tries to record its result
    dist_agents.gate.set()
    thread.join(10)
    # Then the write is refused and counted; B's attempt still owns the run
    assert box == [Outcome.REFUSED]
    assert runtime_a.counters[Outcome.REFUSED] == 1
    run = store.find_run(study.study_id, 0)
    assert run is not None and (run.status, run.attempt, run.lease_owner) == (
        "running",
        2,
        "b@host:2",
    )


@on_main_thread
def test_a_result_write_is_retried_through_a_database_outage(
    pg_store: ResultStore, runtime_for, caplog: pytest.LogCaptureFixture
):
    # Given a worker that reaches PostgreSQL through a link we can cut
    link = TcpLink(PG_PORT)
    url = pg_store.engine.url.set(port=link.port).render_as_string(hide_password=False)
    worker_store = ResultStore(create_engine_for(url))
    try:
        study = make_sweep(pg_store, agents=["counting"], bindings=COUNTING)
        runtime = runtime_for(worker_store)

        # And the database goes away while the agent works, for 1.5 s
        def outage() -> None:
            link.cut()
            threading.Timer(1.5, link.restore).start()

        dist_agents.during.append(outage)
        # When the run finishes and its result is written
        started = time.monotonic()
        with caplog.at_level(logging.INFO, logger="studyq.worker"):
            outcome = deliver(runtime, study)
        # Then the write was retried (each retry logged) until the database came back, the
        # result is recorded, and the agent ran exactly once
        assert outcome is Outcome.SUCCESS
        assert time.monotonic() - started >= 1.4
        assert "database unavailable while recording the result" in caplog.text
        assert "database reachable again" in caplog.text
        assert dist_agents.calls == [study.specs[0].seed]
        run = pg_store.find_run(study.study_id, 0)
        assert run is not None and run.status == "success"
    finally:
        worker_store.close()
        link.close()


@on_main_thread
def test_the_soft_time_limit_interrupts_a_run_on_the_main_thread(
    store: ResultStore, sweep, runtime_for
):
    # Given a run of an agent that sleeps 30 s in a study with a 0.5 s time limit
    study = sweep(agents=["sleep"], factors={"sleep_s": 30}, timeout_s=0.5)
    # When it is delivered to a process that runs it on its main thread (prefork, solo)
    started = time.monotonic()
    outcome = deliver(runtime_for(store), study)
    # Then it is interrupted at the limit and recorded as a timeout
    assert time.monotonic() - started < 5
    assert outcome is Outcome.FAILED
    run = store.find_run(study.study_id, 0)
    assert run is not None and (run.status, run.error_kind) == ("failed", "timeout")


def test_a_run_that_overstays_on_a_thread_is_recorded_as_timeout(
    store: ResultStore, sweep, runtime_for
):
    # Given a run on a thread (the threads pool), with a 0.3 s limit and 1 s of grace
    study = sweep(agents=["waiting"], bindings=WAITING, timeout_s=0.3)
    runtime = runtime_for(store, time_limit_grace_s=1.0)
    thread, box = in_thread(lambda: deliver(runtime, study))
    # When it is still going after its limit and the grace
    wait_until(lambda: (store.find_run(study.study_id, 0) or _never()).status == "failed")
    # Then its supervisor recorded it as a timeout, and the late return writes nothing
    dist_agents.gate.set()
    thread.join(10)
    assert box == [Outcome.TIMED_OUT]
    run = store.find_run(study.study_id, 0)
    assert run is not None and run.error_kind == "timeout"
    assert "abandoned" in (run.error_message or "")


@on_main_thread
def test_a_cancelled_run_is_stopped_and_writes_nothing(store: ResultStore, sweep, runtime_for):
    # Given a 30 s run whose lease is extended every 0.1 s
    study = sweep(agents=["sleep"], factors={"sleep_s": 30})
    runtime = runtime_for(store, lease_s=0.4, heartbeat_s=0.1)
    # When the user cancels the study while it runs
    threading.Timer(0.3, store.cancel, args=(study.study_id,)).start()
    started = time.monotonic()
    outcome = deliver(runtime, study)
    # Then the next heartbeat is refused, the run is interrupted and nothing is written
    assert outcome is Outcome.LEASE_LOST
    assert time.monotonic() - started < 5
    run = store.find_run(study.study_id, 0)
    assert run is not None and (run.status, run.outputs) == ("cancelled", None)


@on_main_thread
def test_a_warm_shutdown_hands_the_run_back_without_charging_an_attempt(
    store: ResultStore, sweep, runtime_for
):
    # Given a 30 s run executing
    study = sweep(agents=["sleep"], factors={"sleep_s": 30}, replicates=2)
    runtime = runtime_for(store)
    # When the worker's shutdown grace runs out
    threading.Timer(0.3, runtime.hand_back_all).start()
    outcome = deliver(runtime, study)
    # Then the run is released back to queued with its attempt refunded, and the worker
    # claims nothing more (its next delivery is handed back untouched)
    assert outcome is Outcome.HANDED_BACK
    run = store.find_run(study.study_id, 0)
    assert run is not None and (run.status, run.attempts_used, run.attempt) == ("queued", 0, 1)
    assert [a.outcome for a in store.iter_attempts(study.study_id)] == ["released"]
    assert deliver(runtime, study, 1) is Outcome.HANDED_BACK
    second = store.find_run(study.study_id, 1)
    assert second is not None and second.status == "queued"


def test_the_prefork_parent_records_a_hard_kill_as_timeout(store: ResultStore, sweep, runtime_for):
    # Given a run claimed by a pool child that was then killed at its hard time limit
    study = sweep(agents=["noop"], replicates=2)
    child = "pair@host:4242"
    assert store.claim_run(study.study_id, 0, worker=child, lease_s=60) is not None
    assert store.claim_run(study.study_id, 1, worker="other@host:7", lease_s=60) is not None
    runtime = runtime_for(store, worker="pair@host:4241")
    # When the parent records the kill, once and again
    first = record_hard_kill(runtime, study.specs[0].to_message(), child, 3.0)
    again = record_hard_kill(runtime, study.specs[0].to_message(), child, 3.0)
    # Then the run failed as a timeout, exactly once; a run of another process is untouched
    assert (first, again) == (True, False)
    run = store.find_run(study.study_id, 0)
    assert run is not None
    assert (run.status, run.error_kind, run.error_type) == (
        "failed",
        "timeout",
        "TimeLimitExceeded",
    )
    assert record_hard_kill(runtime, study.specs[1].to_message(), child, 3.0) is False
    other = store.find_run(study.study_id, 1)
    assert other is not None and other.status == "running"


def _never() -> Any:
    raise AssertionError("run disappeared")


def test_a_message_for_a_deleted_study_is_returned_not_acknowledged(
    store: ResultStore, sweep, runtime_for
):
    # Given a message of a study deleted after publishing
    study = sweep(agents=["noop"])
    message = study.specs[0].to_message()
    assert store.delete_study(study.study_id)
    runtime = runtime_for(store)
    # When it is delivered, then it goes back to the broker (the task requeues it), counted
    # (a deleted study's message is dead-lettered only much later: test_shared_queue.py)
    assert run_delivery(runtime, message, 0) is Outcome.NOT_OURS
    assert runtime.counters[Outcome.NOT_OURS] == 1
    assert runtime.counters[Outcome.UNKNOWN_STUDY] == 0


def test_a_message_naming_another_run_than_its_index_holds_claims_nothing(
    store: ResultStore, sweep, runtime_for
):
    # Given a message whose run id is not the run registered at its index
    study = sweep(agents=["counting"], bindings=COUNTING)
    message = {**study.specs[0].to_message(), "run_id": "run-000000000000"}
    runtime = runtime_for(store)
    # When it is delivered
    with pytest.raises(MessageMismatch, match="run_id"):
        run_delivery(runtime, message, 0)
    # Then nothing runs and the registered run was not touched: still queued, no attempt
    assert runtime.counters[Outcome.MISMATCH] == 1
    assert dist_agents.calls == []
    run = store.find_run(study.study_id, 0)
    assert run is not None and (run.status, run.attempt, run.attempts_used) == ("queued", 0, 0)
