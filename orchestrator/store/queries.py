"""Reading the store: find_* lookups, counts, and bounded-memory iteration in plan order.

Iterators page with keyset pagination (``WHERE key > last ORDER BY key LIMIT n``), one short
read-only transaction per page, and yield between pages. Memory stays bounded by the page
size whatever the study size, and no transaction stays open while the caller works through
a page (a long reader would stop SQLite from checkpointing its WAL and hold back PostgreSQL's
vacuum). Rows written while iterating may or may not be seen; rows are never seen twice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import fields
from typing import Any, TypeVar

from sqlalchemy import Engine, Select, func, select, tuple_
from sqlalchemy.engine import Connection, Row

from orchestrator.contracts.results import RunStatus
from orchestrator.store.counts import count_by_status
from orchestrator.store.engine import transaction
from orchestrator.store.models import (
    AttemptOutcome,
    AttemptRow,
    ConditionRow,
    EvaluationRow,
    EventRow,
    RunRow,
    StudyRow,
)
from orchestrator.store.predicates import where_status
from orchestrator.store.records import (
    AttemptRecord,
    ConditionRecord,
    ErrorSummary,
    EvaluationRecord,
    EventRecord,
    ProgressStats,
    RunRecord,
    StudyInfo,
)
from orchestrator.store.sqltypes import db_now, db_now_plus

__all__ = [
    "GROUP_COLUMNS",
    "count_by",
    "count_by_each",
    "count_by_status",
    "find_run",
    "find_runs_by_id",
    "find_study",
    "iter_attempts",
    "iter_conditions",
    "iter_evaluations",
    "iter_events",
    "iter_runs",
    "list_studies",
    "plan_pages",
    "progress_stats",
    "top_errors",
]

PAGE_SIZE = 1_000

GROUP_COLUMNS: dict[str, Any] = {
    "condition": RunRow.condition_id,
    "agent": RunRow.agent_key,
    "problem": RunRow.problem_key,
}
"""What ``count_by`` can group runs by."""

_RESULT = RunRow.__table__.c
"""The columns of ``runs``, for the declared result columns (no typed ORM attributes)."""


def _study(row: Row[Any]) -> StudyInfo:
    return StudyInfo(
        study_id=row.study_id,
        definition=row.definition,
        definition_hash=row.definition_hash,
        plan_fingerprint=row.plan_fingerprint,
        run_count=row.run_count,
        condition_count=row.condition_count,
        max_attempts=row.max_attempts,
        submitted_by=row.submitted_by,
        submitted_at=row.submitted_at,
        allowed_references=list(row.allowed_references),
    )


def find_study(connection: Connection, study_id: str) -> StudyInfo | None:
    """The registered study, or None."""
    row = connection.execute(select(StudyRow).where(StudyRow.study_id == study_id)).first()
    return None if row is None else _study(row)


def list_studies(connection: Connection) -> list[StudyInfo]:
    """Every registered study, newest first."""
    rows = connection.execute(
        select(StudyRow).order_by(StudyRow.submitted_at.desc(), StudyRow.study_id)
    )
    return [_study(row) for row in rows]


def count_by(connection: Connection, study_id: str, by: str) -> dict[str, dict[str, int]]:
    """Runs per status within each condition, agent or problem (``by`` is a key of
    :data:`GROUP_COLUMNS`), groups in first-plan-appearance order is not guaranteed: sorted."""
    return count_by_each(connection, study_id, (by,))[by]


def count_by_each(
    connection: Connection, study_id: str, names: Sequence[str] = tuple(GROUP_COLUMNS)
) -> dict[str, dict[str, dict[str, int]]]:
    """:func:`count_by` for each of ``names``. On PostgreSQL one pass over the study's runs
    (``GROUPING SETS``: ``studyq status`` and ``watch`` show all three groupings); SQLite has
    no grouping sets and groups once per name."""
    for name in names or ("",):
        if name not in GROUP_COLUMNS:
            raise ValueError(f"count_by: by must be one of {sorted(GROUP_COLUMNS)}, got {name!r}.")
    grouped: dict[str, dict[str, dict[str, int]]] = {name: {} for name in names}
    for name, key, status, count in _grouped_counts(connection, study_id, names):
        grouped[name].setdefault(key, {})[status] = count
    return {name: dict(sorted(groups.items())) for name, groups in grouped.items()}


def _grouped_counts(
    connection: Connection, study_id: str, names: Sequence[str]
) -> Iterator[tuple[str, str, str, int]]:
    """``(name, key, status, count)`` rows of :func:`count_by_each`."""
    columns = [GROUP_COLUMNS[name] for name in names]
    study = RunRow.study_id == study_id
    if connection.dialect.name != "postgresql" or len(names) == 1:
        for name, column in zip(names, columns, strict=True):
            rows = connection.execute(
                select(column, RunRow.status, func.count())
                .where(study)
                .group_by(column, RunRow.status)
            )
            for key, status, count in rows:
                yield name, key, status, count
        return
    # grouping(c1, .., cn) has bit n-1-i set when column i is not in the row's grouping set
    width = len(columns)
    rows = connection.execute(
        select(func.grouping(*columns), *columns, RunRow.status, func.count())
        .where(study)
        .group_by(func.grouping_sets(*(tuple_(column, RunRow.status) for column in columns)))
    )
    for mask, *keys_status_count in rows:
        *keys, status, count = keys_status_count
        for i, name in enumerate(names):
            if not mask >> (width - 1 - i) & 1:
                yield name, keys[i], status, count


def progress_stats(
    connection: Connection, study_id: str, *, window_s: float = 300.0
) -> ProgressStats:
    """Cost so far and the finishing rate over the last ``window_s`` seconds (database
    clock; shortened to the time since the first claim early in a sweep)."""
    cost = connection.execute(
        select(func.coalesce(func.sum(_RESULT.cost_usd), 0.0)).where(RunRow.study_id == study_id)
    ).scalar_one()
    since = db_now_plus(-window_s)
    now, first, recent = connection.execute(
        select(
            db_now(),
            select(func.min(AttemptRow.started_at))
            .where(AttemptRow.study_id == study_id)
            .scalar_subquery(),
            select(func.count())
            .where(
                AttemptRow.study_id == study_id,
                AttemptRow.outcome.in_([AttemptOutcome.SUCCESS, AttemptOutcome.FAILED]),
                AttemptRow.ended_at >= since,
            )
            .scalar_subquery(),
        )
    ).one()
    window = window_s
    if first is not None:  # both typed UTCDateTime in the SELECT, so aware UTC here
        window = max(0.0, min(window_s, (now - first).total_seconds()))
    return ProgressStats(study_id, float(cost or 0.0), int(recent or 0), window)


def top_errors(connection: Connection, study_id: str, *, limit: int = 10) -> list[ErrorSummary]:
    """Failed runs grouped by error kind and type, largest group first, each with an example
    message and an example run id (both of the group, not necessarily of one run)."""
    kind, kind_type = _RESULT.error_kind, _RESULT.error_type
    rows = connection.execute(
        select(
            kind,
            kind_type,
            func.count().label("n"),
            func.min(_RESULT.error_message),
            func.min(RunRow.run_id),
        )
        .where(RunRow.study_id == study_id, where_status(RunStatus.FAILED))
        .group_by(kind, kind_type)
        .order_by(func.count().desc(), kind, kind_type)
        .limit(limit)
    )
    return [ErrorSummary(*row) for row in rows]


_RUN_COLUMNS = tuple(
    RunRow.__table__.c["plan_index" if name == "index" else name]
    for name in RunRecord.__dataclass_fields__
)
"""The runs columns in :class:`RunRecord` field order, so a row becomes a record
positionally (named access on a Row costs ~25 us per run, a third of a 1M-run export)."""


_make_run: Callable[..., RunRecord] = RunRecord


def _run(row: Row[Any]) -> RunRecord:
    return _make_run(*row)


def find_run(connection: Connection, study_id: str, index: int) -> RunRecord | None:
    """The run at ``index`` in the plan, or None."""
    row = connection.execute(
        select(*_RUN_COLUMNS).where(RunRow.study_id == study_id, RunRow.plan_index == index)
    ).first()
    return None if row is None else _run(row)


def find_runs_by_id(connection: Connection, study_id: str, run_id: str) -> list[RunRecord]:
    """Every run with this id, in plan order (usually one; more when levels repeat)."""
    rows = connection.execute(
        select(*_RUN_COLUMNS)
        .where(RunRow.study_id == study_id, RunRow.run_id == run_id)
        .order_by(RunRow.plan_index)
    )
    return [_run(row) for row in rows]


# -- iteration -------------------------------------------------------------------------------


def _pages(
    engine: Engine,
    build: Callable[[tuple[Any, ...] | None], Select[Any]],
    key: Callable[[Any], tuple[Any, ...]],
) -> Iterator[list[Row[Any]]]:
    """Yield pages of ``build(last_key)`` until one comes back empty."""
    last: tuple[Any, ...] | None = None
    while True:
        with transaction(engine, readonly=True) as connection:
            page = list(connection.execute(build(last)))
        if not page:
            return
        yield page
        last = key(page[-1])


def plan_pages(
    engine: Engine,
    table: Any,
    study_id: str,
    build: Callable[[int, int, tuple[Any, ...] | None], Select[Any]],
    key: Callable[[Any], tuple[Any, ...]],
    batch: int,
    *,
    raw: bool = False,
) -> Iterator[Sequence[Any]]:
    """Pages of ``build(low, high, last)``: the rows of ``table`` (a table of the study's
    runs or of their child rows) with plan indices in ``[low, high)`` past the key ``last``
    (``key(row)``, its first cell the plan index; None: from the window's start), at most
    ``batch`` each, in key order.

    ``raw``: the driver's tuples instead of SQLAlchemy rows, for the exporter, which reads
    every row of a study and selects only columns that need no result processing (a test
    checks that). Making the rows cost 0.35 to 0.7 s per 100,000 runs here, a fifth of the
    runs' whole read.

    The windows of plan indices bound what each page's statement may read, whatever plan
    the database picks. With only ``key > last ORDER BY key LIMIT n``, PostgreSQL working
    from statistics older than the study's results (no ANALYZE since the runs finished; on a
    server without autovacuum, never) estimated a handful of matching rows and read and
    sorted *every* row past the key for each page: 0.35 s a page halfway through 100,000
    runs, quadratic in the study's size.
    """
    column = table.c.plan_index
    with transaction(engine, readonly=True) as connection:
        top = connection.execute(
            select(func.max(column)).where(table.c.study_id == study_id)
        ).scalar()
    if top is None:
        return
    low, last = 0, None
    while low <= top:
        high = low + batch
        with transaction(engine, readonly=True) as connection:
            result = connection.execute(build(low, high, last).limit(batch))
            page = result.cursor.fetchall() if raw else result.fetchall()
            result.close()
        if page:
            yield page
        more = key(page[-1]) if len(page) == batch else None
        if more is not None and (len(more) > 1 or more[0] < high - 1):
            last = more  # this window may hold more
        else:
            low, last = high, None


def _run_and_seq(row: Any) -> tuple[Any, ...]:
    return (row.plan_index, row.seq)


def _run_and_attempt(row: Any) -> tuple[Any, ...]:
    return (row.plan_index, row.attempt)


def iter_runs(
    engine: Engine,
    study_id: str,
    *,
    statuses: Iterable[RunStatus | str] | None = None,
    batch: int = PAGE_SIZE,
) -> Iterator[RunRecord]:
    """Runs of a study in plan order, optionally only those in ``statuses``."""
    wanted = None if statuses is None else [RunStatus(status).value for status in statuses]

    def build(low: int, high: int, last: tuple[Any, ...] | None) -> Select[Any]:
        query = select(*_RUN_COLUMNS).where(
            RunRow.study_id == study_id, RunRow.plan_index >= low, RunRow.plan_index < high
        )
        if wanted is not None:
            query = query.where(RunRow.status.in_(wanted))
        if last is not None:
            query = query.where(RunRow.plan_index > last[0])
        return query.order_by(RunRow.plan_index)

    pages = plan_pages(
        engine, RunRow.__table__, study_id, build, lambda row: (row.plan_index,), batch
    )
    for page in pages:
        yield from (_run(row) for row in page)


def iter_conditions(
    engine: Engine, study_id: str, *, batch: int = PAGE_SIZE
) -> Iterator[ConditionRecord]:
    """Conditions of a study in design order, admissible or not."""

    def build(last: tuple[Any, ...] | None) -> Select[Any]:
        query = select(ConditionRow).where(ConditionRow.study_id == study_id)
        if last is not None:
            query = query.where(ConditionRow.position > last[0])
        return query.order_by(ConditionRow.position).limit(batch)

    for page in _pages(engine, build, lambda row: (row.position,)):
        for row in page:
            yield condition_record(row)


def condition_record(row: Any) -> ConditionRecord:
    """A ``conditions`` row as a :class:`ConditionRecord`."""
    return ConditionRecord(
        study_id=row.study_id,
        position=row.position,
        condition_id=row.condition_id,
        admissible=row.admissible,
        constraint_messages=list(row.constraint_messages),
        factor_assignments=dict(row.factor_assignments),
        block_assignments=dict(row.block_assignments),
        metadata=dict(row._mapping["metadata"]),
    )


def iter_evaluations(
    engine: Engine, study_id: str, *, batch: int = PAGE_SIZE
) -> Iterator[EvaluationRecord]:
    """Evaluation rows of finished runs, in plan order then as the evaluator produced them."""
    return _iter_children(engine, EvaluationRow, EvaluationRecord, study_id, batch)


def iter_events(engine: Engine, study_id: str, *, batch: int = PAGE_SIZE) -> Iterator[EventRecord]:
    """Event rows of finished runs, in plan order then as the run emitted them."""
    return _iter_children(engine, EventRow, EventRecord, study_id, batch)


_Child = TypeVar("_Child", EvaluationRecord, EventRecord)


def _iter_children(
    engine: Engine,
    table: type[EvaluationRow] | type[EventRow],
    record: type[_Child],
    study_id: str,
    batch: int,
) -> Iterator[_Child]:
    """Rows of a child table as records: the keys, the declared columns (the record's own
    fields, :mod:`.columns`), and ``extra``."""
    names = [f.name for f in fields(record) if f.name not in ("index", "extra")]

    def build(low: int, high: int, last: tuple[Any, ...] | None) -> Select[Any]:
        query = select(table).where(
            table.study_id == study_id, table.plan_index >= low, table.plan_index < high
        )
        if last is not None:
            query = query.where(tuple_(table.plan_index, table.seq) > tuple_(*last))
        return query.order_by(table.plan_index, table.seq)

    for page in plan_pages(engine, table.__table__, study_id, build, _run_and_seq, batch):
        for row in page:
            values = row._mapping
            yield record(
                index=row.plan_index,
                extra=dict(row.extra),
                **{name: values[name] for name in names},
            )


def iter_attempts(
    engine: Engine, study_id: str, *, batch: int = PAGE_SIZE
) -> Iterator[AttemptRecord]:
    """Every claim of every run, in plan order then attempt order (the retry history)."""

    def build(low: int, high: int, last: tuple[Any, ...] | None) -> Select[Any]:
        query = select(AttemptRow).where(
            AttemptRow.study_id == study_id,
            AttemptRow.plan_index >= low,
            AttemptRow.plan_index < high,
        )
        if last is not None:
            query = query.where(tuple_(AttemptRow.plan_index, AttemptRow.attempt) > tuple_(*last))
        return query.order_by(AttemptRow.plan_index, AttemptRow.attempt)

    pages = plan_pages(engine, AttemptRow.__table__, study_id, build, _run_and_attempt, batch)
    for page in pages:
        for row in page:
            yield AttemptRecord(
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
