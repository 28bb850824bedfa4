"""The exporter's reads: every run, evaluation, event and attempt of a study, as plain tuples.

An export of 1,000,000 runs reads every row once, so what each row costs matters more than
anywhere else in the store. These readers select columns (never ORM entities), page through
the primary key (keyset pagination within windows of plan indices: bounded memory, bounded
work per statement whatever the planner's statistics, one short read transaction per page,
so they work through a transaction pooler too), and take JSON columns as their text and decode
each distinct text once per page window: the factor and block assignments, agent and problem
ids and provenance of a study repeat from run to run, and ``json.loads`` was the largest
single cost of an export. Decoded values may be shared between rows: callers must not
mutate them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

from sqlalchemy import JSON, Engine, Select, Text, cast, func, null, select, tuple_
from sqlalchemy.sql.elements import ColumnElement

from orchestrator.contracts.results import RunStatus
from orchestrator.store.models import AttemptRow, EvaluationRow, EventRow, RunRow
from orchestrator.store.queries import plan_pages
from orchestrator.store.sqltypes import iso_from_utc_text, utc_text

__all__ = [
    "EXPORT_PAGE",
    "ExportRun",
    "has_repeated_run_ids",
    "iter_attempt_rows",
    "iter_child_rows",
    "iter_run_records",
]

EXPORT_PAGE = 5_000
"""Rows per page: large enough that a page's query overhead is noise, small enough that a
page of runs stays a few MB."""

_MEMO_LIMIT = 8_192
"""Distinct JSON texts kept decoded; the memo is emptied when it grows past this."""

_scan: Callable[[str, int], tuple[Any, int]] = json.JSONDecoder().scan_once  # type: ignore[attr-defined]
"""The decoder's scanner (set in ``JSONDecoder.__init__``, so typeshed does not know it)."""


def _loads(raw: str) -> Any:
    """``json.loads`` of a stored JSON text, straight through the decoder's C scanner: the
    wrapper around it (type checks, two whitespace matches) was 1.0 µs of the 2.5 µs a
    run's metrics took to decode here, and of 1.4 µs for an event's extras. The scanner is
    what ``json.loads`` calls; a text it does not take whole (surrounding whitespace,
    trailing data, an error) goes to ``json.loads``, which decodes it or raises as before."""
    try:
        value, end = _scan(raw, 0)
    except StopIteration:
        return json.loads(raw)
    return value if end == len(raw) else json.loads(raw)


class _Decoder:
    """``json.loads`` of a text, remembered for texts seen before (bounded)."""

    def __init__(self) -> None:
        self._memo: dict[str, Any] = {}

    def __call__(self, raw: str | None) -> Any:
        if raw is None:
            return None
        try:
            return self._memo[raw]
        except KeyError:
            if len(self._memo) >= _MEMO_LIMIT:
                self._memo.clear()
            value = self._memo[raw] = _loads(raw)
            return value


def _is_json(column: ColumnElement[Any]) -> bool:
    return isinstance(column.type, JSON)


def _as_read(column: Any) -> ColumnElement[Any]:
    """JSON columns as their text (decoded by :class:`_Decoder`), the others as they are."""
    return cast(column, Text).label(column.name) if _is_json(column) else column


def _first(row: Sequence[Any]) -> tuple[Any, ...]:
    return (row[0],)


def _first_two(row: Sequence[Any]) -> tuple[Any, ...]:
    return (row[0], row[1])


def _decoding(
    columns: Sequence[Any], repeating: frozenset[str] = frozenset()
) -> Callable[[Sequence[Any]], list[Any]]:
    """A function turning a fetched row into a list with its JSON cells decoded; the texts
    of ``repeating`` columns are decoded once each (:class:`_Decoder`)."""
    remembered = _Decoder()
    memo = [i for i, c in enumerate(columns) if _is_json(c) and c.name in repeating]
    plain = [i for i, c in enumerate(columns) if _is_json(c) and c.name not in repeating]
    loads = _loads

    def convert(row: Sequence[Any]) -> list[Any]:
        values = list(row)
        for i in memo:
            values[i] = remembered(values[i])
        for i in plain:
            raw = values[i]
            if raw is not None:
                values[i] = loads(raw)
        return values

    return convert


class ExportRun(NamedTuple):
    """A run as the exporter reads it: the columns of
    :class:`~orchestrator.store.records.RunRecord` the artifacts hold, with the start and end
    time as ISO text (:func:`~orchestrator.store.sqltypes.iso_from_utc_text`). A tuple, not
    the record: building the frozen 35-field dataclass cost 8.9 µs a run here, this 0.6 µs,
    and no datetime is made for a time written as text. ``plan_index`` is the record's
    ``index`` (a tuple's ``index`` is a method)."""

    study_id: str
    plan_index: int
    run_id: str
    condition_id: str
    replicate: int
    seed: int
    agent_id: Any
    problem_id: Any
    agent_key: str
    problem_key: str
    factor_assignments: dict[str, Any]
    block_assignments: dict[str, Any]
    condition_fingerprint: str
    status: str
    started_at: str | None
    ended_at: str | None
    outputs: dict[str, Any] | None
    metrics: dict[str, Any] | None
    latency_s: float | None
    cost_usd: float | None
    input_tokens: int | None
    output_tokens: int | None
    primary_outcome: Any
    trace_refs: list[str] | None
    provenance: dict[str, Any] | None
    error_kind: str | None
    error_type: str | None
    error_message: str | None


_TIMES = frozenset(("started_at", "ended_at"))
_RUN_TABLE_COLUMNS = tuple(RunRow.__table__.c[name] for name in ExportRun._fields)
_REPEATING = frozenset(
    (
        "agent_id",
        "problem_id",
        "factor_assignments",
        "block_assignments",
        "provenance",
        "primary_outcome",
        "trace_refs",
    )
)
"""Run columns whose text repeats between runs: the spec's side, provenance, and the two
small result cells (an outcome of ``1.0`` or ``0.0``, no trace refs: ``[]``); outputs and
metrics are each run's own."""


def has_repeated_run_ids(engine: Engine, study_id: str) -> bool:
    """Whether two runs of the study share a run id (repeated level values give repeated
    ids, UPSTREAM.md 6.4). Their per-run files share a path, so the later run's files must
    be written after the earlier's, as one process writes them. One pass over the
    ``(study_id, run_id)`` index, stopping at the first repeat."""
    repeated = (
        select(RunRow.run_id)
        .where(RunRow.study_id == study_id)
        .group_by(RunRow.run_id)
        .having(func.count() > 1)
        .limit(1)
    )
    with engine.connect() as connection:
        return connection.execute(repeated).first() is not None


def iter_run_records(
    engine: Engine,
    study_id: str,
    *,
    statuses: Iterable[RunStatus | str] | None = None,
    without: Iterable[str] = (),
    batch: int = EXPORT_PAGE,
) -> Iterator[ExportRun]:
    """Runs of a study in plan order (optionally only those in ``statuses``), with the
    values ``ResultStore.iter_runs`` gives, as :class:`ExportRun` tuples.

    ``without`` names JSON columns the caller does not read (runs.csv has no cell for
    ``outputs``, which can be a model's whole answer): they are not fetched, and are None.
    """
    wanted = None if statuses is None else [RunStatus(status).value for status in statuses]
    skipped = set(without)
    unknown = skipped - {c.name for c in _RUN_TABLE_COLUMNS if _is_json(c)}
    if unknown:
        raise ValueError(f"not JSON columns of runs: {sorted(unknown)}")

    def read(column: Any) -> ColumnElement[Any]:
        if column.name in skipped:
            return null().label(column.name)
        if column.name in _TIMES:
            return utc_text(column).label(column.name)
        return _as_read(column)

    selected = [RunRow.plan_index, *(read(c) for c in _RUN_TABLE_COLUMNS)]
    convert = _decoding([RunRow.plan_index, *_RUN_TABLE_COLUMNS], _REPEATING)
    started, ended = (ExportRun._fields.index(name) + 1 for name in ("started_at", "ended_at"))

    def build(low: int, high: int, last: tuple[Any, ...] | None) -> Select[Any]:
        query = select(*selected).where(
            RunRow.study_id == study_id, RunRow.plan_index >= low, RunRow.plan_index < high
        )
        if wanted is not None:
            query = query.where(RunRow.status.in_(wanted))
        if last is not None:
            query = query.where(RunRow.plan_index > last[0])
        return query.order_by(RunRow.plan_index)

    make, iso = ExportRun._make, iso_from_utc_text
    for page in plan_pages(engine, RunRow.__table__, study_id, build, _first, batch, raw=True):
        for row in page:
            values = convert(row)
            values[started], values[ended] = iso(values[started]), iso(values[ended])
            del values[0]
            yield make(values)


def iter_child_rows(
    engine: Engine,
    table: type[EvaluationRow] | type[EventRow],
    study_id: str,
    names: Sequence[str],
    *,
    batch: int = EXPORT_PAGE,
) -> Iterator[list[Any]]:
    """``[plan_index, *names, extra]`` of each evaluation or event row, in plan order then
    ``seq`` order; JSON cells (``extra`` too) decoded."""
    columns = [table.__table__.c[name] for name in names]
    extra = table.__table__.c.extra
    keys = [table.__table__.c.plan_index, table.__table__.c.seq]
    selected = [*keys, *(_as_read(c) for c in columns), _as_read(extra)]
    # the declared JSON cells repeat from row to row (an event's meta, a score of 1.0); the
    # extras hold each row's run id
    convert = _decoding([*keys, *columns, extra], frozenset(c.name for c in columns))

    def build(low: int, high: int, last: tuple[Any, ...] | None) -> Select[Any]:
        query = select(*selected).where(
            table.__table__.c.study_id == study_id, keys[0] >= low, keys[0] < high
        )
        if last is not None:
            query = query.where(tuple_(*keys) > tuple_(*last))
        return query.order_by(*keys)

    for page in plan_pages(engine, table.__table__, study_id, build, _first_two, batch, raw=True):
        for row in page:
            values = convert(row)
            del values[1]  # seq: the order, not a cell
            yield values


ATTEMPT_CELLS = (
    "run_id", "attempt", "worker", "started_at", "ended_at", "outcome", "error_kind",
    "error_type", "error_message", "plan_index",
)  # fmt: skip
"""The ``run_attempts`` columns :func:`iter_attempt_rows` gives, in attempts.csv's order."""


def iter_attempt_rows(
    engine: Engine, study_id: str, *, batch: int = EXPORT_PAGE
) -> Iterator[Sequence[Any]]:
    """Each claim of each run as :data:`ATTEMPT_CELLS` (its times as ISO text, as in
    :func:`iter_run_records`), in plan order then attempt order."""
    table = AttemptRow.__table__
    keys = [table.c.plan_index, table.c.attempt]
    times = ("started_at", "ended_at")
    selected = [
        *keys,
        *(utc_text(table.c[n]).label(n) if n in times else table.c[n] for n in ATTEMPT_CELLS),
    ]
    started, ended = (ATTEMPT_CELLS.index(name) + 2 for name in times)

    def build(low: int, high: int, last: tuple[Any, ...] | None) -> Select[Any]:
        query = select(*selected).where(
            table.c.study_id == study_id, keys[0] >= low, keys[0] < high
        )
        if last is not None:
            query = query.where(tuple_(*keys) > tuple_(*last))
        return query.order_by(*keys)

    iso = iso_from_utc_text
    for page in plan_pages(engine, table, study_id, build, _first_two, batch, raw=True):
        for row in page:
            cells = list(row)
            cells[started], cells[ended] = iso(cells[started]), iso(cells[ended])
            yield cells[2:]
