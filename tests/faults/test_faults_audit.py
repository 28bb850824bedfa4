"""The audit can fail: it passes a fault-free sweep and catches each kind of damage planted in
one (a duplicate row, a lost run, an attempt too many, a stale write, a changed value, a
count out of step with the runs)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy.exc
from fault_audit import audit
from fault_study import Shape, run_reference
from sqlalchemy import text

from orchestrator.store import ResultStore

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

SMALL = Shape(arms=2, replicates=5, sleep_s=0.001)


@pytest.fixture
def finished(shared_database: str, tmp_path: Path) -> Iterator[tuple[ResultStore, Path]]:
    """A fault-free sweep of SMALL recorded in a database of the test's own."""
    run_reference(SMALL, tmp_path / "sweep", shared_database)
    store = ResultStore.open(shared_database)
    yield store, tmp_path
    store.close()


def execute(store: ResultStore, sql: str) -> None:
    with store.engine.begin() as connection:
        connection.execute(text(sql), {"s": SMALL.study_id})


def test_a_fault_free_sweep_passes_the_audit(
    finished: tuple[ResultStore, Path], references: Callable[[Shape], Path]
):
    # Given a sweep that ran without faults
    store, tmp = finished
    # When it is audited against the session's fault-free reference
    report = audit(store, SMALL.study_id, references(SMALL), tmp / "export")
    # Then nothing is reported, and every run took one attempt
    assert report.counts["success"] == SMALL.runs
    assert set(report.attempts_per_run.values()) == {1}


DAMAGE = {
    "duplicate evaluation row": (
        "INSERT INTO evaluations SELECT study_id, plan_index, seq + 1, run_id, attempt, "
        "evaluator_id, metric_name, metric_value, metric_unit, aggregation_level, notes_json, "
        "extra FROM evaluations WHERE study_id = :s AND plan_index = 3",
        "duplicate or missing evaluations rows",
    ),
    "duplicate event row": (
        "INSERT INTO events SELECT study_id, plan_index, seq + 1, run_id, attempt, timestamp, "
        "record_id, text, session_id, actor_id, event_type, meta_json, extra FROM events "
        "WHERE study_id = :s AND plan_index = 4",
        "duplicate or missing events rows",
    ),
    "missing evaluation row": (
        "DELETE FROM evaluations WHERE study_id = :s AND plan_index = 1",
        "duplicate or missing evaluations rows",
    ),
    "lost run": (
        "UPDATE runs SET status = 'failed', error_kind = 'lost' "
        "WHERE study_id = :s AND plan_index = 2",
        "lost runs",
    ),
    "second success": (
        "INSERT INTO run_attempts SELECT study_id, plan_index, attempt + 1, run_id, worker, "
        "started_at, ended_at, outcome, error_kind, error_type, error_message "
        "FROM run_attempts WHERE study_id = :s AND plan_index = 5",
        "has 2 successes",
    ),
    "attempts over the budget": (
        "INSERT INTO run_attempts SELECT study_id, plan_index, attempt + n, run_id, worker, "
        "started_at, ended_at, 'lost', 'lost', NULL, NULL FROM run_attempts, "
        "generate_series(1, 3) AS n WHERE study_id = :s AND plan_index = 6",
        "charged attempts",
    ),
    "attempt left running": (
        "UPDATE run_attempts SET outcome = 'running' WHERE study_id = :s AND plan_index = 7",
        "still 'running'",
    ),
    "stale attempt's rows": (
        "UPDATE events SET attempt = attempt + 1 WHERE study_id = :s AND plan_index = 8",
        "rows written by a stale attempt",
    ),
    "changed result value": (
        "UPDATE evaluations SET metric_value = '0.5' WHERE study_id = :s AND plan_index = 9",
        "evaluations.csv: sorted row",
    ),
    "changed run field": (
        "UPDATE runs SET seed = seed + 1 WHERE study_id = :s AND plan_index = 0",
        "runs.csv: sorted row",
    ),
    "a count the triggers did not keep": (
        "INSERT INTO study_counts (study_id, shard, status, n) VALUES (:s, -1, 'running', 1)",
        "study_counts",
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_the_audit_catches_damage_planted_in_a_finished_sweep(
    damage: str, finished: tuple[ResultStore, Path], references: Callable[[Shape], Path]
):
    # Given a fault-free sweep, damaged in one way
    store, tmp = finished
    sql, expected = DAMAGE[damage]
    execute(store, sql)
    # When it is audited
    # Then the audit fails and names the damage
    with pytest.raises(AssertionError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        audit(store, SMALL.study_id, references(SMALL), tmp / "export")


def test_the_schema_itself_refuses_a_second_row_for_a_run(finished: tuple[ResultStore, Path]):
    # Given a finished sweep
    store, _ = finished
    # When a second runs row for the same (study, plan_index) is inserted
    # Then the database refuses it: one row per run is a key, not a convention
    with pytest.raises(sqlalchemy.exc.IntegrityError):
        execute(
            store,
            "INSERT INTO runs SELECT * FROM runs WHERE study_id = :s AND plan_index = 0",
        )
