"""The result columns are declared once (orchestrator.store.columns) and everything derives."""

from __future__ import annotations

import dataclasses

from store_factories import claim, make_result, queue_all, register

from orchestrator import export
from orchestrator.store import EvaluationRecord, EventRecord, ResultStore, RunRecord
from orchestrator.store.columns import EVALUATION_COLUMNS, EVENT_COLUMNS, RESULT_COLUMNS
from orchestrator.store.models import EvaluationRow, EventRow, RunRow


def test_every_declared_column_is_a_table_column_and_a_record_field() -> None:
    for table, record, names in (
        (RunRow, RunRecord, [spec.name for spec in RESULT_COLUMNS]),
        (EvaluationRow, EvaluationRecord, list(EVALUATION_COLUMNS.names)),
        (EventRow, EventRecord, list(EVENT_COLUMNS.names)),
    ):
        assert set(names) <= set(table.__table__.c.keys())
        assert set(names) <= {field.name for field in dataclasses.fields(record)}


def test_the_csv_columns_come_from_the_declaration() -> None:
    assert ("run_id", *EVALUATION_COLUMNS.names) == export.EVALUATION_COLUMNS
    assert EVENT_COLUMNS.names == export.EVENT_COLUMNS
    # runs.csv: the upstream's columns, then the declared ones it lacks (error_info first)
    declared = [spec.export for spec in RESULT_COLUMNS if spec.export]
    added = export.RUN_CSV_COLUMNS[len(export.RUN_COLUMNS) :]
    assert export.RUN_CSV_COLUMNS[: len(export.RUN_COLUMNS)] == export.RUN_COLUMNS
    assert list(added) == [name for name in declared if name not in export.RUN_COLUMNS]
    assert added[0] == "error_info"


def test_a_finished_run_reads_back_every_declared_column(store: ResultStore) -> None:
    # Given a finished run
    register(store, 1)
    queue_all(store)
    won = claim(store, 0)
    assert store.finish_run(won, make_result(won))
    # When it is read back
    record = store.find_run(won.study_id, 0)
    # Then each declared column holds what the declaration's source made of the result
    assert record is not None
    metrics = dict(make_result(won).metrics)
    for spec in RESULT_COLUMNS:
        assert spec.source is not None
        assert getattr(record, spec.name) == spec.source(make_result(won), metrics), spec.name
