"""The exporter's readers give what the store's record readers give, on both backends.

``orchestrator.store.export_reads`` reads JSON columns as text and decodes repeated texts
once; these tests pin that the values (key order included) are those of ``iter_runs``,
``iter_evaluations``, ``iter_events`` and ``iter_attempts``, across page boundaries.
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import update
from store_factories import STUDY_ID, claim, make_result, queue_all, register

from orchestrator.contracts.results import RunStatus
from orchestrator.store import ResultStore, export_reads
from orchestrator.store.columns import EVALUATION_COLUMNS, EVENT_COLUMNS
from orchestrator.store.export_reads import (
    ExportRun,
    _loads,
    iter_attempt_rows,
    iter_child_rows,
    iter_run_records,
)
from orchestrator.store.models import AttemptRow, EvaluationRow, EventRow, RunRow
from orchestrator.store.queries import plan_pages
from orchestrator.store.records import RunRecord
from orchestrator.store.sqltypes import iso_from_utc_text

_FLOAT8 = 701
"""A result column's driver type code, which PostgreSQL's numeric types need to say whether
they convert (float8: they do not)."""


def _finish_some(store: ResultStore) -> None:
    """Given 7 runs: runs 0-3 succeed, run 4 fails, runs 5 and 6 stay queued."""
    register(store, 7)
    queue_all(store)
    for index in range(5):
        won = claim(store, index)
        status = RunStatus.SUCCESS if index < 4 else RunStatus.FAILED
        assert store.finish_run(won, make_result(won, status, score=index / 10))


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _exported(record: RunRecord) -> ExportRun:
    """What iter_run_records gives for a record of ``ResultStore.iter_runs``: its values,
    with the times as ISO text."""
    values = {name: getattr(record, name) for name in ExportRun._fields if name != "plan_index"}
    values.update(started_at=_iso(record.started_at), ended_at=_iso(record.ended_at))
    return ExportRun(plan_index=record.index, **values)


def test_run_records_equal_the_stores_records_in_every_page(store: ResultStore) -> None:
    _finish_some(store)
    for statuses in (None, ("success", "failed")):
        expected = [_exported(r) for r in store.iter_runs(STUDY_ID, statuses=statuses)]
        got = list(iter_run_records(store.engine, STUDY_ID, statuses=statuses, batch=2))
        assert got == expected
        assert [list(r.factor_assignments) for r in got] == [
            list(r.factor_assignments) for r in expected
        ]
    assert len(expected) == 5
    assert all(r.started_at and r.ended_at for r in got)


def test_child_rows_equal_the_stores_records(store: ResultStore) -> None:
    _finish_some(store)
    cases: list[tuple[Any, Any, Any]] = [
        (EvaluationRow, EVALUATION_COLUMNS, store.iter_evaluations(STUDY_ID)),
        (EventRow, EVENT_COLUMNS, store.iter_events(STUDY_ID)),
    ]
    for table, columns, records in cases:
        names = columns.csv_columns
        expected = [
            [record.index, *(getattr(record, name) for name in names), record.extra]
            for record in records
        ]
        got = list(iter_child_rows(store.engine, table, STUDY_ID, names, batch=3))
        assert got == expected
        assert [list(row[-1]) for row in got] == [list(row[-1]) for row in expected]
    assert len(expected) == 5  # one event per finished run


def test_attempt_rows_equal_the_stores_records(store: ResultStore) -> None:
    _finish_some(store)
    expected = [
        (a.run_id, a.attempt, a.worker, _iso(a.started_at), _iso(a.ended_at), a.outcome,
         a.error_kind, a.error_type, a.error_message, a.index)
        for a in store.iter_attempts(STUDY_ID)
    ]  # fmt: skip
    got = [tuple(row) for row in iter_attempt_rows(store.engine, STUDY_ID, batch=2)]
    assert got == expected
    assert len(got) == 5


def test_columns_left_out_are_none_and_the_rest_unchanged(store: ResultStore) -> None:
    _finish_some(store)
    expected = [_exported(r) for r in store.iter_runs(STUDY_ID)]
    got = list(iter_run_records(store.engine, STUDY_ID, without=("outputs",)))
    assert [r.outputs for r in got] == [None] * len(expected)
    assert [r._replace(outputs=None) for r in expected] == got
    with pytest.raises(ValueError, match="seed"):
        next(iter_run_records(store.engine, STUDY_ID, without=("seed",)))


def test_pages_cross_windows_with_no_rows_and_runs_with_more_rows_than_a_page(
    store: ResultStore,
) -> None:
    """Pages go by windows of plan indices: a window whose runs are all unfinished reads
    nothing and the next window follows; a run with more child rows than a page continues
    in the same window."""
    register(store, 9)
    queue_all(store)
    for index in (0, 1, 7, 8):  # indices 2-6 stay queued: windows [2, 4) and [4, 6) empty
        won = claim(store, index)
        result = make_result(won)
        if index == 7:
            many = [{"event_type": "step", "text": f"e{i}", "meta_json": {}} for i in range(5)]
            result = replace(result, events=many)
        assert store.finish_run(won, result)
    finished = list(iter_run_records(store.engine, STUDY_ID, statuses=("success",), batch=2))
    assert [run.plan_index for run in finished] == [0, 1, 7, 8]
    names = EVENT_COLUMNS.csv_columns
    expected = [
        [record.index, *(getattr(record, name) for name in names), record.extra]
        for record in store.iter_events(STUDY_ID)
    ]
    got = list(iter_child_rows(store.engine, EventRow, STUDY_ID, names, batch=2))
    assert got == expected
    assert [row[0] for row in got] == [0, 1, 7, 7, 7, 7, 7, 8]
    assert list(iter_run_records(store.engine, "no-such-study")) == []


@pytest.mark.parametrize(
    "moment",
    [
        datetime(2026, 12, 7, 23, 27, 47, tzinfo=UTC),  # no fraction in isoformat
        datetime(2026, 12, 7, 23, 27, 47, 120, tzinfo=UTC),
        datetime(2026, 1, 2, 3, 4, 5, 999999, tzinfo=timezone(timedelta(hours=-5))),
    ],
)
def test_times_are_the_isoformat_of_the_stored_utc_value(
    store: ResultStore, moment: datetime
) -> None:
    """The times are read as text and made ISO without a datetime; they must still be
    exactly ``isoformat()`` of the UTC value, whatever the fraction and the zone given."""
    _finish_some(store)
    with store.engine.begin() as connection:
        connection.execute(
            update(RunRow).where(RunRow.plan_index == 2).values(started_at=moment, ended_at=moment)
        )
        connection.execute(
            update(AttemptRow).where(AttemptRow.plan_index == 2).values(started_at=moment)
        )
    expected = moment.astimezone(UTC).isoformat()
    runs = {
        run.plan_index: (run.started_at, run.ended_at)
        for run in iter_run_records(store.engine, STUDY_ID)
    }
    assert runs[2] == (expected, expected)
    attempts = [row for row in iter_attempt_rows(store.engine, STUDY_ID) if row[-1] == 2]
    assert [row[3] for row in attempts] == [expected]
    assert runs[5] == (None, None)  # queued: no times


@pytest.mark.parametrize(
    ("stored", "iso"),
    [
        ("2026-12-07 23:27:47.000000", "2026-12-07T23:27:47+00:00"),
        ("2026-12-07 23:27:47.000120", "2026-12-07T23:27:47.000120+00:00"),
        ("2026-12-07 23:27:47", "2026-12-07T23:27:47+00:00"),  # hand-written SQL
        ("2026-12-07T23:27:47.5+01:00", "2026-12-07T22:27:47.500000+00:00"),
        (None, None),
    ],
)
def test_iso_from_utc_text(stored: str | None, iso: str | None) -> None:
    assert iso_from_utc_text(stored) == iso


@pytest.mark.parametrize(
    "raw",
    [
        '{"score": 0.73, "nested": {"b": [1, 2.5e-07, null]}, "a": true}',
        '{"z": 1, "a": 2}',  # key order kept
        "0.7312345",
        "-12",
        "12345678901234567890",
        '"text with \\"quotes\\" and \\u00e9"',
        "[]",
        "null",
        "NaN",  # Python's json.dumps writes it; SQLite keeps that text
        "-Infinity",
        ' {"a": 1}',
        '{"a": 1} ',
        "\n[1]\n",
    ],
)
def test_stored_json_decodes_as_json_loads_does(raw: str) -> None:
    value = _loads(raw)
    expected = json.loads(raw)
    assert repr(value) == repr(expected)
    if isinstance(expected, dict):
        assert list(value) == list(expected)


@pytest.mark.parametrize("raw", ['{"a": 1} x', "[1, 2", "", "{'a': 1}", "1 2"])
def test_a_text_that_is_not_json_raises_as_json_loads_does(raw: str) -> None:
    with pytest.raises(json.JSONDecodeError) as expected:
        json.loads(raw)
    with pytest.raises(json.JSONDecodeError) as got:
        _loads(raw)
    assert str(got.value) == str(expected.value)


def test_the_exporters_columns_need_no_result_processing(
    store: ResultStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The readers take the driver's tuples as they come (plan_pages(raw=True)): a selected
    # column whose type converts what the driver returns (a UTCDateTime, a Boolean on
    # SQLite) would reach the artifacts unconverted
    _finish_some(store)
    selected: list[Any] = []

    def spy(engine: Any, table: Any, study_id: str, build: Any, *rest: Any, **kw: Any) -> Any:
        assert kw == {"raw": True}
        selected.extend(build(0, 1, None).selected_columns)
        return plan_pages(engine, table, study_id, build, *rest, **kw)

    monkeypatch.setattr(export_reads, "plan_pages", spy)
    list(iter_run_records(store.engine, STUDY_ID))
    for table, columns in ((EvaluationRow, EVALUATION_COLUMNS), (EventRow, EVENT_COLUMNS)):
        list(iter_child_rows(store.engine, table, STUDY_ID, columns.csv_columns))
    list(iter_attempt_rows(store.engine, STUDY_ID))
    dialect = store.engine.dialect
    converting = [
        column.name
        for column in selected
        if column.type.dialect_impl(dialect).result_processor(dialect, _FLOAT8) is not None
    ]
    assert len(selected) > 50
    assert converting == []
