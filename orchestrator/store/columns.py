"""The result columns, declared once: what a finished run, its evaluations and its events store.

Each declared column is a field of a frozen dataclass (:class:`RunResultFields`,
:class:`EvaluationFields`, :class:`EventFields`) whose metadata says the rest: SQL type, JSON
or not, where the value comes from, and its export cell. Field order is column order. The
records the store hands out extend these classes, so a column is a typed attribute of its
record, and everything else derives from the tables :data:`RESULT_COLUMNS`,
:data:`EVALUATION_COLUMNS` and :data:`EVENT_COLUMNS`: the ``runs`` / ``evaluations`` /
``events`` models (``models.py``), the finish statements on both backends (``endings.py``),
the readers (``queries.py``, the resubmit reset) and the CSV export (``orchestrator.export``).

Adding a result column is one field in :class:`RunResultFields` plus a migration.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import field
from datetime import datetime
from typing import Any, cast

from sqlalchemy import JSON, BigInteger, Float, String, Text
from sqlalchemy.dialects.postgresql.base import PGDialect
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeEngine

from orchestrator.contracts.canonical import to_jsonable
from orchestrator.contracts.errors import StoreError
from orchestrator.contracts.results import (
    MESSAGE_LIMIT,
    TRACEBACK_LIMIT,
    ErrorKind,
    RunResult,
    RunStatus,
)
from orchestrator.store.sqltypes import JSONType

__all__ = [
    "EVALUATION_COLUMNS",
    "EVENT_COLUMNS",
    "FINISH_COLUMNS",
    "MAX_MESSAGE_CHARS",
    "MAX_TRACEBACK_CHARS",
    "RESULT_COLUMNS",
    "ChildColumns",
    "ColumnSpec",
    "EvaluationFields",
    "EventFields",
    "RunResultFields",
    "result_values",
]

MAX_TRACEBACK_CHARS = TRACEBACK_LIMIT
"""Tracebacks keep their last 8 KB: the frames nearest the error are the useful ones, and a
recursion error's 100 KB traceback should not bloat a million-row table."""

MAX_MESSAGE_CHARS = MESSAGE_LIMIT
"""Error messages keep their first 4 KB (the start says what went wrong)."""

_POSTGRESQL: Dialect = cast("Callable[[], Dialect]", PGDialect)()
"""Compiles a declared type's PostgreSQL name (the finish statement casts JSON to it)."""

Source = Callable[[RunResult, Mapping[str, Any]], Any]
"""A run column's value from the result and its metrics (already JSON-safe)."""
Cell = Callable[[Any], Any]
"""An export cell from the record that holds the column."""


@dataclasses.dataclass(frozen=True, slots=True)
class ColumnSpec:
    """One declared column: its name (the field's), types, value source and export."""

    name: str
    sql_type: TypeEngine[Any]
    json: bool
    source: Source | None
    """Run columns: the stored value from a ``RunResult``. Child columns: None (the row's
    key of the same name, as text or, for JSON, as it is)."""
    export: str | None
    """The CSV column it is written to (runs.csv for run columns), or None."""
    cell: Cell
    """The CSV cell, from the record."""

    @property
    def pg_cast(self) -> str:
        """The PostgreSQL type its JSON text is cast to (``jsonb`` or ``json``)."""
        return str(self.sql_type.compile(dialect=_POSTGRESQL)).lower()


def column(
    sql_type: TypeEngine[Any] | type[TypeEngine[Any]],
    *,
    source: Source | None = None,
    export: str | None = "",
    cell: Cell | None = None,
) -> dict[str, Any]:
    """A declared column's field metadata (``field(metadata=column(...))``); ``export=""``
    exports it under its name, ``cell`` defaults to the stored value."""
    return {"sql_type": sql_type, "source": source, "export": export, "cell": cell}


def _declared(cls: type[Any], head: type[Any]) -> tuple[ColumnSpec, ...]:
    own = {f.name for f in dataclasses.fields(head)}
    specs = []
    for f in dataclasses.fields(cls):
        if f.name in own:
            continue
        sql_type = f.metadata["sql_type"]
        sql_type = sql_type() if isinstance(sql_type, type) else sql_type
        name = f.name
        export = f.metadata["export"]
        cell = f.metadata["cell"] or (lambda record, name=name: getattr(record, name))
        specs.append(
            ColumnSpec(
                name=name,
                sql_type=sql_type,
                json=isinstance(sql_type, JSON),
                source=f.metadata["source"],
                export=name if export == "" else export,
                cell=cell,
            )
        )
    return tuple(specs)


# -- value sources ---------------------------------------------------------------------------


def text(value: Any) -> str | None:
    """Text for a text column: PostgreSQL rejects NUL, which agent output can contain, so it
    becomes U+FFFD on both backends (as in JSON values, see ``engine._json_safe``)."""
    if value is None:
        return None
    out = str(value)
    return out.replace("\x00", "\ufffd") if "\x00" in out else out


def _bounded_head(value: str | None, limit: int) -> str | None:
    value = text(value)
    if value is None or len(value) <= limit:
        return value
    return value[:limit] + f"... [{len(value) - limit} more characters]"


def _bounded_tail(value: str | None, limit: int) -> str | None:
    value = text(value)
    if value is None or len(value) <= limit:
        return value
    return f"[{len(value) - limit} earlier characters dropped] ..." + value[-limit:]


def number(value: Any, kind: type[float] | type[int]) -> Any:
    """``value`` as ``kind``, or None when it is missing, a bool, or not a number."""
    if value is None or isinstance(value, bool):
        return None
    try:
        return kind(value)
    except (TypeError, ValueError, OverflowError):
        return None


def _metric(key: str, kind: type[float] | type[int]) -> Source:
    return lambda result, metrics: number(metrics.get(key), kind)


def _latency(result: RunResult, metrics: Mapping[str, Any]) -> Any:
    latency = number(metrics.get("latency_s"), float)
    return result.latency_s if latency is None else latency


def _error_kind(result: RunResult, metrics: Mapping[str, Any]) -> str | None:
    kind = result.error_kind or (ErrorKind.ERROR if result.status is RunStatus.FAILED else None)
    return kind.value if kind is not None else None


def _metrics_or(key: str, default: Any) -> Cell:
    return lambda run: (run.metrics or {}).get(key, default)


def _or(name: str, default: Any) -> Cell:
    return lambda run: default if getattr(run, name) is None else getattr(run, name)


def _error_info(run: Any) -> str | None:
    return f"{run.error_type}: {run.error_message or ''}" if run.error_type else None


# -- the declarations ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class _RunHead:
    """A run's spec and lifecycle, the fixed part of :class:`~.records.RunRecord`."""

    study_id: str
    index: int
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
    attempt: int
    attempts_used: int
    max_attempts: int
    lease_owner: str | None
    lease_expires_at: datetime | None
    queued_at: datetime | None
    started_at: datetime | None
    ended_at: datetime | None


@dataclasses.dataclass(frozen=True, slots=True)
class RunResultFields(_RunHead):
    """The result columns of ``runs``, written by finish and cleared by a resubmit. The runs.csv
    cells not listed here (ids, provenance, times) are the exporter's."""

    outputs: dict[str, Any] | None = field(
        metadata=column(JSONType, source=lambda r, m: to_jsonable(dict(r.outputs)), export=None)
    )
    metrics: dict[str, Any] | None = field(
        metadata=column(JSONType, source=lambda r, m: dict(m), export=None)
    )
    latency_s: float | None = field(
        metadata=column(Float, source=_latency, cell=_or("latency_s", 0.0))
    )
    cost_usd: float | None = field(
        metadata=column(Float, source=_metric("cost_usd", float), cell=_or("cost_usd", 0.0))
    )
    input_tokens: int | None = field(
        metadata=column(
            BigInteger, source=_metric("input_tokens", int), cell=_metrics_or("input_tokens", 0)
        )
    )
    output_tokens: int | None = field(
        metadata=column(
            BigInteger, source=_metric("output_tokens", int), cell=_metrics_or("output_tokens", 0)
        )
    )
    primary_outcome: Any = field(
        metadata=column(
            JSONType,
            source=lambda r, m: m.get("primary_outcome"),
            cell=_metrics_or("primary_outcome", None),
        )
    )
    trace_refs: list[str] | None = field(
        metadata=column(
            JSONType,
            source=lambda r, m: [str(ref) for ref in r.trace_refs],
            export="trace_path",
            cell=lambda run: (run.trace_refs or [""])[0],
        )
    )
    provenance: dict[str, Any] | None = field(
        metadata=column(JSONType, source=lambda r, m: to_jsonable(dict(r.provenance)), export=None)
    )
    error_kind: str | None = field(metadata=column(String, source=_error_kind, export=None))
    error_type: str | None = field(
        metadata=column(
            String,
            source=lambda r, m: _bounded_head(r.error_type, MAX_MESSAGE_CHARS),
            export="error_info",
            cell=_error_info,
        )
    )
    error_message: str | None = field(
        metadata=column(
            Text, source=lambda r, m: _bounded_head(r.error_message, MAX_MESSAGE_CHARS), export=None
        )
    )
    traceback: str | None = field(
        metadata=column(
            Text, source=lambda r, m: _bounded_tail(r.traceback, MAX_TRACEBACK_CHARS), export=None
        )
    )


@dataclasses.dataclass(frozen=True, slots=True)
class _ChildHead:
    """Keys of an evaluation or event row: its run, and ``seq``, its place in the run's list."""

    study_id: str
    index: int
    seq: int
    run_id: str
    attempt: int


@dataclasses.dataclass(frozen=True, slots=True)
class EvaluationFields(_ChildHead):
    """The evaluations.csv columns stored as columns (after ``run_id``)."""

    evaluator_id: str | None = field(metadata=column(String))
    metric_name: str | None = field(metadata=column(String))
    metric_value: Any = field(metadata=column(JSONType))
    metric_unit: str | None = field(metadata=column(String))
    aggregation_level: str | None = field(metadata=column(String))
    notes_json: Any = field(metadata=column(JSONType))


@dataclasses.dataclass(frozen=True, slots=True)
class EventFields(_ChildHead):
    """The events.csv columns stored as columns."""

    timestamp: str | None = field(metadata=column(Text))
    record_id: str | None = field(metadata=column(Text))
    text: str | None = field(metadata=column(Text))
    session_id: str | None = field(metadata=column(Text))
    actor_id: str | None = field(metadata=column(Text))
    event_type: str | None = field(metadata=column(Text))
    meta_json: Any = field(metadata=column(JSONType))


RESULT_COLUMNS = _declared(RunResultFields, _RunHead)
"""The result columns of ``runs``, in order."""

FINISH_COLUMNS = ("status", "started_at", "ended_at", *(c.name for c in RESULT_COLUMNS))
"""What finishing a run writes: its terminal status, the attempt's times and the result."""


def result_values(result: RunResult) -> dict[str, Any]:
    """The :data:`FINISH_COLUMNS` values of a finished run."""
    if result.status not in (RunStatus.SUCCESS, RunStatus.FAILED):
        raise StoreError(f"A finished run must be success or failed, not {result.status.value!r}.")
    metrics = to_jsonable(dict(result.metrics))
    values: dict[str, Any] = {
        "status": result.status.value,
        "started_at": result.started_at,
        "ended_at": result.ended_at,
    }
    for spec in RESULT_COLUMNS:
        assert spec.source is not None
        values[spec.name] = spec.source(result, metrics)
    return values


@dataclasses.dataclass(frozen=True, slots=True)
class ChildColumns:
    """The declared columns of ``evaluations`` or ``events`` and how a producer's row maps to
    them: declared keys to their columns (text or JSON), every other key, except those
    ``reserved``, to ``extra`` in its order; ``leading`` CSV columns come from the keys."""

    columns: tuple[ColumnSpec, ...]
    reserved: tuple[str, ...] = ()
    leading: tuple[str, ...] = ()
    csv_json: tuple[str, ...] = ()
    """Columns whose mappings the CSV holds as ``json.dumps(sort_keys=True)`` (the upstream
    writes raw mappings so); other values are written as they are."""

    @property
    def names(self) -> tuple[str, ...]:
        """The declared columns, in order."""
        return tuple(c.name for c in self.columns)

    @property
    def csv_columns(self) -> tuple[str, ...]:
        """The required CSV columns, in order."""
        return (*self.leading, *self.names)

    def values(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        """A producer's row as column values plus ``extra``."""
        row = to_jsonable(dict(raw))
        out = {c.name: row.get(c.name) if c.json else text(row.get(c.name)) for c in self.columns}
        skip = {*self.names, *self.reserved}
        out["extra"] = {k: v for k, v in row.items() if k not in skip}
        return out

    def rows(self, key: Mapping[str, Any], raws: Sequence[Mapping[str, Any]]) -> list[Any]:
        """Insert rows for a run's list: ``key`` columns, ``seq`` and :meth:`values`."""
        return [{**key, "seq": seq, **self.values(raw)} for seq, raw in enumerate(raws)]

    def csv_row(self, record: Any) -> dict[str, Any]:
        """The CSV row of a stored record: the leading and declared columns, then the extras
        in their order (an extra never replaces a column)."""
        row: dict[str, Any] = {name: getattr(record, name) for name in self.csv_columns}
        row.update((k, v) for k, v in record.extra.items() if k not in row)
        return row


EVALUATION_COLUMNS = ChildColumns(
    _declared(EvaluationFields, _ChildHead),
    reserved=("run_id",),
    leading=("run_id",),
    csv_json=("notes_json",),
)
"""evaluations.csv: ``run_id`` comes from the run (a row's own ``run_id`` is dropped)."""

EVENT_COLUMNS = ChildColumns(_declared(EventFields, _ChildHead), csv_json=("meta_json",))
"""events.csv."""
