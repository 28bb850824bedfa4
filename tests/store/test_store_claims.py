"""Claiming, heartbeating, finishing and releasing runs: every transition fenced."""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest
from sqlalchemy import update
from store_factories import STUDY_ID, claim, expire_lease, make_result, queue_all, register

from orchestrator.contracts.errors import StoreError
from orchestrator.contracts.results import ErrorKind, RunStatus
from orchestrator.store import Claim, ResultStore
from orchestrator.store.attempts import MAX_MESSAGE_CHARS, MAX_TRACEBACK_CHARS
from orchestrator.store.models import RunRow


@pytest.fixture
def queued(store: ResultStore) -> ResultStore:
    """A store with a 10-run study, all queued."""
    register(store, 10)
    assert queue_all(store) == 10
    return store


def test_queue_runs_moves_planned_runs_once(store: ResultStore) -> None:
    register(store, 4)

    assert store.queue_runs(STUDY_ID, [2, 0, 1]) == [(0, 0), (1, 0), (2, 0)]
    assert store.mark_queued(STUDY_ID, [0, 1, 2, 3]) == 1
    assert store.queue_runs(STUDY_ID, [0, 1, 2, 3]) == []
    assert store.count_by_status(STUDY_ID)["queued"] == 4
    run = store.find_run(STUDY_ID, 0)
    assert run is not None and run.queued_at is not None


def test_queue_runs_takes_exactly_the_named_runs_as_a_range_or_a_list(store: ResultStore) -> None:
    """Consecutive indices in order are marked through a range, others through a list: both
    move exactly the runs named, never a neighbour."""
    register(store, 12)

    assert store.queue_runs(STUDY_ID, [3, 4, 5]) == [(3, 0), (4, 0), (5, 0)]  # a range
    assert store.queue_runs(STUDY_ID, [7, 9]) == [(7, 0), (9, 0)]  # a gap
    assert store.queue_runs(STUDY_ID, [11, 10]) == [(10, 0), (11, 0)]  # out of order
    assert store.queue_runs(STUDY_ID, [0, 0, 1]) == [(0, 0), (1, 0)]  # a repeat, same length
    assert store.queue_runs(STUDY_ID, [1, 2, 3]) == [(2, 0)]  # the others were queued
    queued = {i for i in range(12) if store.find_run(STUDY_ID, i).status == "queued"}  # type: ignore[union-attr]
    assert queued == {0, 1, 2, 3, 4, 5, 7, 9, 10, 11}


def test_queue_next_marks_pages_of_planned_runs_queued_in_plan_order(store: ResultStore) -> None:
    register(store, 7)
    store.mark_queued(STUDY_ID, [2])

    pages = []
    while page := store.queue_next(STUDY_ID, batch=3):
        pages.append(page)

    assert [[(spec.index, attempt) for spec, attempt in page] for page in pages] == [
        [(0, 0), (1, 0), (3, 0)],
        [(4, 0), (5, 0), (6, 0)],
    ]
    assert pages[0][0][0].run_id == "run-0000"
    assert store.count_by_status(STUDY_ID)["queued"] == 7
    run = store.find_run(STUDY_ID, 4)
    assert run is not None and run.queued_at is not None


@pytest.mark.parametrize("store_url", ["postgresql"], indirect=True)
def test_queue_next_skips_runs_another_coordinator_is_moving(store: ResultStore) -> None:
    # Given a coordinator in the middle of moving the first page (its rows locked)
    register(store, 6)
    with store.engine.connect() as other:
        other.execute(
            update(RunRow)
            .where(RunRow.study_id == STUDY_ID, RunRow.plan_index.in_([0, 1, 2]))
            .values(status="queued")
        )
        # When a second coordinator asks for the next page, it does not wait for them
        page = store.queue_next(STUDY_ID, batch=3)
        other.rollback()
    # Then it got the next runs instead
    assert [spec.index for spec, _ in page] == [3, 4, 5]


def test_claim_wins_once(queued: ResultStore) -> None:
    first = queued.claim_run(STUDY_ID, 3, worker="w1", lease_s=60)
    second = queued.claim_run(STUDY_ID, 3, worker="w2", lease_s=60)

    assert first is not None
    assert (first.index, first.run_id, first.attempt, first.worker) == (3, "run-0003", 1, "w1")
    assert second is None
    run = queued.find_run(STUDY_ID, 3)
    assert run is not None
    assert (run.status, run.attempt, run.attempts_used, run.lease_owner) == (
        "running",
        1,
        1,
        "w1",
    )
    assert run.lease_expires_at == first.lease_expires_at
    history = list(queued.iter_attempts(STUDY_ID))
    assert [(a.index, a.attempt, a.worker, a.outcome) for a in history] == [(3, 1, "w1", "running")]


def test_planned_runs_are_claimable_only_in_embedded_mode(store: ResultStore) -> None:
    register(store, 2)

    assert store.claim_run(STUDY_ID, 0, worker="w", lease_s=60) is None
    assert store.claim_run(STUDY_ID, 0, worker="w", lease_s=60, allow_planned=True) is not None


def test_claim_runs_batch_returns_winners_in_plan_order(queued: ResultStore) -> None:
    claim(queued, 2)

    claims = queued.claim_runs(STUDY_ID, [5, 2, 0, 99], worker="emb", lease_s=60)

    assert [c.index for c in claims] == [0, 5]
    assert all(c.attempt == 1 and c.worker == "emb" for c in claims)


def test_claim_validates_its_arguments(queued: ResultStore) -> None:
    with pytest.raises(StoreError, match="worker"):
        queued.claim_run(STUDY_ID, 0, worker="", lease_s=60)
    with pytest.raises(StoreError, match="lease_s"):
        queued.claim_run(STUDY_ID, 0, worker="w", lease_s=0)


@pytest.mark.parametrize("contenders", [2, 8])
def test_concurrent_claims_have_exactly_one_winner(
    queued: ResultStore, other_store: ResultStore, contenders: int
) -> None:
    # Given several workers on two engines racing for the same run at the same instant
    barrier = threading.Barrier(contenders)
    results: list[Claim | BaseException | None] = []
    lock = threading.Lock()

    def worker(number: int) -> None:
        target = queued if number % 2 else other_store
        barrier.wait()
        try:
            outcome: Claim | BaseException | None = target.claim_run(
                STUDY_ID, 0, worker=f"w{number}", lease_s=60
            )
        except BaseException as error:
            outcome = error
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(contenders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    # Then exactly one claim won and the others were told no
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors
    winners = [r for r in results if isinstance(r, Claim)]
    assert len(winners) == 1 and len(results) == contenders
    run = queued.find_run(STUDY_ID, 0)
    assert run is not None and (run.attempt, run.lease_owner) == (1, winners[0].worker)
    assert len(list(queued.iter_attempts(STUDY_ID))) == 1


def test_heartbeat_extends_only_the_holders_lease(queued: ResultStore) -> None:
    held = claim(queued, 0, lease_s=10)

    assert queued.heartbeat(held, 3600) is True
    run = queued.find_run(STUDY_ID, 0)
    assert run is not None and run.lease_expires_at is not None
    assert (run.lease_expires_at - held.lease_expires_at).total_seconds() > 3000

    assert queued.heartbeat(replace(held, worker="intruder"), 60) is False
    assert queued.heartbeat(replace(held, attempt=2), 60) is False


def test_finish_writes_result_evaluations_events_and_history(queued: ResultStore) -> None:
    held = claim(queued, 1)

    assert queued.finish_run(held, make_result(held, score=0.75)) is True

    run = queued.find_run(STUDY_ID, 1)
    assert run is not None
    assert run.status == "success"
    assert run.outputs == {"text": "answer 1"}
    assert (run.primary_outcome, run.cost_usd, run.input_tokens) == (0.75, 0.01, 10)
    assert run.latency_s == pytest.approx(1.5)
    assert run.started_at is not None and run.started_at.year == 2026
    assert run.lease_expires_at is None
    assert run.provenance == {"model_name": "demo", "host": "h"}
    assert run.trace_refs == ["traces/a.json"]
    assert run.error_kind is None

    evaluations = list(queued.iter_evaluations(STUDY_ID))
    assert [(e.run_id, e.seq, e.metric_name, e.metric_value) for e in evaluations] == [
        ("run-0001", 0, "score", 0.75),
        ("run-0001", 1, "len", 3),
    ]
    assert [e.extra for e in evaluations] == [{"zeta": 1}, {"alpha": 2}]
    events = list(queued.iter_events(STUDY_ID))
    assert [(e.event_type, e.text, e.meta_json, e.attempt) for e in events] == [
        ("assistant_output", "hi", {"b": 1, "a": 2}, 1)
    ]
    [attempt] = list(queued.iter_attempts(STUDY_ID))
    assert attempt.outcome == "success" and attempt.ended_at is not None


def test_failed_result_records_the_error(queued: ResultStore) -> None:
    held = claim(queued, 0)
    result = make_result(
        held,
        RunStatus.FAILED,
        error_type="ValueError",
        error_message="bad input",
        traceback="Traceback...\nValueError: bad input",
    )

    assert queued.finish_run(held, result) is True

    run = queued.find_run(STUDY_ID, 0)
    assert run is not None
    assert (run.status, run.error_kind, run.error_type, run.error_message) == (
        "failed",
        "error",  # a failure without a kind is an ordinary error
        "ValueError",
        "bad input",
    )
    [attempt] = list(queued.iter_attempts(STUDY_ID))
    assert (attempt.outcome, attempt.error_type) == ("failed", "ValueError")


def test_double_finish_is_refused_and_writes_nothing_twice(queued: ResultStore) -> None:
    held = claim(queued, 0)
    assert queued.finish_run(held, make_result(held, score=0.1)) is True

    assert queued.finish_run(held, make_result(held, score=0.9)) is False

    run = queued.find_run(STUDY_ID, 0)
    assert run is not None and run.primary_outcome == 0.1
    assert len(list(queued.iter_evaluations(STUDY_ID))) == 2
    assert len(list(queued.iter_events(STUDY_ID))) == 1


def test_stale_attempt_cannot_overwrite_a_newer_one(queued: ResultStore) -> None:
    # Given worker 1's lease expired and the run was re-claimed by worker 2
    stale = claim(queued, 0, worker="w1")
    expire_lease(queued, stale)
    assert queued.reconcile(STUDY_ID).requeued == 1
    fresh = claim(queued, 0, worker="w2")
    assert fresh.attempt == 2

    # When worker 1 comes back and reports (even under worker 2's name)
    refused = queued.finish_run(stale, make_result(stale, score=0.1))
    impostor = replace(stale, worker="w2")
    refused_again = queued.finish_run(impostor, make_result(impostor, score=0.1))

    # Then nothing it sent is written, and worker 2 still finishes normally
    assert (refused, refused_again) == (False, False)
    assert list(queued.iter_evaluations(STUDY_ID)) == []
    assert queued.heartbeat(stale, 60) is False
    assert queued.release_run(stale) is False
    assert queued.finish_run(fresh, make_result(fresh, score=0.9)) is True
    run = queued.find_run(STUDY_ID, 0)
    assert run is not None and (run.status, run.primary_outcome) == ("success", 0.9)
    outcomes = [(a.attempt, a.worker, a.outcome) for a in queued.iter_attempts(STUDY_ID)]
    assert outcomes == [(1, "w1", "lost"), (2, "w2", "success")]


def test_finish_with_a_non_terminal_status_is_an_error(queued: ResultStore) -> None:
    held = claim(queued, 0)
    with pytest.raises(StoreError, match="success or failed"):
        queued.finish_run(held, make_result(held, RunStatus.RUNNING))
    run = queued.find_run(STUDY_ID, 0)
    assert run is not None and run.status == "running"


def test_finish_with_another_runs_result_is_an_error(queued: ResultStore) -> None:
    held = claim(queued, 0)
    other = claim(queued, 1)
    with pytest.raises(StoreError, match="handed in with the claim"):
        queued.finish_run(held, make_result(other))


def test_finish_batch_fences_each_item(queued: ResultStore) -> None:
    claims = queued.claim_runs(STUDY_ID, [0, 1, 2], worker="emb", lease_s=60)
    done = claims[1]
    assert queued.finish_run(done, make_result(done)) is True

    outcome = queued.finish_runs_batch([(c, make_result(c)) for c in claims])

    assert outcome == [True, False, True]
    assert queued.count_by_status(STUDY_ID)["success"] == 3
    assert len(list(queued.iter_evaluations(STUDY_ID))) == 6


def test_long_tracebacks_and_messages_are_bounded(queued: ResultStore) -> None:
    held = claim(queued, 0)
    result = make_result(
        held,
        RunStatus.FAILED,
        error_type="RecursionError",
        error_message="m" * 10_000,
        traceback="frame\n" * 5_000 + "RecursionError: too deep",
        error_kind=ErrorKind.ERROR,
    )

    assert queued.finish_run(held, result) is True

    run = queued.find_run(STUDY_ID, 0)
    assert run is not None and run.traceback is not None and run.error_message is not None
    assert run.traceback.endswith("RecursionError: too deep")  # the tail is what matters
    assert len(run.traceback) < MAX_TRACEBACK_CHARS + 100
    assert run.error_message.startswith("mmm")
    assert len(run.error_message) < MAX_MESSAGE_CHARS + 100


def test_values_jsonb_rejects_are_stored_the_same_on_both_backends(queued: ResultStore) -> None:
    held = claim(queued, 0)
    result = make_result(held)
    result.outputs = {"nan": float("nan"), "inf": float("-inf"), "nul": "a\x00b", 1: (1, 2)}
    result.error_message = None
    result.events = [{"text": "nul\x00here", "meta_json": {"x": float("inf")}}]

    assert queued.finish_run(held, result) is True

    run = queued.find_run(STUDY_ID, 0)
    assert run is not None
    assert run.outputs == {"nan": "NaN", "inf": "-Infinity", "nul": "a\ufffdb", "1": [1, 2]}
    [event] = list(queued.iter_events(STUDY_ID))
    assert event.meta_json == {"x": "Infinity"}
    assert event.text is not None and "\x00" not in event.text


def test_release_hands_the_run_back_without_charging(queued: ResultStore) -> None:
    # Given a claimed run
    held = claim(queued, 0)

    # When the worker shuts down warmly and releases it
    assert queued.release_run(held) is True

    # Then it is queued again with its attempt refunded, and the old claim is dead
    run = queued.find_run(STUDY_ID, 0)
    assert run is not None
    assert (run.status, run.attempt, run.attempts_used, run.lease_owner) == (
        "queued",
        1,
        0,
        None,
    )
    assert queued.release_run(held) is False
    again = claim(queued, 0, worker="w2")
    assert again.attempt == 2  # the fencing token still moves forward
    assert queued.finish_run(held, make_result(held)) is False
    outcomes = [(a.attempt, a.outcome) for a in queued.iter_attempts(STUDY_ID)]
    assert outcomes == [(1, "released"), (2, "running")]


def test_releases_do_not_use_up_attempts(store: ResultStore) -> None:
    register(store, 1, max_attempts=1)
    queue_all(store)

    for _ in range(3):
        assert store.release_run(claim(store, 0)) is True

    held = claim(store, 0)
    assert held.attempt == 4
    assert store.finish_run(held, make_result(held)) is True


def test_terminal_runs_cannot_be_claimed(queued: ResultStore) -> None:
    held = claim(queued, 0)
    queued.finish_run(held, make_result(held))

    assert queued.claim_run(STUDY_ID, 0, worker="late", lease_s=60) is None
    assert queued.claim_run(STUDY_ID, 0, worker="late", lease_s=60, allow_planned=True) is None


def test_unknown_runs_and_studies_are_not_claimable(queued: ResultStore) -> None:
    assert queued.claim_run(STUDY_ID, 10_000, worker="w", lease_s=60) is None
    assert queued.claim_run("no-such-study", 0, worker="w", lease_s=60) is None


def test_a_queued_run_without_attempts_left_is_not_claimable(queued: ResultStore) -> None:
    # Given a queued run whose budget is used up (e.g. max_attempts lowered by an operator)
    with queued.engine.begin() as connection:
        connection.execute(
            update(RunRow)
            .where(RunRow.study_id == STUDY_ID, RunRow.plan_index == 0)
            .values(attempts_used=RunRow.max_attempts)
        )

    # Then no worker can start it; it waits for a resubmit
    assert queued.claim_run(STUDY_ID, 0, worker="w", lease_s=60) is None


def _awkward_result(held: Claim) -> object:
    """A result with every value a store can mangle: NaN and infinities, NUL characters,
    JSON nulls, nested key order, non-ASCII text, an event without text."""
    base = make_result(held)
    return replace(
        base,
        outputs={"text": "nul\x00here ünï", "nested": {"z": 1, "a": [1.5, None]}},
        metrics={"primary_outcome": float("nan"), "cost_usd": float("inf"), "input_tokens": 7},
        evaluations=[
            {"metric_name": "nan", "metric_value": float("nan"), "z_extra": {"b": 1, "a": 2}},
            {"metric_name": "none", "metric_value": None, "notes_json": {"k": [None]}},
            {"metric_name": "text", "metric_value": "high\x00", "evaluator_id": None, "a": 1},
        ],
        events=[
            {"event_type": "x", "meta_json": None, "extra_key": "é"},
            {"text": "t\x00", "timestamp": "2026-01-01T00:00:00Z", "record_id": 5},
        ],
    )


def _stored(store: ResultStore, index: int) -> tuple[object, ...]:
    run = store.find_run(STUDY_ID, index)
    assert run is not None
    evaluations = [e for e in store.iter_evaluations(STUDY_ID) if e.index == index]
    events = [e for e in store.iter_events(STUDY_ID) if e.index == index]
    return (
        run.status,
        run.outputs,
        run.metrics,
        run.primary_outcome,
        run.cost_usd,
        [(e.seq, e.metric_name, e.metric_value, e.evaluator_id, e.notes_json) for e in evaluations],
        [list(e.extra.items()) for e in evaluations],
        [(e.seq, e.event_type, e.text, e.timestamp, e.record_id, e.meta_json) for e in events],
        [list(e.extra.items()) for e in events],
    )


def test_one_result_and_a_batch_store_the_same_values(queued: ResultStore) -> None:
    """On PostgreSQL a single result is one statement and a batch is a transaction of them;
    on SQLite both are the portable sequence: every path stores the same values."""
    alone = claim(queued, 0)
    batch = [claim(queued, 1), claim(queued, 2)]

    assert queued.finish_run(alone, _awkward_result(alone)) is True  # type: ignore[arg-type]
    assert queued.finish_runs_batch([(c, _awkward_result(c)) for c in batch]) == [True, True]  # type: ignore[misc]

    stored = [_stored(queued, index) for index in (0, 1, 2)]
    assert stored[0] == stored[1] == stored[2]
    status, outputs, metrics, primary, cost, evaluations, extras, events, event_extras = stored[0]
    assert status == "success"
    assert metrics == {"primary_outcome": "NaN", "cost_usd": "Infinity", "input_tokens": 7}
    assert outputs == {"text": "nul\ufffdhere ünï", "nested": {"z": 1, "a": [1.5, None]}}
    assert (primary, cost) == ("NaN", float("inf"))
    assert evaluations == [
        (0, "nan", "NaN", None, None),
        (1, "none", None, None, {"k": [None]}),
        (2, "text", "high\ufffd", None, None),
    ]
    assert extras == [[("z_extra", {"b": 1, "a": 2})], [], [("a", 1)]]
    assert events == [
        (0, "x", None, None, None, None),
        (1, None, "t\ufffd", "2026-01-01T00:00:00Z", "5", None),
    ]
    assert event_extras == [[("extra_key", "é")], []]
