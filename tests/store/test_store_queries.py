"""Reading: plan-order streaming with bounded pages, counts and error summaries."""

from __future__ import annotations

import pytest
from store_factories import STUDY_ID, claim, make_result, queue_all, register

from orchestrator.contracts.results import RunStatus
from orchestrator.store import ResultStore


def test_iter_runs_streams_in_plan_order_across_pages(store: ResultStore) -> None:
    register(store, 25)

    runs = list(store.iter_runs(STUDY_ID, batch=4))

    assert [run.index for run in runs] == list(range(25))
    assert runs[3].run_id == "run-0003"
    assert (runs[3].agent_key, runs[3].problem_key) == ("agent-y", "beam-design")


def test_iter_runs_filters_by_status(store: ResultStore) -> None:
    register(store, 10)
    store.mark_queued(STUDY_ID, [1, 4, 7, 8])

    queued = [run.index for run in store.iter_runs(STUDY_ID, statuses=["queued"], batch=3)]
    both = store.iter_runs(STUDY_ID, statuses=[RunStatus.QUEUED, RunStatus.PLANNED])

    assert queued == [1, 4, 7, 8]
    assert len(list(both)) == 10
    assert list(store.iter_runs(STUDY_ID, statuses=[])) == []


def test_iteration_is_paged_not_loaded_at_once(store: ResultStore) -> None:
    # A page is fetched only when the previous one is used up: a run added past the first
    # page after iteration began is still seen.
    register(store, 6)
    iterator = store.iter_runs(STUDY_ID, statuses=["queued"], batch=2)
    store.mark_queued(STUDY_ID, [0, 1])
    assert next(iterator).index == 0
    store.mark_queued(STUDY_ID, [5])

    assert [run.index for run in iterator] == [1, 5]


def test_evaluations_and_events_come_in_plan_then_row_order(store: ResultStore) -> None:
    register(store, 5)
    queue_all(store)
    for index in (3, 0, 4):  # finished out of plan order
        held = claim(store, index)
        store.finish_run(held, make_result(held))

    evaluations = [(e.index, e.seq) for e in store.iter_evaluations(STUDY_ID, batch=2)]
    events = [(e.index, e.seq) for e in store.iter_events(STUDY_ID, batch=2)]

    assert evaluations == [(0, 0), (0, 1), (3, 0), (3, 1), (4, 0), (4, 1)]
    assert events == [(0, 0), (3, 0), (4, 0)]


def test_extra_keys_keep_their_order(store: ResultStore) -> None:
    # evaluations.csv columns beyond the required ones appear in first-seen order.
    register(store, 1)
    queue_all(store)
    held = claim(store, 0)
    result = make_result(held)
    result.evaluations = [{"metric_name": "m", "zulu": 1, "alpha": 2, "mike": 3}]
    store.finish_run(held, result)

    [evaluation] = list(store.iter_evaluations(STUDY_ID))

    assert list(evaluation.extra) == ["zulu", "alpha", "mike"]
    assert list(evaluation.row) == [
        "run_id",
        "evaluator_id",
        "metric_name",
        "metric_value",
        "metric_unit",
        "aggregation_level",
        "notes_json",
        "zulu",
        "alpha",
        "mike",
    ]


def test_event_rows_have_the_csv_columns_then_the_extras(store: ResultStore) -> None:
    register(store, 1)
    queue_all(store)
    held = claim(store, 0)
    result = make_result(held)
    result.events = [{"level": "step", "text": "t", "record_id": "evt-1", "run_id": "run-0000"}]
    store.finish_run(held, result)

    [event] = list(store.iter_events(STUDY_ID))

    assert event.row == {
        "timestamp": None,
        "record_id": "evt-1",
        "text": "t",
        "session_id": None,
        "actor_id": None,
        "event_type": None,
        "meta_json": None,
        "level": "step",
        "run_id": "run-0000",
    }
    assert list(event.row)[-2:] == ["level", "run_id"]


def test_conditions_come_in_design_order(store: ResultStore) -> None:
    register(store, 2)

    conditions = list(store.iter_conditions(STUDY_ID, batch=1))

    assert [(c.position, c.condition_id) for c in conditions] == [
        (0, "cond-aaaa"),
        (1, "cond-bbbb"),
    ]
    assert conditions[1].metadata == {"fingerprint": "fp-1"}
    assert conditions[1].factor_assignments == {"temperature": 0.7, "prompt": "short"}


def test_counts_by_status_condition_agent_and_problem(store: ResultStore) -> None:
    register(store, 8)
    queue_all(store)
    held = claim(store, 0)
    store.finish_run(held, make_result(held))
    failed = claim(store, 3)
    store.finish_run(failed, make_result(failed, RunStatus.FAILED, error_type="KeyError"))

    assert store.count_by_status(STUDY_ID) == {
        "planned": 0,
        "queued": 6,
        "running": 0,
        "success": 1,
        "failed": 1,
        "cancelled": 0,
    }
    assert store.count_by(STUDY_ID, "condition") == {
        "cond-aaaa": {"queued": 3, "success": 1},
        "cond-bbbb": {"queued": 3, "failed": 1},
    }
    assert store.count_by(STUDY_ID, "agent") == {
        "agent-x": {"queued": 3, "success": 1},
        "agent-y": {"queued": 3, "failed": 1},
    }
    assert store.count_by(STUDY_ID, "problem") == {
        "beam-design": {"queued": 6, "success": 1, "failed": 1}
    }
    with pytest.raises(ValueError, match="condition"):
        store.count_by(STUDY_ID, "colour")


def test_top_errors_groups_failures(store: ResultStore) -> None:
    register(store, 6)
    queue_all(store)
    for held in store.claim_runs(STUDY_ID, list(range(6)), worker="w", lease_s=60):
        error = "KeyError" if held.index < 4 else "ValueError"
        store.finish_run(
            held,
            make_result(held, RunStatus.FAILED, error_type=error, error_message=f"m{held.index}"),
        )

    summary = store.top_errors(STUDY_ID, limit=5)

    assert [(s.error_kind, s.error_type, s.count, s.example) for s in summary] == [
        ("error", "KeyError", 4, "m0"),
        ("error", "ValueError", 2, "m4"),
    ]
    assert len(store.top_errors(STUDY_ID, limit=1)) == 1


def test_lookups_of_missing_things_return_none(store: ResultStore) -> None:
    assert store.find_study("nope") is None
    assert store.find_run("nope", 0) is None
    assert store.find_runs_by_id("nope", "run-x") == []
    assert store.count_by_status("nope")["planned"] == 0
    assert list(store.iter_runs("nope")) == []


def test_progress_stats_rate_and_cost(store: ResultStore) -> None:
    register(store, 6)
    queue_all(store)
    empty = store.progress_stats(STUDY_ID)
    assert (empty.cost_usd, empty.finished_recently, empty.recent_rate_per_s) == (0.0, 0, None)

    for held in store.claim_runs(STUDY_ID, [0, 1, 2, 3], worker="w", lease_s=60):
        if held.index < 3:
            store.finish_run(held, make_result(held))

    stats = store.progress_stats(STUDY_ID, window_s=300)
    assert stats.cost_usd == pytest.approx(0.03)
    assert stats.finished_recently == 3
    # Early in a sweep the window is the time since the first claim, not 300 s.
    assert 0 < stats.window_s < 60
    assert stats.recent_rate_per_s is not None and stats.recent_rate_per_s > 3 / 60
