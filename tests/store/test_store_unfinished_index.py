"""Revisions 0006 and 0007: a tick reads only what a study has left, and counts read no run.

A reconcile tick counts runs per status twice and searches stale queued runs; on a study
whose runs have mostly succeeded the search must read the index over the runs that did not
succeed (``ix_runs_not_succeeded``), not every run of the study, and the counts must not
read ``runs`` at all (``study_counts``, revision 0007). The plans are checked with the
database's own EXPLAIN on the statements the store issues.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import event, text, update
from sqlalchemy.engine import Connection
from store_factories import STUDY_ID, claim, make_result, queue_all, register, true_counts

from orchestrator.contracts.results import RunStatus
from orchestrator.store import ResultStore
from orchestrator.store.models import RunRow

INDEX = "ix_runs_not_succeeded"


def test_counts_follow_claims_and_results(store: ResultStore) -> None:
    register(store, 12)
    assert store.count_by_status(STUDY_ID) == true_counts(store)
    queue_all(store)
    for index in range(7):
        won = claim(store, index)
        status = RunStatus.FAILED if index == 3 else RunStatus.SUCCESS
        store.finish_run(won, make_result(won, status, error_type="E", error_message="x"))
    claim(store, 9)

    counts = store.count_by_status(STUDY_ID)

    assert counts == true_counts(store)
    assert (counts["success"], counts["failed"], counts["running"], counts["queued"]) == (
        6,
        1,
        1,
        4,
    )
    assert store.count_by_status("no-such-study") == {status.value: 0 for status in RunStatus}


@contextmanager
def _statements(store: ResultStore) -> Iterator[list[tuple[str, Any]]]:
    seen: list[tuple[str, Any]] = []

    def record(_c: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        seen.append((statement, parameters))

    event.listen(store.engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(store.engine, "before_cursor_execute", record)


def _plan(connection: Connection, statement: str, parameters: Any) -> str:
    if connection.dialect.name == "postgresql":
        rows = connection.exec_driver_sql(f"EXPLAIN {statement}", parameters).all()
        return "\n".join(str(row[0]) for row in rows)
    rows = connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", parameters).all()
    return "\n".join(str(row[-1]) for row in rows)


def _mostly_succeeded(store: ResultStore, n: int, left: int) -> None:
    """``n`` runs of which all but the last ``left`` succeeded (set directly: the plan, not
    the path, is under test), statistics fresh."""
    register(store, n)
    with store.engine.begin() as connection:
        connection.execute(
            update(RunRow)
            .where(RunRow.study_id == STUDY_ID, RunRow.plan_index < n - left)
            .values(status=RunStatus.SUCCESS.value)
        )
        connection.execute(
            update(RunRow)
            .where(RunRow.study_id == STUDY_ID, RunRow.plan_index >= n - left)
            .values(status=RunStatus.QUEUED.value, queued_at=None)
        )
        connection.execute(text("ANALYZE"))


def _plans_of(store: ResultStore, call: Callable[[], object]) -> list[str]:
    with _statements(store) as seen:
        call()
    plans = []
    with store.engine.begin() as connection:
        for statement, parameters in seen:
            if " runs" in statement and not statement.lstrip().upper().startswith("SET"):
                plans.append(_plan(connection, statement, parameters))
    return plans


def test_the_tick_reads_the_index_of_what_is_left(store: ResultStore) -> None:
    _mostly_succeeded(store, 3000, left=20)

    with _statements(store) as seen:
        store.count_by_status(STUDY_ID)
    # queued_timeout_s=0: every queued run is stale, so the stale-queued search runs
    reconciled = _plans_of(store, lambda: store.reconcile(STUDY_ID, queued_timeout_s=0.0))

    counted = [statement for statement, _ in seen if " study_counts" in statement]
    assert len(counted) == 1 and not any(" runs" in statement for statement, _ in seen), seen
    with store.engine.connect() as connection:
        plan = _plan(connection, *seen[-1])
    assert "study_counts" in plan and " runs" not in plan, plan
    stale = [plan for plan in reconciled if INDEX in plan]
    assert stale, reconciled
    assert store.count_by_status(STUDY_ID)["success"] == 2980


def test_paging_planned_runs_starts_past_the_last_page(store: ResultStore) -> None:
    register(store, 10)

    first = [spec.index for spec, _ in store.queue_next(STUDY_ID, batch=3)]
    past = [spec.index for spec, _ in store.queue_next(STUDY_ID, batch=3, after=5)]
    rest = [spec.index for spec, _ in store.queue_next(STUDY_ID, batch=10)]

    assert (first, past, rest) == ([0, 1, 2], [6, 7, 8], [3, 4, 5, 9])
    assert store.queue_next(STUDY_ID, after=-1) == []
