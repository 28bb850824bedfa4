"""Reading one study's runs for a person: ``studyq runs``, ``studyq show`` and ``status``.

Every query is bounded: a listing is one ``ORDER BY ... LIMIT`` (the slowest, the best, or
plan order over the ``(study_id, status, plan_index)`` index), a run is looked up by
``(study_id, run_id)`` in each study, and its attempts, evaluations and events by their
primary key prefix ``(study_id, plan_index)``. Numeric values inside JSON cells (the
primary outcome, a key of ``metrics``, an evaluation's ``metric_value``) are compared as
numbers on both backends; a cell that holds no number (text, a bool) sorts as missing.
Lookups and counts :mod:`.queries` already has are called from there.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any, Literal, TypeVar

from sqlalchemy import Float, case, cast, func, literal, select
from sqlalchemy.engine import Connection
from sqlalchemy.sql.elements import ColumnElement

from orchestrator.contracts.conditions import condition_label
from orchestrator.contracts.results import RunStatus
from orchestrator.store.models import (
    AttemptOutcome,
    AttemptRow,
    ConditionRow,
    EvaluationRow,
    EventRow,
    RunRow,
    StudyRow,
)
from orchestrator.store.queries import _RUN_COLUMNS, condition_record, find_runs_by_id
from orchestrator.store.records import (
    AttemptRecord,
    EvaluationRecord,
    EventRecord,
    RunRecord,
)

__all__ = [
    "NUMERIC_RUN_COLUMNS",
    "FinishedSpan",
    "MetricRef",
    "condition_labels",
    "find_runs_anywhere",
    "finished_span",
    "has_metric",
    "list_runs",
    "metric_names",
    "run_attempts",
    "run_evaluations",
    "run_events",
    "similar_run_ids",
]

_RESULT = RunRow.__table__.c
_EVALUATION = EvaluationRow.__table__.c

NUMERIC_RUN_COLUMNS = ("primary_outcome", "latency_s", "cost_usd", "input_tokens", "output_tokens")
"""Result columns of ``runs`` that hold a number a listing can sort by."""

_METRIC_SAMPLE = 200
"""Finished runs whose ``metrics`` keys are read to name the metrics that exist (an error
message, so a sample: runs of one study report the same keys)."""


@dataclass(frozen=True, slots=True)
class MetricRef:
    """Where a metric lives: a numeric result ``column`` of ``runs``, a ``key`` of the
    ``metrics`` cell, or the ``metric_name`` of evaluation rows (``evaluation``)."""

    source: Literal["column", "metrics", "evaluation"]
    name: str


@dataclass(frozen=True, slots=True)
class FinishedSpan:
    """When a study's first attempt started and its last finished attempt ended."""

    first_started_at: datetime | None
    last_finished_at: datetime | None

    @property
    def seconds(self) -> float | None:
        if self.first_started_at is None or self.last_finished_at is None:
            return None
        return max(0.0, (self.last_finished_at - self.first_started_at).total_seconds())


# -- numbers inside JSON -----------------------------------------------------------------


def _json_number(connection: Connection, cell: Any, key: str | None) -> ColumnElement[Any]:
    """``cell`` (or its ``key``) as a float where it holds a JSON number, else NULL."""
    if connection.dialect.name == "postgresql":
        value = cell if key is None else cell.op("->")(literal(key))
        return case((func.jsonb_typeof(value) == "number", cast(value, Float)), else_=None)
    path = "$" if key is None else '$."' + key.replace('"', '""') + '"'
    return case(
        (func.json_type(cell, path).in_(["integer", "real"]), func.json_extract(cell, path)),
        else_=None,
    )


def _metric_value(connection: Connection, metric: MetricRef, best_low: bool) -> ColumnElement[Any]:
    """The metric of each run, as an expression over ``runs``; evaluations are folded to one
    value per run (the best of its rows for ``metric_name``)."""
    if metric.source == "column":
        column = _RESULT[metric.name]
        return (
            _json_number(connection, column, None) if metric.name == "primary_outcome" else column
        )
    if metric.source == "metrics":
        return _json_number(connection, _RESULT.metrics, metric.name)
    number = _json_number(connection, _EVALUATION.metric_value, None)
    fold = func.min(number) if best_low else func.max(number)
    return (
        select(fold)
        .where(
            EvaluationRow.study_id == RunRow.study_id,
            EvaluationRow.plan_index == RunRow.plan_index,
            _EVALUATION.metric_name == metric.name,
        )
        .scalar_subquery()
    )


# -- listings ------------------------------------------------------------------------------


def list_runs(
    connection: Connection,
    study_id: str,
    *,
    statuses: Sequence[str] | None = None,
    order: Literal["plan", "slowest", "best"] = "plan",
    metric: MetricRef | None = None,
    best_low: bool = False,
    limit: int = 50,
) -> list[tuple[RunRecord, float | None]]:
    """Up to ``limit`` runs with their ``metric`` value (None without one): in plan order,
    the slowest first, or the best first by ``metric`` (lowest first when ``best_low``).
    Runs without the value are left out of ``slowest`` and ``best``."""
    value: ColumnElement[Any] = (
        literal(None) if metric is None else _metric_value(connection, metric, best_low)
    )
    query = select(*_RUN_COLUMNS, value.label("metric_value")).where(RunRow.study_id == study_id)
    if statuses:
        query = query.where(RunRow.status.in_([RunStatus(s).value for s in statuses]))
    if order == "slowest":
        query = query.where(_RESULT.latency_s.is_not(None)).order_by(
            _RESULT.latency_s.desc(), RunRow.plan_index
        )
    elif order == "best":
        if metric is None:
            raise ValueError("list_runs: order='best' needs a metric.")
        ranked = value.asc() if best_low else value.desc()
        query = query.where(value.is_not(None)).order_by(ranked, RunRow.plan_index)
    else:
        query = query.order_by(RunRow.plan_index)
    rows = connection.execute(query.limit(limit))
    return [(RunRecord(*row[:-1]), None if row[-1] is None else float(row[-1])) for row in rows]


def has_metric(connection: Connection, study_id: str, metric: MetricRef) -> bool:
    """Whether any run of the study has a number for ``metric``."""
    value = _metric_value(connection, metric, best_low=True)
    query = select(literal(1)).where(RunRow.study_id == study_id, value.is_not(None)).limit(1)
    return connection.execute(query).first() is not None


def metric_names(connection: Connection, study_id: str) -> dict[str, list[str]]:
    """The metrics runs of the study have, by where they live (for an error message): the
    numeric result columns with a value, ``metrics`` keys of a sample of finished runs, and
    evaluation metric names."""
    columns = [
        name
        for name in NUMERIC_RUN_COLUMNS
        if has_metric(connection, study_id, MetricRef("column", name))
    ]
    keys: set[str] = set()
    sample = (
        select(_RESULT.metrics)
        .where(RunRow.study_id == study_id, _RESULT.metrics.is_not(None))
        .limit(_METRIC_SAMPLE)
    )
    for (metrics,) in connection.execute(sample):
        keys.update(k for k, v in (metrics or {}).items() if _is_number(v))
    evaluations = connection.execute(
        select(_EVALUATION.metric_name)
        .where(EvaluationRow.study_id == study_id, _EVALUATION.metric_name.is_not(None))
        .distinct()
        .order_by(_EVALUATION.metric_name)
        .limit(100)
    ).scalars()
    return {
        "column": columns,
        "metrics": sorted(keys - set(columns)),
        "evaluation": [name for name in evaluations if name],
    }


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def condition_labels(
    connection: Connection, study_id: str, condition_ids: Iterable[str]
) -> dict[str, str]:
    """The readable label of each of these conditions (by the ``(study_id, condition_id)``
    index); an id the store does not hold maps to itself."""
    wanted = sorted(set(condition_ids))
    labels = {condition_id: condition_id for condition_id in wanted}
    if not wanted:
        return labels
    rows = connection.execute(
        select(ConditionRow).where(
            ConditionRow.study_id == study_id, ConditionRow.condition_id.in_(wanted)
        )
    )
    for row in rows:
        labels[row.condition_id] = condition_label(condition_record(row))
    return labels


def finished_span(connection: Connection, study_id: str) -> FinishedSpan:
    """From the first attempt's start to the last finished attempt's end (database clock):
    the span a finished study's rate is measured over, which no later wall time changes."""
    first, last = connection.execute(
        select(
            select(func.min(AttemptRow.started_at))
            .where(AttemptRow.study_id == study_id)
            .scalar_subquery(),
            select(func.max(AttemptRow.ended_at))
            .where(
                AttemptRow.study_id == study_id,
                AttemptRow.outcome.in_([AttemptOutcome.SUCCESS, AttemptOutcome.FAILED]),
            )
            .scalar_subquery(),
        )
    ).one()
    return FinishedSpan(first, last)


# -- one run -------------------------------------------------------------------------------


def find_runs_anywhere(connection: Connection, run_id: str) -> list[RunRecord]:
    """Every run with this id in any study (by each study's ``(study_id, run_id)`` index)."""
    runs: list[RunRecord] = []
    for study_id in connection.execute(select(StudyRow.study_id).order_by(StudyRow.study_id)):
        runs.extend(find_runs_by_id(connection, study_id[0], run_id))
    return runs


def similar_run_ids(connection: Connection, run_id: str, *, per_study: int = 2) -> list[str]:
    """Run ids next to ``run_id`` in sort order in each study (an index range scan each
    way): where a mistyped or shortened id lands, for a did-you-mean."""
    near: list[str] = []
    for (study_id,) in connection.execute(select(StudyRow.study_id)):
        for ordered in (
            select(RunRow.run_id)
            .where(RunRow.study_id == study_id, RunRow.run_id >= run_id)
            .order_by(RunRow.run_id)
            .limit(per_study),
            select(RunRow.run_id)
            .where(RunRow.study_id == study_id, RunRow.run_id < run_id)
            .order_by(RunRow.run_id.desc())
            .limit(per_study),
        ):
            near.extend(connection.execute(ordered).scalars())
    return sorted(set(near))


def run_attempts(connection: Connection, study_id: str, index: int) -> list[AttemptRecord]:
    """Every claim of one run, in attempt order."""
    rows = connection.execute(
        select(AttemptRow)
        .where(AttemptRow.study_id == study_id, AttemptRow.plan_index == index)
        .order_by(AttemptRow.attempt)
    )
    return [
        AttemptRecord(
            study_id=row.study_id,
            index=row.plan_index,
            run_id=row.run_id,
            attempt=row.attempt,
            worker=row.worker,
            started_at=row.started_at,
            ended_at=row.ended_at,
            outcome=row.outcome,
            error_kind=row.error_kind,
            error_type=row.error_type,
            error_message=row.error_message,
        )
        for row in rows
    ]


_Child = TypeVar("_Child", EvaluationRecord, EventRecord)


def _children(
    connection: Connection,
    table: type[EvaluationRow] | type[EventRow],
    record: type[_Child],
    study_id: str,
    index: int,
    limit: int | None,
) -> list[_Child]:
    names = [f.name for f in fields(record) if f.name not in ("index", "extra")]
    query = (
        select(table)
        .where(table.study_id == study_id, table.plan_index == index)
        .order_by(table.seq)
        .limit(limit)
    )
    return [
        record(
            index=row.plan_index,
            extra=dict(row.extra),
            **{name: row._mapping[name] for name in names},
        )
        for row in connection.execute(query)
    ]


def run_evaluations(connection: Connection, study_id: str, index: int) -> list[EvaluationRecord]:
    """The evaluation rows of one run, in the order the evaluator produced them."""
    return _children(connection, EvaluationRow, EvaluationRecord, study_id, index, None)


def run_events(
    connection: Connection, study_id: str, index: int, *, limit: int = 20
) -> tuple[list[EventRecord], int]:
    """The first ``limit`` events of one run and how many it has."""
    total = connection.execute(
        select(func.count()).where(EventRow.study_id == study_id, EventRow.plan_index == index)
    ).scalar_one()
    events = _children(connection, EventRow, EventRecord, study_id, index, limit)
    return events, int(total)
