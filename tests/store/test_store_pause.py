"""Budgets and the failure breaker in the store, on SQLite and PostgreSQL (issue 12, 3-4).

A paused study (``study_pauses``) claims nothing, on either claim statement, while another
study's runs are claimed as before; the check after results (``budget_gate``) pauses a study
once its recorded cost or tokens reach the budget, or when more than ``max_failure_rate`` of
its latest ``window`` finished runs failed; ``studyq budget`` refuses a limit not above what
is spent and writes nothing; raising it, or ``studyq resume``, continues the study; the
forecast sums per-run medians and 90th percentiles of earlier successful runs.
"""

from __future__ import annotations

import dataclasses
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from store_factories import DEFINITION, STUDY_ID, claim, make_result, queue_all, register

from orchestrator import budget
from orchestrator.cli import main as studyq_main
from orchestrator.contracts.results import RunStatus
from orchestrator.embedded import run_embedded
from orchestrator.store import Claim, ResultStore
from orchestrator.store.budget_gate import BudgetGate
from orchestrator.store.engine import transaction
from orchestrator.store.pausing import BREAKER, BUDGET, budget_overrides, pause, pause_of, unpause

OTHER = "study-b"


def _define(execution: dict[str, Any]) -> dict[str, Any]:
    return {**DEFINITION, "execution": execution}


def _finish(store: ResultStore, index: int, status: RunStatus = RunStatus.SUCCESS) -> Claim:
    won = claim(store, index)
    result = make_result(
        won,
        status,
        error_type="AuthenticationError" if status is RunStatus.FAILED else None,
        error_message="invalid API key" if status is RunStatus.FAILED else None,
    )
    now = datetime.now(UTC)  # the breaker orders by ended_at: real times, in order
    timed = dataclasses.replace(result, started_at=now, ended_at=now)
    assert store.finish_run(won, timed)
    gate = BudgetGate(store)
    gate.after_results([(won, timed)])
    return won


def _open(counts: dict[str, int]) -> dict[str, int]:
    return {status: count for status, count in counts.items() if count}


def _paused(store: ResultStore, study_id: str = STUDY_ID) -> Any:
    with transaction(store.engine, readonly=True) as connection:
        return pause_of(connection, study_id)


def test_a_paused_study_claims_nothing_and_others_still_claim(store: ResultStore) -> None:
    # Given two studies with queued runs, the first one paused
    register(store, 4)
    register(store, 4, study_id=OTHER)
    queue_all(store)
    queue_all(store, OTHER)
    with transaction(store.engine) as connection:
        assert pause(connection, STUDY_ID, BREAKER, {"failed": 3})
        assert not pause(connection, STUDY_ID, BUDGET, {})  # one pause at a time: the first
    # When workers claim runs of both
    refused = store.claim_run(STUDY_ID, 0, worker="w1", lease_s=60.0)
    batch = store.claim_runs(STUDY_ID, [1, 2], worker="w1", lease_s=60.0)
    other = store.claim_run(OTHER, 0, worker="w1", lease_s=60.0)
    # Then the paused study's runs stay queued, the other study's run is claimed
    assert refused is None and batch == []
    assert _open(store.count_by_status(STUDY_ID)) == {"queued": 4}
    assert other is not None
    assert _paused(store).reason == BREAKER
    # And once the pause is cleared its runs are claimed again
    with transaction(store.engine) as connection:
        assert unpause(connection, STUDY_ID) is not None
    assert store.claim_run(STUDY_ID, 0, worker="w1", lease_s=60.0) is not None


def test_the_budget_pauses_the_study_once_its_recorded_cost_is_spent(store: ResultStore) -> None:
    # Given a study with a budget of $0.03 whose runs each record $0.01
    register(store, 6, definition=_define({"max_cost_usd": 0.03}))
    queue_all(store)
    # When two runs finish, the study runs on
    _finish(store, 0)
    _finish(store, 1)
    assert _paused(store) is None
    # When the third one finishes, the budget is spent and the study is paused
    _finish(store, 2)
    paused = _paused(store)
    assert paused.reason == BUDGET
    assert paused.detail["reached"] == ["max_cost_usd"]
    assert paused.detail["spent_usd"] == pytest.approx(0.03)
    # Then no further run is claimed; the others stay queued
    assert store.claim_run(STUDY_ID, 3, worker="w1", lease_s=60.0) is None
    assert _open(store.count_by_status(STUDY_ID)) == {"success": 3, "queued": 3}
    state = budget.state_of(store, store.find_study(STUDY_ID))  # type: ignore[arg-type]
    assert state.line is not None and state.line.startswith("stopped: budget (spent $0.03 of $0.03")


def test_a_token_budget_counts_input_and_output_tokens(store: ResultStore) -> None:
    # Given a budget of 20 tokens and runs that record 10 input tokens each
    register(store, 4, definition=_define({"max_tokens": 20}))
    queue_all(store)
    # When two runs finish
    _finish(store, 0)
    assert _paused(store) is None
    _finish(store, 1)
    # Then the token budget paused it
    assert _paused(store).detail["reached"] == ["max_tokens"]


def test_the_breaker_trips_on_more_than_the_failed_share_of_the_window(
    store: ResultStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("STUDYQ_BROKER_URL", raising=False)
    # Given a breaker over the last 4 runs at a failure rate of 0.5, on one of two studies
    register(store, 10, definition=_define({"breaker": {"window": 4, "max_failure_rate": 0.5}}))
    queue_all(store)
    # When 2 of the last 4 failed (not more than half), it holds
    for index, status in enumerate([RunStatus.SUCCESS] * 2 + [RunStatus.FAILED] * 2):
        _finish(store, index, status)
    assert _paused(store) is None
    # When a third of the last 4 fails, it trips, naming the top error
    _finish(store, 4, RunStatus.FAILED)
    paused = _paused(store)
    assert paused.reason == BREAKER
    assert (paused.detail["failed"], paused.detail["window"]) == (3, 4)
    assert paused.detail["error_type"] == "AuthenticationError"
    assert paused.detail["error_message"] == "invalid API key"
    state = budget.state_of(store, store.find_study(STUDY_ID))  # type: ignore[arg-type]
    assert state.line == (
        "paused: breaker (3 of the last 4 runs failed; top error: AuthenticationError: "
        "invalid API key)"
    )
    # And resume clears it; the window starts afresh (a failure alone does not trip it)
    report = budget.resume(STUDY_ID, db=store.url, broker=None)
    assert report.resumed is not None and report.resumed.reason == BREAKER
    _finish(store, 5, RunStatus.FAILED)
    assert _paused(store) is None


def test_a_budget_not_above_what_is_spent_is_refused_and_nothing_written(
    store: ResultStore, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a study whose budget of $0.02 stopped it
    monkeypatch.delenv("STUDYQ_BROKER_URL", raising=False)
    register(store, 5, definition=_define({"max_cost_usd": 0.02}))
    queue_all(store)
    _finish(store, 0)
    _finish(store, 1)
    assert _paused(store).reason == BUDGET
    # When the user sets a budget below what is spent
    code = studyq_main(["budget", STUDY_ID, "--max-cost-usd", "0.01", "--db", store.url])
    # Then one line names the flag and the fix, exit 2, and nothing changed
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("--max-cost-usd: 0.01 is not above the $0.02")
    assert "Fix: pass more than 0.02" in err[0]
    with transaction(store.engine, readonly=True) as connection:
        assert budget_overrides(connection, STUDY_ID) == (None, None)
    assert _paused(store).reason == BUDGET
    # And resume refuses a study whose budget is still spent
    assert studyq_main(["resume", STUDY_ID, "--db", store.url]) == 2
    assert "studyq budget study-a --max-cost-usd N" in capsys.readouterr().err
    # When the budget is raised, the study continues (no broker: `studyq run` would)
    assert studyq_main(["budget", STUDY_ID, "--max-cost-usd", "0.05", "--db", store.url]) == 0
    out = capsys.readouterr().out
    assert "spent $0.02 of $0.05" in out and "continues (was paused: budget)" in out
    assert _paused(store) is None
    assert store.claim_run(STUDY_ID, 2, worker="w1", lease_s=60.0) is not None


def test_forecast_sums_medians_and_90th_percentiles_of_earlier_runs(
    store: ResultStore, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given 8 earlier successful runs of agent-x and agent-y on beam-design, $0.01 and 1.5 s each
    register(store, 8)
    queue_all(store)
    for index in range(8):
        won = claim(store, index)
        result = make_result(won)
        started = datetime.now(UTC) - timedelta(seconds=1.5)
        metrics = {**result.metrics, "latency_s": 1.5}
        assert store.finish_run(
            won, dataclasses.replace(result, metrics=metrics, started_at=started)
        )
    # And a new study of 3 replicates of both agents on it, plus an agent without history
    path = tmp_path / "next.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "study_id": "next",
                "title": "next",
                "agent_specs": ["agent-x", "agent-y", "agent-new"],
                "problem_ids": ["beam-design"],
                "run_budget": {"replicates": 3},
            }
        )
    )
    # When the forecast is asked for
    found = budget.forecast(path, db=store.url)
    # Then cost and time rest on the 8 runs; agent-new's 3 runs have no history
    assert (found.planned, found.history_runs, found.covered, found.uncovered) == (9, 8, 6, 3)
    assert found.cost_usd is not None and found.cost_usd.median == pytest.approx(0.06)
    assert found.run_seconds is not None and found.run_seconds.p90 == pytest.approx(9.0)
    assert studyq_main(["plan", str(path), "--forecast", "--db", store.url, "--slots", "2"]) == 0
    out = capsys.readouterr().out
    assert "$0.06 median" in out and "4.5 s median" in out and "8 earlier successful runs" in out


_CALLS: list[int] = []


def _costly(seed: int) -> dict[str, Any]:
    """An in-process paid call: $0.01 a run."""
    _CALLS.append(seed)
    time.sleep(0.05)
    return {"output": {"seed": seed}, "metrics": {"cost_usd": 0.01}}


@pytest.mark.timeout(60)
def test_the_embedded_run_stops_at_its_budget_and_continues_once_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given an embedded study of 60 runs at $0.01 each under max_cost_usd 0.10
    monkeypatch.delenv("STUDYQ_BROKER_URL", raising=False)
    _CALLS.clear()
    path = tmp_path / "study.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "study_id": "embedded-budget",
                "title": "embedded budget",
                "agent_specs": ["costly"],
                "problem_ids": ["noop"],
                "run_budget": {"replicates": 60},
                "execution": {"max_cost_usd": 0.10},
                "bindings": {"agents": {"costly": "test_store_pause:_costly"}},
            }
        )
    )
    db = f"sqlite:///{tmp_path / 'studyq.db'}"
    options: dict[str, Any] = {
        "db": db,
        "jobs": 2,
        "pool": "thread",
        "export": False,
        "show_progress": False,
    }
    # When `studyq run` runs it
    first = run_embedded(path, **options)
    # Then it stopped dispatching once $0.10 was spent, said so, and left the rest queued
    assert first.paused is not None and first.paused.startswith("stopped: budget (spent $0.1")
    assert 10 <= first.succeeded < 30, first
    counts = first.counts
    assert counts["success"] == first.succeeded and counts["running"] == 0
    assert counts["queued"] + counts["planned"] == 60 - first.succeeded
    # And `studyq run` again while the budget is spent runs nothing: the line, exit 1
    code = studyq_main(["run", str(path), "--db", db, "--no-export", "--no-progress"])
    assert code == 1
    assert "embedded-budget: stopped: budget (spent $0.1" in capsys.readouterr().err
    assert len(_CALLS) == first.succeeded
    # When the budget is raised and the study is run again, it finishes; nothing ran twice
    report = budget.set_budget("embedded-budget", max_cost_usd=1.0, db=db)
    assert report.resumed is not None and report.published is None
    second = run_embedded(path, **options)
    assert second.paused is None and second.complete
    assert first.succeeded + second.succeeded == 60 == len(_CALLS) == len(set(_CALLS))
